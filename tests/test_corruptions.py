"""Corruptions and shifted datasets '<dataset>+<corruption>': every corruption, the names, the cache, the config."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from datafactory import balanced_labels, class_patterns, write_tiny_dataset  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hmlib.config import load_config  # noqa: E402
from hmlib.data import (CORRUPTIONS, DatasetError, benchmark_corruptions, get_spec, load_split,  # noqa: E402
                        parse_shifted, preview, source_status, train_corruptions)
from hmlib.data.cache import cache_paths, read_manifest  # noqa: E402
from hmlib.data.corruptions import Corruption, apply, register, shift_seed  # noqa: E402
from hmlib.data.registry import check_name  # noqa: E402
from hmlib.plots.data import plot_corruptions  # noqa: E402
from hmlib.validation import ConfigError  # noqa: E402

MNIST_C = {"shot_noise", "impulse_noise", "glass_blur", "motion_blur", "shear", "scale", "rotate", "brightness",
           "translate", "stripe", "fog", "spatter", "dotted_line", "zigzag", "canny_edges"}
IMAGES = class_patterns(balanced_labels(24, 6), 6)  # (24, 28, 28) uint8 bars on a noisy dark ground


def data_cfg(**overrides):
    return load_config("smoke", overrides={"data": {"max_images_per_split": None, **overrides}}).data


@pytest.fixture
def scratch_registry():
    """The corruption registry restored after the test (which may register its own)."""
    saved = dict(CORRUPTIONS)
    yield CORRUPTIONS
    CORRUPTIONS.clear()
    CORRUPTIONS.update(saved)


# ---------------------------------------------------------------------------------------------- the corruptions


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_changes_every_image_and_follows_its_seed(name):
    before = IMAGES.copy()
    out = apply(name, IMAGES, seed=1)
    assert out.shape == IMAGES.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(IMAGES, before)  # the input is left untouched
    assert (out != IMAGES).any(axis=(1, 2)).all(), "some images came back unchanged"
    np.testing.assert_array_equal(out, apply(name, IMAGES, seed=1))
    assert not np.array_equal(out, apply(name, IMAGES, seed=2))


def test_the_families_are_mnist_c_and_a_disjoint_train_family():
    assert set(benchmark_corruptions()) == MNIST_C
    assert len(train_corruptions()) >= 8 and not set(train_corruptions()) & MNIST_C
    assert set(benchmark_corruptions()) | set(train_corruptions()) == set(CORRUPTIONS)
    for corruption in CORRUPTIONS.values():
        assert corruption.description and "\n" not in corruption.description
        assert any(ch.isdigit() for ch in corruption.description), f"{corruption.name}: severity not stated"


@pytest.mark.parametrize("name", train_corruptions())
def test_train_strength_scales_the_shift_from_clean(name):
    clean = apply(name, IMAGES, seed=3, strength=0.0).astype(int)
    assert np.abs(clean - IMAGES).max() <= 2  # strength 0: clean (JPEG at quality 100 may round by a level or two)
    change = [np.abs(apply(name, IMAGES, seed=3, strength=s).astype(int) - IMAGES).mean() for s in (0.3, 1.0)]
    assert change[1] > change[0] > 0


def test_bad_input_and_strength_are_refused_in_one_line():
    with pytest.raises(DatasetError, match=r"takes uint8 images \(n, h, w\), got float64 \(28, 28\)"):
        apply("rotate", np.zeros((28, 28)), seed=0)
    with pytest.raises(DatasetError, match="strength must be in"):
        apply("elastic", IMAGES, seed=0, strength=1.5)
    with pytest.raises(DatasetError, match="one documented severity"):
        apply("rotate", IMAGES, seed=0, strength=0.5)
    assert apply("fog", IMAGES[:0], seed=0).shape == (0, 28, 28)


# ---------------------------------------------------------------------------------------------- names


def test_shifted_names_are_parsed_and_checked():
    assert parse_shifted("mnist+rotate") == ("mnist", "rotate") and parse_shifted("mnist") == ("mnist", None)
    assert check_name("mnist+rotate") == "mnist+rotate"
    for bad in ("../x+rotate", "mnist+rotate+fog", "x/y+rotate", "mnist+"):
        with pytest.raises(DatasetError, match="invalid dataset name"):
            parse_shifted(bad)
    with pytest.raises(DatasetError) as err:
        parse_shifted("mnist+nonsense")
    message = str(err.value)
    assert "\n" not in message and "unknown corruption 'nonsense'" in message and "'mnist+nonsense'" in message
    assert all(name in message for name in CORRUPTIONS)
    with pytest.raises(DatasetError, match="reserved"):  # '+' cannot start a custom dataset or split name
        check_name("a+rotate", "custom dataset name", shifted=False)
    with pytest.raises(DatasetError, match="invalid split name"):
        cache_paths("mnist", "test+rotate")


def test_config_accepts_shifts_and_keeps_benchmark_shifts_out_of_meta_training():
    cfg = load_config(overrides={"meta": {"test_datasets": ["mnist+rotate"],
                                          "train_datasets": ["fashion_mnist", "fashion_mnist+elastic"]}})
    assert cfg.meta.test_datasets == ("mnist+rotate",)
    with pytest.raises(ConfigError, match=r"\['fashion_mnist\+fog'\] use benchmark corruptions: held-out shifts "
                                          r"must not be meta-trained on"):
        load_config(overrides={"meta": {"train_datasets": ["fashion_mnist", "fashion_mnist+fog"]}})
    with pytest.raises(ConfigError, match=r"unknown dataset 'emnist' \(the base of 'emnist\+rotate'\)"):
        load_config(overrides={"meta": {"test_datasets": ["emnist+rotate"]}})
    with pytest.raises(DatasetError, match="unknown corruption 'blur'"):
        load_config(overrides={"meta": {"test_datasets": ["mnist+blur"]}})
    with pytest.raises(DatasetError, match="reserved"):
        load_config(overrides={"data": {"custom_datasets": {"my+set": "org/x"}}})
    custom = load_config(overrides={"data": {"custom_datasets": {"my_set": "org/my-set"}},
                                    "meta": {"test_datasets": ["my_set+fog"]}})
    spec = get_spec("my_set+fog", custom.data)
    assert (spec.base, spec.corruption, spec.hub_id) == ("my_set", "fog", None)


# ---------------------------------------------------------------------------------------------- shifted datasets


def test_shifted_split_is_its_base_corrupted_with_labels_unchanged(tiny_mirror):
    cfg = data_cfg()
    base = load_split("mnist", "test", cfg, progress=False)
    shifted = load_split("mnist+rotate", "test", cfg, progress=False)
    assert shifted.name == "mnist+rotate" and shifted.split == "test"
    np.testing.assert_array_equal(shifted.labels, base.labels)
    assert shifted.label_names == base.label_names and shifted.fingerprint != base.fingerprint
    np.testing.assert_array_equal(shifted.images, apply("rotate", base.images, shift_seed("rotate", "mnist", "test")))
    manifest = read_manifest("mnist+rotate", "test")
    assert manifest["fingerprint"] == shifted.fingerprint and cache_paths("mnist+rotate", "test")[0].is_file()
    assert manifest["settings"]["base_fingerprint"] == base.fingerprint
    assert manifest["settings"]["severity"] == CORRUPTIONS["rotate"].description
    assert manifest["settings"]["seed"] == shift_seed("rotate", "mnist", "test") != shift_seed("rotate", "mnist",
                                                                                                "train")


def test_shifted_split_is_read_from_its_cache(tiny_mirror, monkeypatch, capsys):
    first = load_split("mnist+fog", "train", data_cfg(), progress=False)
    capsys.readouterr()
    monkeypatch.setattr(Corruption, "__call__", lambda *a, **k: pytest.fail("a cache hit must not corrupt again"))
    second = load_split("mnist+fog", "train", data_cfg(), progress=False)
    assert capsys.readouterr().out == ""
    np.testing.assert_array_equal(first.images, second.images)
    assert first.fingerprint == second.fingerprint


def test_a_new_corruption_is_one_registry_entry(tiny_mirror, scratch_registry):
    register(Corruption("invert", "train", "ink and background swapped (strength ignored), 1 - x",
                        lambda x, rng, strength: 1.0 - x))
    assert "invert" in train_corruptions()
    cfg = load_config("smoke", overrides={"data": {"max_images_per_split": None},
                                          "meta": {"train_datasets": ["fashion_mnist+invert"]}})
    shifted = load_split("fashion_mnist+invert", "test", cfg.data, progress=False)
    np.testing.assert_array_equal(shifted.images, 255 - load_split("fashion_mnist", "test", cfg.data,
                                                                   progress=False).images)
    with pytest.raises(DatasetError, match="invalid corruption name"):
        register(Corruption("Bad+name", "train", "-", lambda x, rng, strength: x))


def test_a_custom_local_dataset_takes_a_corruption(tmp_path):
    folder = write_tiny_dataset(tmp_path, "my_set", num_classes=3, splits={"train": 30, "test": 15})
    cfg = data_cfg(custom_datasets={"my_set": str(folder)})
    shifted = load_split("my_set+impulse_noise", "test", cfg, progress=False)
    assert len(shifted) == 15 and shifted.label_names == ["class_0", "class_1", "class_2"]


def test_notebook_helpers_show_a_shifted_dataset(tiny_mirror):
    cfg = data_cfg()
    rows = source_status(cfg, ["mnist", "mnist+zigzag"])
    assert rows[1]["next load from"] == "mnist, then zigzag"
    shown, base = preview("mnist+zigzag", cfg, num_images=3, num_polarity=20), preview("mnist", cfg, num_images=3,
                                                                                       num_polarity=20)
    assert shown.name == "mnist+zigzag" and not np.array_equal(shown.processed, base.processed)
    fig = plot_corruptions(IMAGES[:3], names=["elastic", "rotate"])
    assert isinstance(fig, Figure) and fig.axes[1].get_ylabel() == "rotate\nbenchmark"  # benchmark family first
