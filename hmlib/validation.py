"""Up-front checks of every config field from its type annotation and its metadata rules.

Rules live in each dataclass field's ``metadata`` (see ``hmlib.config._f``): ``min``/``max`` (inclusive),
``gt``/``lt`` (exclusive), ``choices`` (a tuple, or a zero-argument callable returning the registered names),
``min_len`` for tuples, and ``item_min``/``item_gt`` for the elements of a tuple. Values are coerced where
it is unambiguous (a JSON list becomes a tuple, an int a float); a bool is never taken for a number.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping

_HINTS: dict[type, dict[str, Any]] = {}


def _error(message: str) -> Exception:
    from hmlib.config import ConfigError

    return ConfigError(message)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON object from a config file; any problem is one ConfigError line naming the file."""
    path = Path(path)
    if not path.exists():
        raise _error(f"config file not found: {path}")
    if not path.is_file():
        raise _error(f"config file {path} is not a file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _error(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise _error(f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    if not isinstance(data, dict):
        raise _error(f"config file {path} must hold a JSON object of sections, got {type(data).__name__}")
    return data


def check_dataclass(obj: Any, where: str = "") -> Any:
    """A copy of the (nested) dataclass ``obj`` whose every field was checked and coerced; ConfigError names the key."""
    cls = type(obj)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    changes = {}
    for f in dataclasses.fields(obj):
        key = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = check_dataclass(value, key)
        else:
            changes[f.name] = check_value(key, value, hints[f.name], f.metadata)
    return dataclasses.replace(obj, **changes)


def _describe(value: Any) -> str:
    kind = {str: "a string", bool: "a boolean", list: "a list", dict: "a mapping", type(None): "null"}.get(type(value))
    return f"{value!r}" + (f" ({kind})" if kind else "")


def check_value(key: str, value: Any, annotation: Any, rules: Mapping[str, Any] | None = None) -> Any:
    """``value`` checked against ``annotation`` and ``rules`` (coerced where unambiguous)."""
    rules = dict(rules or {})
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None:
            if type(None) in options:
                return None
            raise _error(f"{key} must not be null")
        others = [a for a in options if a is not type(None)]
        return check_value(key, value, others[0], rules) if len(others) == 1 else value
    if annotation is bool:
        if not isinstance(value, bool):
            raise _error(f"{key} must be true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(f"{key} must be an integer, got {_describe(value)}")
        return _check_range(key, value, rules)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(f"{key} must be a number, got {_describe(value)}")
        return _check_range(key, float(value), rules)
    if annotation is str:
        if not isinstance(value, str):
            raise _error(f"{key} must be a string, got {_describe(value)}")
        return _check_choice(key, value, rules)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _error(f"{key} must be a list, got {_describe(value)}")
        item_type = typing.get_args(annotation)[0]
        item_rules = {name[5:]: rule for name, rule in rules.items() if name.startswith("item_")}
        if "choices" in rules:
            item_rules["choices"] = rules["choices"]
        items = tuple(check_value(f"{key}[{i}]", v, item_type, item_rules) for i, v in enumerate(value))
        if len(items) < rules.get("min_len", 0):
            raise _error(f"{key} must hold at least {rules['min_len']} value(s), got {list(items)}")
        return items
    if origin in (collections.abc.Mapping, dict) or annotation in (dict, Mapping, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise _error(f"{key} must be a mapping, got {_describe(value)}")
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise _error(f"{key} must map names to strings, got {k!r}: {_describe(v)}")
        return dict(value)
    return value


def _check_range(key: str, value: float, rules: Mapping[str, Any]) -> Any:
    bounds = (("min", lambda v, b: v >= b, ">="), ("max", lambda v, b: v <= b, "<="),
              ("gt", lambda v, b: v > b, ">"), ("lt", lambda v, b: v < b, "<"))
    for name, ok, sign in bounds:
        if name in rules and not ok(value, rules[name]):
            kind = "an integer" if isinstance(value, int) else "a number"
            limits = " and ".join(f"{s} {rules[n]}" for n, _, s in bounds if n in rules)
            raise _error(f"{key} must be {kind} {limits}, got {value!r}")
    return _check_choice(key, value, rules)


def _check_choice(key: str, value: Any, rules: Mapping[str, Any]) -> Any:
    choices = rules.get("choices")
    if choices is None:
        return value
    allowed = tuple(choices() if callable(choices) else choices)
    if value not in allowed:
        raise _error(f"{key} = {value!r} is not one of {', '.join(map(repr, allowed))}")
    return value
