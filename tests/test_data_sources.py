"""Resolution of a dataset split: cache, then mirror, then hub; custom datasets; column detection; errors."""
from __future__ import annotations

import datasets
import numpy as np
import pytest
from datafactory import class_patterns, to_pil, write_image_folder, write_parquet_split, write_tiny_dataset

import hmlib.data.sources as sources
from hmlib.config import load_config
from hmlib.data import DatasetError, load_split
from hmlib.data.cache import cache_paths, read_manifest

NUM_CLASSES, NUM_TRAIN, NUM_TEST = 6, 120, 60  # the tiny_mirror fixture's sizes


def data_cfg(**overrides):
    return load_config("smoke", overrides={"data": {"max_images_per_split": None, **overrides}}).data


def hub_dataset_dict(num_per_split: int = 24, num_classes: int = 4) -> datasets.DatasetDict:
    """What ``datasets.load_dataset(hub_id)`` returns: Image + ClassLabel features, a train split only."""
    labels = np.arange(num_per_split) % num_classes
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=num_classes)})
    data = {"image": to_pil(class_patterns(labels, num_classes, 40)), "label": labels.tolist()}
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)})


def test_mirror_is_read_through_datasets_and_labels_match_pictures(tiny_mirror):
    images = load_split("mnist", "train", data_cfg(), progress=False)
    assert images.images.shape == (NUM_TRAIN, 28, 28) and images.images.dtype == np.uint8
    assert images.labels.dtype == np.int64 and images.label_names == [f"class_{c}" for c in range(NUM_CLASSES)]
    from datafactory import balanced_labels

    expected_labels = balanced_labels(NUM_TRAIN, NUM_CLASSES, seed=0)  # mnist is the first tiny dataset, seed 0
    np.testing.assert_array_equal(images.labels, expected_labels)
    np.testing.assert_array_equal(images.images, class_patterns(expected_labels, NUM_CLASSES, 28, seed=0))
    manifest = read_manifest("mnist", "train")
    assert manifest["source"]["kind"] == "file" and len(manifest["source"]["sha256"]) == 64
    assert manifest["fingerprint"] == images.fingerprint


def test_cache_hit_reads_no_source(tiny_mirror, monkeypatch):
    first = load_split("mnist", "test", data_cfg(), progress=False)
    monkeypatch.delenv("HMLIB_DATA_DIR")
    monkeypatch.setattr(sources, "read_parquet", lambda *a, **k: pytest.fail("cache hit must not read the mirror"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("cache hit must not ask the hub"))
    second = load_split("mnist", "test", data_cfg(), progress=False)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.fingerprint == second.fingerprint


def test_hub_path_used_when_no_mirror_and_missing_test_split_derived(monkeypatch):
    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append(path)
        return hub_dataset_dict()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "hub_revision", lambda hub_id: "rev123")
    train = load_split("hebrew_chars", "train", data_cfg(), progress=False)
    test = load_split("hebrew_chars", "test", data_cfg(), progress=False)
    assert calls == ["sivan22/hebrew-handwritten-characters"] * 2
    assert len(train) + len(test) == 24 and len(test) == 4  # 20 % of 6 images per class, 4 classes
    assert train.images.shape[1:] == (28, 28)
    manifest = read_manifest("hebrew_chars", "test")
    assert manifest["source"] == {"kind": "hub", "hub_id": "sivan22/hebrew-handwritten-characters",
                                  "revision": "rev123", "derived_from": "train"}
    assert manifest["settings"]["derived_split"] == {"from": "train", "test_fraction": 0.2, "split_seed": 0}


def test_error_when_every_source_fails_names_paths_hub_and_fix(monkeypatch, tmp_path):
    def offline(path, *args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    (tmp_path / "empty_mirror").mkdir()
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path / "empty_mirror"))
    with pytest.raises(DatasetError) as err:
        load_split("kmnist", "train", data_cfg(), progress=False)
    message = str(err.value)
    assert str(cache_paths("kmnist", "train")[0]) in message
    assert f"local: {tmp_path / 'empty_mirror' / 'kmnist'} (no such folder)" in message
    assert "tanganke/kmnist" in message and "ConnectionError" in message
    assert "HMLIB_DATA_DIR" in message and "hub only" in message
    # a mirror folder that does not exist is named as such (it used to read as a folder without the dataset)
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(DatasetError, match=rf"mirror: {tmp_path / 'typo'} \(from HMLIB_DATA_DIR\) does not exist"):
        load_split("kmnist", "train", data_cfg(), progress=False)
    monkeypatch.delenv("HMLIB_DATA_DIR")
    with pytest.raises(DatasetError, match=r"mirror: not configured .*\.\./shared/data beside the repository"):
        load_split("kmnist", "train", data_cfg(), progress=False)


def test_use_hub_false_skips_the_hub(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub must not be asked"))
    with pytest.raises(DatasetError, match="use_hub is false"):
        load_split("mnist", "train", data_cfg(use_hub=False), progress=False)


def test_unknown_name_lists_registered_datasets():
    with pytest.raises(DatasetError, match="unknown dataset 'nope'.*fashion_mnist.*custom_datasets"):
        load_split("nope", "train", data_cfg(), progress=False)


def test_custom_dataset_from_local_image_folder(tmp_path):
    counts = {"train": {"cat": 5, "dog": 7, "eel": 6}, "test": {"cat": 2, "dog": 2, "eel": 3}}
    folder = write_image_folder(tmp_path / "pets", counts, size=(20, 30), mode="RGB")
    cfg = data_cfg(custom_datasets={"pets": str(folder)})
    train = load_split("pets", "train", cfg, progress=False)
    test = load_split("pets", "test", cfg, progress=False)
    assert train.label_names == ["cat", "dog", "eel"]
    assert np.bincount(train.labels).tolist() == [5, 7, 6] and np.bincount(test.labels).tolist() == [2, 2, 3]
    assert train.images.shape == (18, 28, 28)
    assert read_manifest("pets", "train")["source"]["kind"] == "image_folder"


def test_custom_dataset_from_hub_id(monkeypatch):
    asked = []

    def fake_load_dataset(path, *args, **kwargs):
        asked.append(path)
        return hub_dataset_dict(12, 3)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "hub_revision", lambda hub_id: "unknown")
    toys = load_split("toys", "train", data_cfg(custom_datasets={"toys": "org/toys"}), progress=False)
    assert asked == ["org/toys"] and toys.num_classes == 3


