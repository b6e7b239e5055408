"""Configuration: sections and profiles, JSON file overrides, errors that name the key, rules across fields."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from threadpoolctl import threadpool_info

from hmlib.config import (IMAGE_SIZE, PROFILES, Config, ConfigError, config_from_dict, config_to_dict,
                          configure_runtime, load_config, registered_datasets, resolve_device, with_overrides)
from hmlib.data import HUB_IDS
from hmlib.errors import HmlibError

SECTIONS = ("data", "task", "vae", "backbone", "transductive", "hyper", "film", "full", "adapt", "meta", "eval", "benchmark",
            "ablation")


def _write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _key_pattern(key: str) -> str:
    """A regex matching ``key`` literally at the start of a word."""
    return r"(^|\W)" + key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")


# ------------------------------------------------------------------------------------ layout and profiles

def test_sections_and_top_level_fields():
    """The config has the stage sections plus profile, device, num_threads and the replicate seeds."""
    names = [f.name for f in dataclasses.fields(Config)]
    assert names == ["profile", "device", "num_threads", "seeds", *SECTIONS]
    cfg = load_config()
    assert cfg.seeds == (0, 1, 2) and cfg.num_threads == 2 and Config().num_threads == 1  # default profile: both cores
    assert all(dataclasses.is_dataclass(getattr(cfg, s)) for s in SECTIONS)


def test_default_protocol_uses_offline_datasets_only():
    """Meta-training on three offline datasets, mnist held out; kmnist (hub only) is not used."""
    cfg = load_config()
    assert cfg.profile == "default"
    assert cfg.meta.train_datasets == ("fashion_mnist", "hebrew_chars", "math_shapes")
    assert cfg.meta.test_datasets[0] == "mnist"
    assert all(d.startswith("mnist+") for d in cfg.meta.test_datasets[1:]) and len(cfg.meta.test_datasets) >= 6
    assert cfg.datasets[:4] == ("fashion_mnist", "hebrew_chars", "math_shapes", "mnist")
    assert "kmnist" not in cfg.datasets
    assert cfg.data.image_size == IMAGE_SIZE == 28


def test_seed_profile_is_the_prototype_protocol():
    """The seed profile: kmnist + fashion_mnist, the prototype VAE, latent targets, geometry inner loss."""
    cfg = load_config("seed")
    assert cfg.meta.train_datasets == ("kmnist", "fashion_mnist") and cfg.meta.test_datasets == ("mnist",)
    assert (cfg.vae.variant, cfg.vae.latent_dim, cfg.vae.likelihood) == ("prototype", 128, "mse_ssim")
    assert (cfg.hyper.generation, cfg.full.target_hidden, cfg.task.mode) == ("full", (400, 200), "consecutive")
    assert (cfg.meta.min_classes, cfg.meta.max_classes, cfg.meta.outer_loss) == (4, 4, "aligned")
    assert (cfg.adapt.inner_loss, cfg.adapt.num_inner_steps, cfg.adapt.inner_lr) == ("geometry", 3, 5e-3)
    assert cfg.adapt.test_steps is None and cfg.adapt.steps_at_test == 3  # the prototype adapts as it meta-trains


def test_test_steps_is_a_test_time_setting_outside_the_checkpoint_identity():
    """adapt.test_steps sets the inner steps at test time (None: the meta-training count) and is not part of what
    names and reuses a hypernetwork checkpoint; the meta-training count is."""
    from hmlib.hyper.checkpoints import training_settings

    cfg = load_config("default")
    assert (cfg.adapt.num_inner_steps, cfg.adapt.test_steps, cfg.adapt.steps_at_test) == (3, 8, 8)
    for test_steps, at_test in ((0, 0), (8, 8), (16, 16), (None, 3)):
        other = dataclasses.replace(cfg, adapt=dataclasses.replace(cfg.adapt, test_steps=test_steps))
        assert other.adapt.steps_at_test == at_test and training_settings(other) == training_settings(cfg)
    trained_longer = dataclasses.replace(cfg, adapt=dataclasses.replace(cfg.adapt, num_inner_steps=5))
    assert training_settings(trained_longer) != training_settings(cfg)
    with pytest.raises(ConfigError, match="adapt.test_steps"):
        load_config("default", overrides={"adapt": {"test_steps": -1}})
    # a loaded checkpoint's config takes them from its profile, whatever it recorded (hmlib cluster, the bundles)
    from hmlib.config import with_profile_test_time

    for profile, expected in (("default", 8), ("smoke", 4), ("seed", None)):
        recorded = load_config(profile, overrides={"adapt": {"test_steps": 6}})
        assert with_profile_test_time(recorded).adapt.test_steps == expected
        assert with_profile_test_time(recorded).adapt == dataclasses.replace(recorded.adapt, test_steps=expected)
    # and the transductive gate's settings (a checkpoint made before the gate's rule changed gets today's rule)
    recorded = load_config("default", overrides={"transductive": {"gate": "silhouette", "gate_confidence": 0.9,
                                                                  "gate_repeats": 3, "epochs": 5}})
    loaded = with_profile_test_time(recorded).transductive
    default = load_config("default").transductive
    assert (loaded.gate, loaded.gate_confidence, loaded.gate_repeats) == ("confidence", default.gate_confidence,
                                                                          default.gate_repeats)
    assert loaded.epochs == 5  # what the adaptation trains with stays as recorded


def test_smoke_profile_is_smaller_than_default():
    """Smoke: one seed, fewer images, epochs, iterations and tasks, a narrower backbone."""
    smoke, default = load_config("smoke"), load_config("default")
    assert smoke.profile == "smoke" and smoke.seeds == (0,) and len(default.seeds) > 1
    assert smoke.meta.iterations < default.meta.iterations
    assert smoke.vae.epochs <= default.vae.epochs and smoke.backbone.epochs <= default.backbone.epochs
    assert smoke.backbone.images_per_dataset < default.backbone.images_per_dataset
    assert max(smoke.backbone.channels) < max(default.backbone.channels)
    assert smoke.eval.num_tasks < default.eval.num_tasks
    assert smoke.ablation.num_seeds <= len(smoke.seeds)
    assert smoke.data.max_images_per_split is not None and default.data.max_images_per_split is None


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_loads_and_is_validated(name):
    """Each profile is a valid config carrying its name."""
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.profile == name


def test_unknown_profile_lists_the_choices():
    """An unknown profile names itself and every profile."""
    with pytest.raises(ConfigError, match="unknown profile 'fast'") as err:
        load_config("fast")
    assert all(name in str(err.value) for name in ("smoke", "default", "seed"))


def test_config_error_is_an_hmlib_value_error():
    """ConfigError is both an HmlibError (one-line CLI message) and a ValueError."""
    assert issubclass(ConfigError, HmlibError) and issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------------ files and overrides

def test_json_file_overrides_nested_fields_and_lists_become_tuples(tmp_path):
    """A JSON file overrides nested fields on top of the profile; lists become tuples."""
    path = _write(tmp_path, {"task": {"num_images": 32}, "eval": {"shapes": [[2, 16], [4, 32]]}, "device": "cpu",
                             "seeds": [3, 4], "backbone": {"channels": [4, 8]}})
    cfg = load_config("smoke", path)
    assert cfg.task.num_images == 32 and cfg.eval.shapes == ((2, 16), (4, 32)) and cfg.device == "cpu"
    assert cfg.seeds == (3, 4) and cfg.backbone.channels == (4, 8)
    assert cfg.vae.epochs == load_config("smoke").vae.epochs  # the profile still applies underneath


def test_a_config_file_cannot_relabel_the_profile(tmp_path):
    """A file's "profile" key used to be taken as it was: the settings stayed the profile's, but results recorded
    the file's name (so a smoke run could pass as the default protocol). The profile's own name is harmless."""
    for other in ("default", "nosuch"):
        with pytest.raises(ConfigError, match=f"'{other}' is not the profile asked for \\('smoke'\\).*--profile"):
            load_config("smoke", _write(tmp_path, {"profile": other}))
    assert load_config("smoke", _write(tmp_path, {"profile": "smoke"})) == load_config("smoke")


def test_overrides_apply_after_the_file(tmp_path):
    """Explicit overrides win over the file."""
    path = _write(tmp_path, {"task": {"num_images": 32}})
    assert load_config("default", path, {"task": {"num_images": 48}}).task.num_images == 48


def test_with_overrides_validates():
    """with_overrides applies nested changes and validates them; no overrides returns the same config."""
    cfg = load_config("smoke")
    assert with_overrides(cfg, {}) is cfg
    assert with_overrides(cfg, {"vae": {"latent_dim": 3}}).vae.latent_dim == 3
    with pytest.raises(ConfigError, match=_key_pattern("vae.latent_dim")):
        with_overrides(cfg, {"vae": {"latent_dim": 0}})
    with pytest.raises(ConfigError, match="'vae.latent'"):
        with_overrides(cfg, {"vae": {"latent": 3}})


@pytest.mark.parametrize("data, key, valid", [
    ({"tsak": {}}, "tsak", "task"),
    ({"seed": 1}, "seed", "seeds"),
    ({"task": {"num_imagez": 3}}, "task.num_imagez", "num_images"),
    ({"backbone": {"chanels": [8]}}, "backbone.chanels", "channels"),
    ({"meta": {"inner": {"x": 1}}}, "meta.inner", "iterations"),
])
def test_unknown_key_is_named_with_the_valid_keys(tmp_path, data, key, valid):
    """An unknown key is an error naming its dotted path and the valid keys at that level."""
    with pytest.raises(ConfigError) as err:
        load_config("default", _write(tmp_path, data))
    assert f"'{key}'" in str(err.value) and valid in str(err.value)


def test_missing_or_invalid_config_file(tmp_path):
    """Absent, folder, invalid JSON, non-UTF-8, non-object and non-mapping sections are ConfigErrors."""
    with pytest.raises(ConfigError, match="not found"):
        load_config("default", tmp_path / "absent.json")
    with pytest.raises(ConfigError, match="is a directory, not a JSON file"):
        load_config("default", tmp_path)
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        load_config("default", _write(tmp_path, "{task: 1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config("default", _write(tmp_path, '{"task": {"mode": "caf\xe9"}}'.encode("latin-1")))
    with pytest.raises(ConfigError, match="must hold a JSON object .* at the top level, got a list"):
        load_config("default", _write(tmp_path, [1, 2]))
    with pytest.raises(ConfigError, match="task: expected a mapping"):
        load_config("default", _write(tmp_path, {"task": 5}))


# ------------------------------------------------------------------------------------ types and ranges

@pytest.mark.parametrize("overrides, key, says", [
    ({"vae": {"lr": "0.001"}}, "vae.lr", "must be a number"),  # a string for a float
    ({"task": {"num_images": True}}, "task.num_images", "must be an integer"),  # a bool for an int
    ({"vae": {"latent_dim": 2.5}}, "vae.latent_dim", "must be an integer"),
    ({"seeds": 3}, "seeds", "list"),  # an int for a tuple
    ({"backbone": {"channels": 32}}, "backbone.channels", "list"),
    ({"meta": {"train_datasets": "mnist"}}, "meta.train_datasets", "list"),
    ({"meta": {"iterations": -1}}, "meta.iterations", ">= 1"),  # a negative iteration count
    ({"adapt": {"num_inner_steps": -1}}, "adapt.num_inner_steps", ">= 0"),
    ({"task": {"num_images": 0}}, "task.num_images", ">= 4"),
    ({"task": {"num_classes": 1}}, "task.num_classes", ">= 2"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "< 1"),
    ({"meta": {"val_fraction": 0.0}}, "meta.val_fraction", "> 0"),
    ({"backbone": {"label_smoothing": 1.0}}, "backbone.label_smoothing", "< 1"),
    ({"backbone": {"channels": [8, 0]}}, "backbone.channels[1]", ">= 1"),
    ({"seeds": [0, -1]}, "seeds[1]", ">= 0"),
    ({"seeds": []}, "seeds", "non-empty"),
    ({"ablation": {"lr_grid": [0.1, 0]}}, "ablation.lr_grid[1]", "> 0"),
    ({"eval": {"shapes": [[1, 8]]}}, "eval.shapes", "K >= 2 and N >= 2K"),
    ({"eval": {"shapes": [[4, 6]]}}, "eval.shapes", "K >= 2 and N >= 2K"),
    ({"eval": {"shapes": []}}, "eval.shapes", "is empty"),
    ({"meta": {"min_classes": 5, "max_classes": 3}}, "meta.min_classes", "exceeds meta.max_classes"),
    ({"meta": {"shifts": ["rotate"]}}, "meta.shifts", "must be one of"),
    ({"film": {"adapt": "everything"}}, "film.adapt", "must be one of"),
    ({"meta": {"outer_loss": "mse"}}, "meta.outer_loss", "must be one of"),
    ({"meta": {"use_inner_loop": "yes"}}, "meta.use_inner_loop", "true or false"),
    ({"task": {"mode": "sequential"}}, "task.mode", "must be one of"),
    ({"adapt": {"inner_loss": "mse"}}, "adapt.inner_loss", "must be one of"),
    ({"hyper": {"conditioning": "lstm"}}, "hyper.conditioning", "must be one of"),
    ({"hyper": {"generation": "compact"}}, "hyper.generation", "must be one of"),
    ({"vae": {"retrain": "maybe"}}, "vae.retrain", "must be one of"),
    ({"backbone": {"retrain": "sometimes"}}, "backbone.retrain", "must be one of"),
    ({"ablation": {"setting": "few_shot"}}, "ablation.setting", "must be one of"),
    ({"data": {"polarity": 3}}, "data.polarity", "must be one of"),
    ({"data": {"max_images_per_split": 0}}, "data.max_images_per_split", ">= 1"),
    ({"data": {"custom_datasets": 5}}, "data.custom_datasets", "must be a mapping"),
    ({"data": {"custom_datasets": ["emnist"]}}, "data.custom_datasets", "must be a mapping"),
    ({"data": {"custom_datasets": {"emnist": 1}}}, "data.custom_datasets", "must be a string"),
    ({"vae": {"epochs": None}}, "vae.epochs", "must be an integer >= 1, got null"),
])
def test_invalid_values_name_the_key(overrides, key, says):
    """Type and range errors from the field metadata are ConfigErrors naming the key and the rule."""
    with pytest.raises(ConfigError, match=_key_pattern(key)) as err:
        load_config("default", overrides=overrides)
    assert says in str(err.value)


def test_the_same_errors_come_from_a_config_file(tmp_path):
    """A bad value in a JSON file is reported the same way, naming the key."""
    with pytest.raises(ConfigError, match=r"meta\.iterations must be an integer >= 1, got -1"):
        load_config("default", _write(tmp_path, {"meta": {"iterations": -1}}))


def test_values_are_coerced_where_unambiguous():
    """An int for a float becomes a float; null is allowed where the field is optional."""
    cfg = load_config("default", overrides={"vae": {"lr": 1}, "num_threads": None,
                                            "data": {"max_images_per_split": None}})
    assert cfg.vae.lr == 1.0 and isinstance(cfg.vae.lr, float)
    assert cfg.num_threads is None and cfg.data.max_images_per_split is None


@pytest.mark.parametrize("size", [32, 64, 14])
def test_image_size_other_than_28_is_refused(size):
    """The models are built for 28 x 28 images: any other data.image_size is refused."""
    with pytest.raises(ConfigError, match=r"data\.image_size must be one of 28, got %d" % size):
        load_config("default", overrides={"data": {"image_size": size}})


@pytest.mark.parametrize("bad", [0, -2, 1.5, "two", True])
def test_num_threads_must_be_positive_integer_or_null(bad):
    """num_threads: a positive integer or null."""
    with pytest.raises(ConfigError, match="num_threads"):
        load_config("smoke", overrides={"num_threads": bad})


# ------------------------------------------------------------------------------------ rules across fields

def test_seeds_must_be_distinct():
    """Duplicate replicate seeds are refused."""
    with pytest.raises(ConfigError, match=r"seeds must be distinct, got \[0, 1, 0\]"):
        load_config(overrides={"seeds": [0, 1, 0]})


def test_ablation_seeds_cannot_exceed_the_seeds():
    """ablation.num_seeds is at most the number of configured seeds."""
    with pytest.raises(ConfigError, match=r"ablation\.num_seeds = 4 but only 3 seeds"):
        load_config(overrides={"ablation": {"num_seeds": 4}})
    with pytest.raises(ConfigError, match="ablation.num_seeds"):
        load_config("smoke", overrides={"ablation": {"num_seeds": 2}})  # smoke has one seed
    assert load_config(overrides={"ablation": {"num_seeds": 3}}).ablation.num_seeds == 3


def test_embed_dim_must_be_divisible_by_num_heads():
    """hyper.embed_dim must split evenly over hyper.num_heads."""
    with pytest.raises(ConfigError, match=r"hyper\.embed_dim = 10 must be divisible by hyper\.num_heads = 4"):
        load_config(overrides={"hyper": {"embed_dim": 10, "num_heads": 4}})
    assert load_config(overrides={"hyper": {"embed_dim": 12, "num_heads": 4}}).hyper.embed_dim == 12


def test_the_full_generator_needs_a_fixed_k_and_the_aligned_outer_loss():
    """The prototype's generator emits a fixed number of outputs and has no representation for class centroids."""
    with pytest.raises(ConfigError, match="meta.outer_loss = 'aligned'"):
        load_config(overrides={"hyper": {"generation": "full"}})
    with pytest.raises(ConfigError, match="min_classes = meta.max_classes"):
        load_config(overrides={"hyper": {"generation": "full"}, "meta": {"outer_loss": "aligned"}})
    cfg = load_config(overrides={"hyper": {"generation": "full"},
                                 "meta": {"outer_loss": "aligned", "min_classes": 4, "max_classes": 4}})
    assert cfg.hyper.generation == "full"


