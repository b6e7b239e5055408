"""Configuration: profiles, JSON file overrides, validation errors that name the key, round trip."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hmlib.config import (BUILTIN_DATASETS, PROFILES, Config, ConfigError, config_from_dict, config_to_dict,
                          load_config, resolve_device)


def _write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_default_protocol_uses_offline_datasets_only():
    cfg = load_config()
    assert cfg.profile == "default"
    assert cfg.meta.train_datasets == ("fashion_mnist", "hebrew_chars", "math_shapes")
    assert cfg.meta.test_datasets == ("mnist",)
    assert cfg.datasets == ("fashion_mnist", "hebrew_chars", "math_shapes", "mnist")
    assert "kmnist" not in cfg.datasets


def test_seed_profile_is_the_prototype_protocol():
    cfg = load_config("seed")
    assert cfg.meta.train_datasets == ("kmnist", "fashion_mnist") and cfg.meta.test_datasets == ("mnist",)
    assert cfg.vae.latent_dim == 128
    assert (cfg.adapt.inner_loss, cfg.adapt.num_inner_steps, cfg.adapt.inner_lr) == ("geometry", 3, 5e-3)


def test_smoke_profile_is_smaller_than_default():
    smoke, default = load_config("smoke"), load_config("default")
    assert smoke.profile == "smoke"
    assert smoke.meta.iterations < default.meta.iterations
    assert smoke.vae.epochs <= default.vae.epochs
    assert smoke.eval.num_tasks < default.eval.num_tasks
    assert smoke.data.max_images_per_split is not None and default.data.max_images_per_split is None


def test_every_profile_loads_and_is_validated():
    for name in PROFILES:
        assert isinstance(load_config(name), Config)


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown profile 'fast'") as err:
        load_config("fast")
    assert all(name in str(err.value) for name in ("smoke", "default", "seed"))


def test_json_file_overrides_nested_fields_and_lists_become_tuples(tmp_path):
    path = _write(tmp_path, {"task": {"num_images": 32}, "eval": {"task_sizes": [16, 32]}, "device": "cpu"})
    cfg = load_config("smoke", path)
    assert cfg.task.num_images == 32 and cfg.eval.task_sizes == (16, 32) and cfg.device == "cpu"
    assert cfg.vae.epochs == load_config("smoke").vae.epochs  # the profile still applies underneath


def test_overrides_apply_after_the_file(tmp_path):
    path = _write(tmp_path, {"task": {"num_images": 32}})
    assert load_config("default", path, {"task": {"num_images": 48}}).task.num_images == 48


@pytest.mark.parametrize("data, key, valid", [
    ({"tsak": {}}, "tsak", "task"),
    ({"task": {"num_imagez": 3}}, "task.num_imagez", "num_images"),
    ({"meta": {"inner": {"x": 1}}}, "meta.inner", "iterations"),
])
def test_unknown_key_is_named_with_the_valid_keys(tmp_path, data, key, valid):
    with pytest.raises(ConfigError) as err:
        load_config("default", _write(tmp_path, data))
    assert f"'{key}'" in str(err.value) and valid in str(err.value)


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("default", tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config("default", _write(tmp_path, "{task: 1"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config("default", _write(tmp_path, {"task": 5}))


@pytest.mark.parametrize("overrides, field", [
    ({"task": {"mode": "sequential"}}, "task.mode"),
    ({"adapt": {"inner_loss": "mse"}}, "adapt.inner_loss"),
    ({"vae": {"retrain": "maybe"}}, "vae.retrain"),
    ({"task": {"num_images": 0}}, "task.num_images"),
    ({"vae": {"latent_dim": 2.5}}, "vae.latent_dim"),
    ({"task": {"num_classes": 1}}, "task.num_classes"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
    ({"adapt": {"num_inner_steps": -1}}, "adapt.num_inner_steps"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("default", overrides=overrides)


def test_dataset_rules():
    with pytest.raises(ConfigError, match="both meta-trained on and held out.*mnist"):
        load_config(overrides={"meta": {"train_datasets": ["mnist"], "test_datasets": ["mnist"]}})
    with pytest.raises(ConfigError, match="unknown dataset 'emnist'.*custom_datasets"):
        load_config(overrides={"meta": {"test_datasets": ["emnist"]}})
    cfg = load_config(overrides={"data": {"custom_datasets": {"emnist": "some/hub-id"}},
                                 "meta": {"test_datasets": ["emnist"]}})
    assert cfg.meta.test_datasets == ("emnist",) and dict(cfg.data.custom_datasets) == {"emnist": "some/hub-id"}
    assert set(BUILTIN_DATASETS) == {"mnist", "fashion_mnist", "kmnist", "hebrew_chars", "math_shapes"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_round_trip_through_plain_primitives(profile):
    cfg = load_config(profile)
    data = config_to_dict(cfg)
    text = json.dumps(data)  # only JSON primitives: safe for weights_only checkpoints
    assert all(not isinstance(v, tuple) for v in data["meta"].values())
    assert config_from_dict(json.loads(text)) == cfg


def test_config_is_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task.num_images = 3  # type: ignore[misc]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    auto = resolve_device("auto")
    assert auto.type in ("cuda", "mps", "cpu") and (expected is None or auto.type == expected)
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("tpu9")


def test_configure_runtime_applies_thread_limit_and_returns_device():
    import torch
    from threadpoolctl import threadpool_info

    from hmlib.config import configure_runtime

    before = torch.get_num_threads()
    try:
        device = configure_runtime(load_config("smoke", overrides={"num_threads": 1}))
        assert device.type == "cpu" or device.type in ("cuda", "mps")
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two"])
def test_num_threads_must_be_positive_integer_or_null(bad):
    with pytest.raises(ConfigError, match="num_threads"):
        load_config("smoke", overrides={"num_threads": bad})


def test_cluster_generation_rejects_pixel_inputs_with_a_clear_error():
    with pytest.raises(ConfigError, match="target_input = 'latent'"):
        load_config("smoke", overrides={"hyper": {"generation": "cluster", "target_input": "latent+pixels"}})
    assert load_config("smoke", overrides={"hyper": {"generation": "compact", "target_input": "latent+pixels"}})