def test_custom_dataset_local_parquet_folder(tmp_path):
    folder = write_tiny_dataset(tmp_path, "blobs", num_classes=3, splits={"train": 30, "test": 12})
    images = load_split("blobs", "test", data_cfg(custom_datasets={"blobs": str(folder)}), progress=False)
    assert len(images) == 12 and images.label_names == ["class_0", "class_1", "class_2"]


def test_columns_found_by_feature_type_whatever_their_names(tmp_path, monkeypatch):
    labels = np.arange(12) % 3
    write_parquet_split(tmp_path / "mnist" / "train.parquet", to_pil(class_patterns(labels, 3)), labels,
                        ["a", "b", "c"], image_column="picture_data", label_column="kind")
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    images = load_split("mnist", "train", data_cfg(), progress=False)
    assert images.label_names == ["a", "b", "c"] and len(images) + len(load_split("mnist", "test", data_cfg(),
                                                                                   progress=False)) == 12


def test_ambiguous_label_columns_are_an_error(tmp_path, monkeypatch):
    labels = np.arange(6) % 2
    features = datasets.Features({"image": datasets.Image(), "coarse": datasets.ClassLabel(num_classes=2),
                                  "fine": datasets.ClassLabel(num_classes=2)})
    data = {"image": to_pil(class_patterns(labels, 2)), "coarse": labels.tolist(), "fine": labels.tolist()}
    (tmp_path / "mnist").mkdir()
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "mnist" / "train.parquet"))
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "mnist" / "test.parquet"))
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="ambiguous label column.*coarse.*fine"):
        load_split("mnist", "train", data_cfg(), progress=False)


def test_subsample_is_stratified_and_taken_before_decoding(tiny_mirror, monkeypatch):
    import hmlib.data.loading as loading

    decoded = []
    original = loading.preprocess_batch
    monkeypatch.setattr(loading, "preprocess_batch", lambda items, *a, **k: decoded.append(len(items)) or
                        original(items, *a, **k))
    cfg = data_cfg(max_images_per_split=30)
    first = load_split("fashion_mnist", "train", cfg, progress=False)
    assert decoded == [30] and len(first) == 30
    assert np.bincount(first.labels).tolist() == [5] * NUM_CLASSES
    again = load_split("fashion_mnist", "train", cfg, rebuild=True, progress=False)
    np.testing.assert_array_equal(first.images, again.images)
    assert read_manifest("fashion_mnist", "train")["settings"]["max_images_per_split"] == 30


def test_relative_mirror_path_is_taken_from_the_repository_root(monkeypatch, tmp_path):
    from hmlib import paths
    from hmlib.data.sources import mirror_root

    monkeypatch.chdir(tmp_path)  # notebooks run with cwd = notebooks/; the path must not depend on it
    monkeypatch.setenv("HMLIB_DATA_DIR", "../shared/data")
    assert mirror_root(data_cfg()) == (paths.REPO_ROOT / "../shared/data").resolve()


def test_dark_ink_rgb_dataset_comes_out_like_mnist(tmp_path, monkeypatch):
    write_tiny_dataset(tmp_path, "math_shapes", num_classes=3, splits={"train": 12, "test": 6}, mode="RGB",
                       invert=True)
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    images = load_split("math_shapes", "train", data_cfg(), progress=False)
    from datafactory import balanced_labels

    np.testing.assert_array_equal(images.images, class_patterns(balanced_labels(12, 3, 0), 3, 28, seed=0))


def test_flat_image_folder_gets_a_derived_stratified_test_split(tmp_path):
    folder = write_image_folder(tmp_path / "flat", {"": {"a": 10, "b": 10}}, size=(28, 28), mode="L")
    cfg = data_cfg(custom_datasets={"flat": str(folder)}, test_fraction=0.3)
    train = load_split("flat", "train", cfg, progress=False)
    test = load_split("flat", "test", cfg, progress=False)
    assert np.bincount(train.labels).tolist() == [7, 7] and np.bincount(test.labels).tolist() == [3, 3]
    assert read_manifest("flat", "test")["settings"]["derived_split"] == {"from": "train", "test_fraction": 0.3,
                                                                          "split_seed": 0}


def test_sharded_split_reads_every_shard(tmp_path, monkeypatch):
    labels = np.arange(20) % 4
    images = to_pil(class_patterns(labels, 4))
    names = ["a", "b", "c", "d"]
    write_parquet_split(tmp_path / "mnist" / "train-00000-of-00002.parquet", images[:12], labels[:12], names)
    write_parquet_split(tmp_path / "mnist" / "train-00001-of-00002.parquet", images[12:], labels[12:], names)
    write_parquet_split(tmp_path / "mnist" / "test.parquet", images[:8], labels[:8], names)
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    train = load_split("mnist", "train", data_cfg(), progress=False)
    np.testing.assert_array_equal(train.labels, labels)
    assert len(read_manifest("mnist", "train")["source"]["stat"]) == 2
