"""Check config dataclasses field by field from their annotations and field metadata; read config files.

:func:`check_dataclass` walks every field of a (nested) dataclass instance, resolves its annotation
with :func:`typing.get_type_hints` and checks, then coerces, the value:

==============================  ===========================================  ==============
annotation                      accepted                                     stored as
==============================  ===========================================  ==============
``int``                         an integer, not a bool                       ``int``
``float``                       a finite integer or float, not a bool        ``float``
``bool``                        ``True`` or ``False`` only                   ``bool``
``str``                         a string                                     ``str``
``X | None``                    ``None``, or what ``X`` accepts              as ``X``
``tuple[X, ...]``, ``list[X]``  a list or tuple of what ``X`` accepts        tuple / list
``tuple[X, Y]``                 a list or tuple of exactly two items         ``tuple``
``Mapping[K, V]``, ``dict``     a mapping, keys and values checked           ``dict``
``Literal[a, b]``               one of the literals                          as given
a dataclass                     an instance of it, checked recursively       as given
==============================  ===========================================  ==============

Range and choice rules come from ``dataclasses.field(metadata={...})`` (or :func:`checked`):

* ``min`` / ``max``: inclusive bounds; ``min_exclusive`` / ``max_exclusive``: exclusive bounds;
* ``choices``: a tuple of allowed values, or a zero-argument callable returning them (so a registry
  can supply the names lazily);
* ``min_len`` / ``max_len``: bounds on the length of a tuple, list or mapping;
* ``pattern``: a :class:`Pattern` a string must match in full (a regular expression and its description in
  words, for names that no tuple of choices can list, such as ``cuda:N``).

On a tuple, list or mapping field the bound and choice rules apply to each element (each value of
a mapping); the length rules to the container. Rules skip ``None``. Other metadata keys are left to
other tools. Every problem is a :class:`ConfigError` whose message is one line naming the dotted
key, what was expected and the value given: ``meta.iterations must be an integer >= 1, got -1``.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import numbers
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from hmlib.errors import HmlibError

RULES = ("min", "max", "min_exclusive", "max_exclusive", "choices", "min_len", "max_len", "pattern")
LENGTH_RULES = ("min_len", "max_len")
_BOUNDS = (("min", ">=", operator.ge), ("min_exclusive", ">", operator.gt), ("max", "<=", operator.le),
           ("max_exclusive", "<", operator.lt))
_SCALARS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
            bool: ("true or false", "booleans (true or false)")}
_MAPPINGS = (collections.abc.Mapping, collections.abc.MutableMapping, dict)
_SHOW_LIMIT = 60


class ConfigError(HmlibError, ValueError):
    """A configuration value or key is invalid."""


@dataclasses.dataclass(frozen=True)
class Pattern:
    """The ``pattern`` rule: ``regex`` must match the whole string; ``words`` says what it accepts in messages."""

    regex: str
    words: str

    def matches(self, value: str) -> bool:
        return re.fullmatch(self.regex, value) is not None


class _Mismatch(Exception):
    """Internal: the value does not fit at this level; ``kind`` says whether to name the value's type."""

    def __init__(self, kind: bool) -> None:
        super().__init__()
        self.kind = kind


# ------------------------------------------------------------------------------------------ fields