def test_dataset_rules():
    """Train and test datasets must not overlap; unknown datasets are refused unless declared as custom."""
    with pytest.raises(ConfigError, match=r"both meta-trained on and held out: \['mnist'\]"):
        load_config(overrides={"meta": {"train_datasets": ["mnist", "fashion_mnist"], "test_datasets": ["mnist"]}})
    with pytest.raises(ConfigError, match="unknown dataset 'emnist'.*custom_datasets"):
        load_config(overrides={"meta": {"test_datasets": ["emnist"]}})
    with pytest.raises(ConfigError, match="unknown dataset 'emnist'"):
        load_config(overrides={"meta": {"train_datasets": ["fashion_mnist", "emnist"]}})
    cfg = load_config(overrides={"data": {"custom_datasets": {"emnist": "some/hub-id"}},
                                 "meta": {"test_datasets": ["emnist"]}})
    assert cfg.meta.test_datasets == ("emnist",) and dict(cfg.data.custom_datasets) == {"emnist": "some/hub-id"}
    assert set(registered_datasets()) == set(HUB_IDS) == {"mnist", "fashion_mnist", "kmnist", "hebrew_chars",
                                                          "math_shapes"}
    with pytest.raises(ConfigError, match="non-empty"):
        load_config(overrides={"meta": {"train_datasets": []}})
    with pytest.raises(ConfigError, match="meta.test_datasets must be a non-empty list"):  # nothing to evaluate
        load_config(overrides={"meta": {"test_datasets": []}})
    # a repeated dataset or shape used to be evaluated twice, and counted twice in every mean and interval
    with pytest.raises(ConfigError, match="meta.test_datasets lists mnist\\+rotate more than once"):
        load_config(overrides={"meta": {"test_datasets": ["mnist", "mnist+rotate", "mnist+rotate"]}})
    with pytest.raises(ConfigError, match=r"eval.shapes lists \[4, 64\] more than once"):
        load_config(overrides={"eval": {"shapes": [[4, 64], [2, 32], [4, 64]]}})
    with pytest.raises(ConfigError, match="transductive.datasets lists mnist more than once"):
        load_config(overrides={"transductive": {"datasets": ["mnist", "mnist"]}})


