"""Field validation from dataclass annotations and metadata (hmlib.validation), on toy dataclasses and on Config."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import pytest

from hmlib.config import PROFILES, Config, ConfigError, config_from_dict, config_to_dict, load_config
from hmlib.validation import check_dataclass, checked, expected, read_config_file

REGISTRY = ["alpha", "beta"]  # names supplied lazily through a callable `choices`


@dataclass(frozen=True)
class Inner:
    count: int = checked(1, min=1)
    ratio: float = checked(0.5, min_exclusive=0, max_exclusive=1)
    unit: float = checked(0.0, min=0, max=1)
    mode: str = checked("a", choices=("a", "b"))
    source: str = checked("alpha", choices=lambda: tuple(REGISTRY))
    flag: bool = False
    sizes: tuple[int, ...] = checked((1, 2), min_len=1, min=1)
    weights: tuple[float, ...] = (0.5,)
    names: tuple[str, ...] | None = None
    limit: int | None = checked(None, min=0, max=10)
    table: Mapping[str, str] = field(default_factory=dict)
    pair: tuple[int, str] = (1, "a")
    level: Literal["low", "high"] = "low"


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    steps: int = 3
    label: str = "x"


def _error(obj, where=""):
    with pytest.raises(ConfigError) as err:
        check_dataclass(obj, where)
    message = str(err.value)
    assert "\n" not in message, "a validation error must be one line"
    return message


# ------------------------------------------------------------------------------------ toy dataclasses

def test_defaults_pass_unchanged():
    assert check_dataclass(Outer()) == Outer()


def test_good_values_are_coerced():
    obj = Outer(inner=Inner(ratio=np.float64(0.25), unit=1, sizes=[3, np.int64(4)], weights=[1, 2.5],
                            names=["p", "q"], limit=np.int64(7), table={"k": "v"}, pair=[2, "b"]), steps=np.int64(5))
    out = check_dataclass(obj)
    assert out.inner.sizes == (3, 4) and type(out.inner.sizes) is tuple
    assert all(type(v) is int for v in out.inner.sizes) and type(out.inner.limit) is int and type(out.steps) is int
    assert out.inner.weights == (1.0, 2.5) and all(type(v) is float for v in out.inner.weights)
    assert type(out.inner.unit) is float and type(out.inner.ratio) is float
    assert out.inner.names == ("p", "q") and out.inner.pair == (2, "b") and type(out.inner.pair) is tuple
    assert out.inner.table == {"k": "v"}


@pytest.mark.parametrize("changes, message", [
    ({"count": 0}, "inner.count must be an integer >= 1, got 0"),
    ({"count": True}, "inner.count must be an integer >= 1, got true (a boolean)"),
    ({"count": 2.0}, "inner.count must be an integer >= 1, got 2.0 (a number)"),
    ({"count": "3"}, "inner.count must be an integer >= 1, got '3' (a string)"),
    ({"count": None}, "inner.count must be an integer >= 1, got null"),
    ({"ratio": "0.2"}, "inner.ratio must be a number > 0 and < 1, got '0.2' (a string)"),
    ({"ratio": 1}, "inner.ratio must be a number > 0 and < 1, got 1"),
    ({"ratio": 0.0}, "inner.ratio must be a number > 0 and < 1, got 0.0"),
    ({"ratio": float("nan")}, "inner.ratio must be a finite number > 0 and < 1, got nan"),
    ({"ratio": False}, "inner.ratio must be a number > 0 and < 1, got false (a boolean)"),
    ({"ratio": [0.5]}, "inner.ratio must be a number > 0 and < 1, got [0.5] (a list)"),
    ({"unit": 1.5}, "inner.unit must be a number >= 0 and <= 1, got 1.5"),
    ({"mode": "c"}, "inner.mode must be one of 'a', 'b', got 'c'"),
    ({"mode": 1}, "inner.mode must be one of 'a', 'b', got 1 (an integer)"),
    ({"source": "gamma"}, "inner.source must be one of 'alpha', 'beta', got 'gamma'"),
    ({"flag": 1}, "inner.flag must be true or false, got 1 (an integer)"),
    ({"flag": "false"}, "inner.flag must be true or false, got 'false' (a string)"),
    ({"sizes": 64}, "inner.sizes must be a non-empty list of integers >= 1, got 64 (an integer)"),
    ({"sizes": "12"}, "inner.sizes must be a non-empty list of integers >= 1, got '12' (a string)"),
    ({"sizes": ()}, "inner.sizes must be a non-empty list of integers >= 1, got []"),
    ({"sizes": (4, 0)}, "inner.sizes[1] must be an integer >= 1, got 0"),
    ({"sizes": (4, True)}, "inner.sizes[1] must be an integer >= 1, got true (a boolean)"),
    ({"weights": ("1",)}, "inner.weights[0] must be a number, got '1' (a string)"),
    ({"names": "mnist"}, "inner.names must be a list of strings or null, got 'mnist' (a string)"),
    ({"names": ("a", 3)}, "inner.names[1] must be a string, got 3 (an integer)"),
    ({"limit": 11}, "inner.limit must be an integer >= 0 and <= 10 or null, got 11"),
    ({"limit": "5"}, "inner.limit must be an integer >= 0 and <= 10 or null, got '5' (a string)"),
    ({"table": ["a"]}, "inner.table must be a mapping of strings to strings, got ['a'] (a list)"),
    ({"table": {"k": 5}}, "inner.table['k'] must be a string, got 5 (an integer)"),
    ({"table": {3: "v"}}, "inner.table key 3 must be a string, got 3 (an integer)"),
    ({"pair": (1, 2)}, "inner.pair[1] must be a string, got 2 (an integer)"),
    ({"pair": (1,)}, "inner.pair must be a list of 2 item(s): an integer, a string, got [1]"),
    ({"level": "mid"}, "inner.level must be one of 'low', 'high', got 'mid'"),
])
def test_bad_values_are_one_line_errors_naming_key_expectation_and_value(changes, message):
    assert _error(Outer(inner=Inner(**changes))) == message


def test_where_prefixes_the_dotted_key_and_nested_sections_must_be_instances():
    assert _error(Inner(count=-1), "cfg.section").startswith("cfg.section.count must be an integer >= 1")
    assert _error(Outer(inner={"count": 2})) == "inner must be an Inner section, got {'count': 2} (a mapping)"
    assert _error(Outer(steps=1.5)) == "steps must be an integer, got 1.5 (a number)"


def test_callable_choices_are_read_at_check_time():
    with pytest.raises(ConfigError, match="inner.source must be one of 'alpha', 'beta', got 'gamma'"):
        check_dataclass(Outer(inner=Inner(source="gamma")))
    REGISTRY.append("gamma")
    try:
        assert check_dataclass(Outer(inner=Inner(source="gamma"))).inner.source == "gamma"
    finally:
        REGISTRY.remove("gamma")


def test_checked_rejects_unknown_rules_and_check_dataclass_non_instances():
    with pytest.raises(TypeError, match="unknown validation rule.*mni"):
        checked(1, mni=0)
    with pytest.raises(TypeError, match="dataclass instance"):
        check_dataclass(Outer)
    with pytest.raises(TypeError, match="dataclass instance"):
        check_dataclass({"steps": 1})


def test_expected_phrases():
    assert expected(int, {"min": 1}) == "an integer >= 1"
    assert expected(tuple[int, ...], {"min_len": 2, "max_len": 4, "min": 0}) == "a list of 2 to 4 integers >= 0"
    assert expected(float | None, {"max_exclusive": 1}) == "a number < 1 or null"
    assert expected(Mapping[str, str]) == "a mapping of strings to strings"


# ----------------------------------------------------------------------------------- hmlib.config.Config

@pytest.mark.parametrize("overrides, message", [
    ({"data": {"test_fraction": "0.2"}}, "data.test_fraction must be a number > 0 and < 1, got '0.2' (a string)"),
    ({"data": {"test_fraction": True}}, "data.test_fraction must be a number > 0 and < 1, got true (a boolean)"),
    ({"meta": {"train_datasets": "mnist"}},
     "meta.train_datasets must be a non-empty list of strings, got 'mnist' (a string)"),
    ({"meta": {"train_datasets": []}}, "meta.train_datasets must be a non-empty list of strings, got []"),
    ({"meta": {"test_datasets": ["mnist", 7]}}, "meta.test_datasets[1] must be a string, got 7 (an integer)"),
    ({"adapt": {"inner_lr": [0.5]}}, "adapt.inner_lr must be a number > 0, got [0.5] (a list)"),
    ({"adapt": {"inner_lr": -0.1}}, "adapt.inner_lr must be a number > 0, got -0.1"),
    ({"full": {"target_hidden": 64}}, "full.target_hidden must be a list of integers >= 1, got 64 (an integer)"),
    ({"full": {"target_hidden": [64, 0]}}, "full.target_hidden[1] must be an integer >= 1, got 0"),
    ({"task": {"num_images": True}}, "task.num_images must be an integer >= 4, got true (a boolean)"),
    ({"task": {"num_images": "64"}}, "task.num_images must be an integer >= 4, got '64' (a string)"),
    ({"meta": {"iterations": -1}}, "meta.iterations must be an integer >= 1, got -1"),
    ({"meta": {"val_fraction": 1.0}}, "meta.val_fraction must be a number > 0 and < 1, got 1.0"),
    ({"meta": {"use_inner_loop": "no"}}, "meta.use_inner_loop must be true or false, got 'no' (a string)"),
    ({"seeds": [0, -3]}, "seeds[1] must be an integer >= 0, got -3"),
    ({"vae": {"lr": 0}}, "vae.lr must be a number > 0, got 0"),
    ({"vae": {"max_train_images": 0}}, "vae.max_train_images must be an integer >= 1 or null, got 0"),
    ({"eval": {"num_tasks": 1}}, "eval.num_tasks must be an integer >= 2, got 1"),
    ({"ablation": {"step_grid": [0, 2.5]}}, "ablation.step_grid[1] must be an integer >= 0, got 2.5 (a number)"),
    ({"ablation": {"lr_grid": [0.1, -1]}}, "ablation.lr_grid[1] must be a number > 0, got -1"),
    ({"backbone": {"channels": "32"}}, "backbone.channels must be a non-empty list of integers >= 1, got '32' (a string)"),
    ({"ablation": {"meta_iterations": False}},
     "ablation.meta_iterations must be an integer >= 1 or null, got false (a boolean)"),
    ({"data": {"custom_datasets": {"emnist": 5}}},
     "data.custom_datasets['emnist'] must be a string, got 5 (an integer)"),
    ({"data": {"data_dir": 3}}, "data.data_dir must be a string or null, got 3 (an integer)"),
    ({"data": {"use_hub": 1}}, "data.use_hub must be true or false, got 1 (an integer)"),
    ({"film": {"tau": 0}}, "film.tau must be a number > 0, got 0"),
    ({"device": None}, "device must be 'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps', got null"),
    ({"device": "gpu"}, "device must be 'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps', got 'gpu'"),
    ({"num_threads": True}, "num_threads must be an integer >= 1 or null, got true (a boolean)"),
])
def test_config_rejects_wrong_types_and_ranges_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("default", overrides=overrides)
    assert str(err.value) == message


def test_config_coerces_good_values():
    cfg = load_config("smoke", overrides={"full": {"target_hidden": [16, 8]}, "adapt": {"inner_lr": 1},
                                          "ablation": {"lr_grid": [1, 2]}, "backbone": {"channels": [8, 8]},
                                          "eval": {"shapes": [[4, 32]]}, "num_threads": None,
                                          "data": {"max_images_per_split": None, "test_fraction": 0.5}})
    assert cfg.full.target_hidden == (16, 8) and type(cfg.full.target_hidden) is tuple
    assert cfg.adapt.inner_lr == 1.0 and type(cfg.adapt.inner_lr) is float
    assert cfg.backbone.channels == (8, 8) and cfg.ablation.lr_grid == (1.0, 2.0)
    assert all(type(v) is float for v in cfg.ablation.lr_grid)
    assert cfg.eval.shapes == ((4, 32),) and cfg.num_threads is None and cfg.data.max_images_per_split is None


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_passes_the_field_checks_unchanged(profile):
    cfg = load_config(profile)
    assert check_dataclass(cfg) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_nested_unknown_keys_and_non_mapping_sections_still_error():
    with pytest.raises(ConfigError, match=r"unknown config key 'meta\.iterationz'.*iterations"):
        load_config(overrides={"meta": {"iterationz": 3}})
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.custom'; valid keys here: .*custom_datasets"):
        load_config(overrides={"data": {"custom": {}}})
    with pytest.raises(ConfigError, match=r"^task: expected a mapping of keys, got 5$"):
        load_config(overrides={"task": 5})
    with pytest.raises(ConfigError, match=r"^task\.mode must be one of 'random', 'consecutive', got \{'x': 1\} \(a mapping\)$"):
        load_config(overrides={"task": {"mode": {"x": 1}}})
    with pytest.raises(ConfigError, match=r"^full\.target_hidden must be a list of integers >= 1, got \{'x': 1\} "):
        load_config(overrides={"full": {"target_hidden": {"x": 1}}})


def test_config_from_dict_checks_types_too():
    data = config_to_dict(load_config("smoke"))
    data["meta"]["iterations"] = "20"
    with pytest.raises(ConfigError, match=r"^meta\.iterations must be an integer >= 1, got '20' \(a string\)$"):
        config_from_dict(data)


def test_direct_construction_is_checked_by_validate():
    from hmlib.config import TaskConfig, validate

    with pytest.raises(ConfigError, match=r"^task\.num_images must be an integer >= 4, got 0$"):
        validate(Config(task=TaskConfig(num_images=0)))


# ---------------------------------------------------------------------------------------- config files

def _file(tmp_path, content: bytes | str, name="cfg.json"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("content, pattern", [
    (b"\xff\xfe{\x00}\x00", r"is not UTF-8 text \(byte 0xff at offset 0\)"),
    (b'{"task": {"mode": "caf\xe9"}}', r"is not UTF-8 text \(byte 0xe9 at offset 22\)"),
    ('{"task": {"num_images": 3,}}', r"is not valid JSON: line 1, column 27: Expecting property name"),
    ('{\n  "task": {\n    "num_images" 3\n  }\n}', r"is not valid JSON: line 3, column 18: Expecting ':' delimiter"),
    ("[1, 2]", r"must hold a JSON object \{\.\.\.\} at the top level, got a list"),
    ('"smoke"', r"must hold a JSON object .* got a string"),
    ("   \n", r"is empty"),
    ('{"task": {}, "task": {"num_images": 3}}', r"is not valid JSON: key 'task' appears twice"),
    ('{"adapt": {"inner_lr": NaN}}', r"is not valid JSON: NaN is not a JSON number"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, content, pattern):
    path = _file(tmp_path, content)
    for call in (lambda: read_config_file(path), lambda: load_config("default", path)):
        with pytest.raises(ConfigError, match=pattern) as err:
            call()
        assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"^config file not found: .*absent\.json$"):
        read_config_file(tmp_path / "absent.json")
    with pytest.raises(ConfigError, match=r"is a directory, not a JSON file$"):
        load_config("default", tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    """A file the process may not read (as root chmod 0 does not stop reads, so the OS refusal is simulated)."""
    path = _file(tmp_path, "{}")
    real_read_bytes = Path.read_bytes

    def refuse(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError, match="cannot be read: permission denied"):
        read_config_file(path)


def test_utf8_with_bom_and_good_file(tmp_path):
    path = _file(tmp_path, "\ufeff" + json.dumps({"task": {"num_images": 32}, "eval": {"num_tasks": 16}}))
    assert read_config_file(path) == {"task": {"num_images": 32}, "eval": {"num_tasks": 16}}
    cfg = load_config("smoke", path)
    assert cfg.task.num_images == 32 and cfg.eval.num_tasks == 16


def test_bad_value_in_a_file_names_the_dotted_key(tmp_path):
    path = _file(tmp_path, json.dumps({"meta": {"iterations": -1}}))
    with pytest.raises(ConfigError, match=r"^meta\.iterations must be an integer >= 1, got -1$"):
        load_config("smoke", path)