def checked(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            **rules: Any) -> Any:
    """A ``dataclasses.field`` carrying validation ``rules`` as metadata; an unknown rule name is a TypeError."""
    unknown = sorted(set(rules) - set(RULES))
    if unknown:
        raise TypeError(f"unknown validation rule(s) {', '.join(unknown)}; known: {', '.join(RULES)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata=rules)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as err:  # an annotation naming something not importable from its module
        raise TypeError(f"cannot resolve the annotations of {cls.__qualname__}: {err}") from err


def check_dataclass(obj: Any, where: str = "") -> Any:
    """Check every field of dataclass instance ``obj`` (recursively); return it with coerced values."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"check_dataclass expects a dataclass instance, got {type(obj).__name__}")
    hints = _hints(type(obj))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        new = check_value(value, hints.get(f.name, Any), f.metadata, f"{where}.{f.name}" if where else f.name)
        if new is not value:
            changes[f.name] = new
    return dataclasses.replace(obj, **changes) if changes else obj


def check_value(value: Any, annotation: Any, rules: Mapping[str, Any], where: str) -> Any:
    """Check and coerce one value against its annotation and rules; raise ConfigError naming ``where``."""
    try:
        return _coerce(value, annotation, rules, where)
    except _Mismatch as bad:
        wanted = expected(annotation, rules)
        if _non_finite(value):  # inf (a JSON 1e400) or nan: no rule can order it, so say what is wrong with it
            wanted = re.sub(r"\ba number\b", "a finite number", wanted, count=1)
        raise ConfigError(f"{where} must be {wanted}, got {_show(value, bad.kind)}") from None


def _non_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) and \
        not math.isfinite(value)


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _element_rules(rules: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rules.items() if k in RULES and k not in LENGTH_RULES}


def _coerce(value: Any, tp: Any, rules: Mapping[str, Any], where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if _is_union(origin):
        options = [a for a in args if a is not type(None)]
        if value is None:
            if len(options) < len(args):
                return None
            raise _Mismatch(True)
        if len(options) == 1:
            return _coerce(value, options[0], rules, where)
        for option in options:
            try:
                return _coerce(value, option, rules, where)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch(True)
    if value is None and tp is not type(None):
        raise _Mismatch(True)
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise _Mismatch(False)
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        return _coerce_sequence(value, origin or tp, args, rules, where)
    if origin in _MAPPINGS or tp in _MAPPINGS:
        return _coerce_mapping(value, args, rules, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, tp):
            raise _Mismatch(True)
        return check_dataclass(value, where)
    if tp in _SCALARS:
        return _check_rules(_coerce_scalar(value, tp), rules)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Mismatch(True)
    return value


def _coerce_scalar(value: Any, tp: type) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise _Mismatch(True)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _Mismatch(True)
        return value
    if isinstance(value, bool):
        raise _Mismatch(True)
    if tp is int:
        if not isinstance(value, numbers.Integral):
            raise _Mismatch(True)
        return int(value)
    if not isinstance(value, numbers.Real) or not math.isfinite(value):  # inf from 1e400 would pass every bound
        raise _Mismatch(not isinstance(value, numbers.Real))
    return float(value)


def _choices(rules: Mapping[str, Any]) -> tuple[Any, ...] | None:
    allowed = rules.get("choices")
    if allowed is None:
        return None
    return tuple(allowed() if callable(allowed) else allowed)


def _check_rules(value: Any, rules: Mapping[str, Any]) -> Any:
    allowed = _choices(rules)
    if allowed is not None and value not in allowed:
        raise _Mismatch(False)
    if "pattern" in rules and isinstance(value, str) and not rules["pattern"].matches(value):
        raise _Mismatch(False)
    for key, _, ok in _BOUNDS:
        if key in rules and not ok(value, rules[key]):
            raise _Mismatch(False)
    return value


def _check_length(value: Any, rules: Mapping[str, Any]) -> None:
    if len(value) < rules.get("min_len", 0) or ("max_len" in rules and len(value) > rules["max_len"]):
        raise _Mismatch(False)


def _coerce_sequence(value: Any, kind: type, args: tuple[Any, ...], rules: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _Mismatch(True)
    _check_length(value, rules)
    if kind is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, str]
        if len(value) != len(args):
            raise _Mismatch(False)
        types_ = list(args)
    else:
        types_ = [args[0] if args else Any] * len(value)
    item_rules = _element_rules(rules)
    items = [check_value(v, t, item_rules, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, types_))]
    if type(value) is kind and all(a is b for a, b in zip(items, value)):
        return value
    return kind(items)


def _coerce_mapping(value: Any, args: tuple[Any, ...], rules: Mapping[str, Any], where: str) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise _Mismatch(True)
    _check_length(value, rules)
    key_type, value_type = args if len(args) == 2 else (Any, Any)
    item_rules = _element_rules(rules)
    out = {}
    for key, item in value.items():
        key = check_value(key, key_type, {}, f"{where} key {_show(key, False)}")
        out[key] = check_value(item, value_type, item_rules, f"{where}[{key!r}]")
    return out


# ---------------------------------------------------------------------------------------- messages

def expected(tp: Any, rules: Mapping[str, Any] | None = None) -> str:
    """What annotation ``tp`` with ``rules`` accepts, in words: 'an integer >= 1', 'a list of strings or null'."""
    rules = rules or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return "any value"
    if _is_union(origin):
        options = [expected(a, rules) for a in args if a is not type(None)]
        return " or ".join(options + (["null"] if type(None) in args else []))
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(_literal, args))
    if origin in (tuple, list) or tp in (tuple, list):
        return _expected_sequence(origin or tp, args, rules)
    if origin in _MAPPINGS or tp in _MAPPINGS:
        key_type, value_type = args if len(args) == 2 else (Any, Any)
        return _container("mapping", rules, f"{_plural(key_type, {})} to {_plural(value_type, _element_rules(rules))}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"{'an' if tp.__name__[:1] in 'AEIOU' else 'a'} {tp.__name__} section"
    allowed = _choices(rules)
    if allowed is not None:
        return "one of " + ", ".join(map(_literal, allowed))
    if "pattern" in rules:
        return rules["pattern"].words
    singular = _SCALARS[tp][0] if tp in _SCALARS else f"a {getattr(tp, '__name__', str(tp))}"
    return " ".join(filter(None, (singular, _bounds_text(rules))))


def _expected_sequence(kind: type, args: tuple[Any, ...], rules: Mapping[str, Any]) -> str:
    item_rules = _element_rules(rules)
    if kind is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} item(s): {', '.join(expected(a, item_rules) for a in args)}"
    return _container("list", rules, _plural(args[0] if args else Any, item_rules))


def _container(noun: str, rules: Mapping[str, Any], items: str) -> str:
    low, high = rules.get("min_len", 0), rules.get("max_len")
    if high is None:
        return f"a {noun} of {items}" if low <= 0 else (
            f"a non-empty {noun} of {items}" if low == 1 else f"a {noun} of at least {low} {items}")
    if low <= 0:
        return f"a {noun} of at most {high} {items}"
    return f"a {noun} of exactly {low} {items}" if low == high else f"a {noun} of {low} to {high} {items}"


def _plural(tp: Any, rules: Mapping[str, Any]) -> str:
    if tp in _SCALARS:
        allowed = _choices(rules)
        if allowed is not None:
            return f"{_SCALARS[tp][1]}, each one of {', '.join(map(_literal, allowed))}"
        return " ".join(filter(None, (_SCALARS[tp][1], _bounds_text(rules))))
    if tp is Any or tp is object:
        return "values"
    return f"items that are each {expected(tp, rules)}"


def _bounds_text(rules: Mapping[str, Any]) -> str:
    return " and ".join(f"{op} {_number(rules[key])}" for key, op, _ in _BOUNDS if key in rules)


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _literal(value: Any) -> str:
    return _show(value, False)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, numbers.Integral):
        return "an integer"
    if isinstance(value, numbers.Real):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _show(value: Any, with_kind: bool) -> str:
    """A value as a short one-line text, JSON-style for null and booleans; with its kind if asked."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(list(value) if isinstance(value, tuple) else value)  # config files write lists
        if len(text) > _SHOW_LIMIT:
            text = text[:_SHOW_LIMIT - 3] + "..."
    return f"{text} ({_kind(value)})" if with_kind else text


# ------------------------------------------------------------------------------------ config files

def read_config_file(path: str | Path) -> dict[str, Any]:
    """The JSON object in a config file; a missing, unreadable, non-UTF-8 or non-JSON file is a one-line ConfigError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a JSON file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read: permission denied") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8 JSON") from None
    if not text.strip():
        raise ConfigError(f"config file {path} is empty; it must hold a JSON object such as "
                          '{"task": {"num_images": 64}}')
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: line {err.lineno}, column {err.colno}: "
                          f"{err.msg}") from None
    except _JSONProblem as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object {{...}} at the top level, "
                          f"got {_kind(data)}")
    return data


class _JSONProblem(Exception):
    """Internal: JSON that the standard parser accepts but a config must not hold."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JSONProblem(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _JSONProblem(f"{name} is not a JSON number")


__all__ = ["ConfigError", "Pattern", "RULES", "check_dataclass", "check_value", "checked", "expected",
           "read_config_file"]