# ------------------------------------------------------------------------------------ round trip and runtime

@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_round_trip_through_plain_primitives(profile):
    """config_to_dict gives JSON primitives only; config_from_dict rebuilds the same config."""
    cfg = load_config(profile)
    data = config_to_dict(cfg)
    text = json.dumps(data)  # only JSON primitives: safe for weights_only checkpoints
    assert isinstance(data["seeds"], list) and isinstance(data["backbone"]["channels"], list)
    assert all(not isinstance(v, tuple) for section in SECTIONS for v in data[section].values())
    assert config_from_dict(json.loads(text)) == cfg


def test_config_from_dict_validates():
    """A dict with a bad value is refused like any override."""
    data = config_to_dict(load_config("smoke"))
    data["backbone"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"backbone\.epochs"):
        config_from_dict(data)


def test_config_is_frozen():
    """Sections cannot be changed in place."""
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task.num_images = 3  # type: ignore[misc]


def test_resolve_device():
    """'cpu' and 'auto' resolve; a name torch does not know is a ConfigError."""
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    auto = resolve_device("auto")
    assert auto.type in ("cuda", "mps", "cpu") and (expected is None or auto.type == expected)
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("tpu9")


def test_configure_runtime_applies_thread_limit_and_returns_device():
    """configure_runtime sets torch's and the BLAS pools' threads and returns the device."""
    before = torch.get_num_threads()
    try:
        device = configure_runtime(load_config("smoke", overrides={"num_threads": 1, "device": "cpu"}))
        assert device == torch.device("cpu")
        assert torch.get_num_threads() == 1
        assert all(pool["num_threads"] == 1 for pool in threadpool_info())
    finally:
        torch.set_num_threads(before)


def test_a_corruption_in_another_case_is_named_as_such():
    """A second first-hour audit: 'mnist+Rotate' was refused as an invalid dataset name ("use letters ..."), which it
    is not; the part at fault is the corruption, whose names are lower case."""
    from hmlib.errors import DatasetError
    with pytest.raises(DatasetError, match=r"unknown corruption 'Rotate' in dataset name 'mnist\+Rotate'.*lower case"):
        load_config(overrides={"meta": {"test_datasets": ["mnist+Rotate"]}})
    with pytest.raises(DatasetError, match="invalid dataset name"):  # a path is still not a name
        load_config(overrides={"meta": {"test_datasets": ["../mnist"]}})
