"""Bad input to the data layer: undecodable rows, broken mirror folders, unsafe names, no hub (tampered caches:
test_data_cache.py; every Pillow mode: test_data_preprocess.py).

Every fault ends either in a usable split (bad rows skipped and listed) or in one DatasetError whose message
names the file, row or key and says how to fix it.
"""
from __future__ import annotations

import io
import time

import datasets
import numpy as np
import pytest
from datafactory import (balanced_labels, class_patterns, png_bytes, to_pil, write_parquet_split, write_raw_rows,
                         write_tiny_dataset)
from PIL import Image

from hmlib.config import load_config
from hmlib.data import DatasetError, TaskSampler, fit_task_size, get_spec, load_split, preview
from hmlib.data.cache import cache_paths, read_manifest
from hmlib.data.preprocess import preprocess_batch, preprocess_images

NUM_ROWS, NUM_CLASSES = 30, 3
NAMES = [f"c{i}" for i in range(NUM_CLASSES)]


def data_cfg(**overrides):
    return load_config("smoke", overrides={"data": {"max_images_per_split": None, **overrides}}).data


def no_hub(monkeypatch):
    """Fail the test if anything asks the hub (a local fault must not fall back to it)."""
    real = datasets.load_dataset

    def local_only(path, *args, **kwargs):
        if path not in ("parquet", "imagefolder"):
            pytest.fail(f"the hub was asked for {path}")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", local_only)


def row_mirror(tmp_path, monkeypatch, replace: dict[int, object] | None = None,
               labels: list[int | None] | None = None):
    """A mirror whose mnist/train.parquet holds NUM_ROWS class-pattern PNGs, with rows replaced as given
    (bytes, path string or None), and a clean test.parquet; returns (train file, true labels, true images)."""
    true_labels = balanced_labels(NUM_ROWS, NUM_CLASSES)
    true_images = class_patterns(true_labels, NUM_CLASSES)
    items = [png_bytes(img) for img in to_pil(true_images)]
    for row, item in (replace or {}).items():
        items[row] = item
    root = tmp_path / "mirror"
    train = write_raw_rows(root / "mnist" / "train.parquet", items,
                           list(true_labels) if labels is None else labels, NAMES)
    write_raw_rows(root / "mnist" / "test.parquet", [png_bytes(img) for img in to_pil(true_images)],
                   list(true_labels), NAMES)
    monkeypatch.setenv("HMLIB_DATA_DIR", str(root))
    return train, true_labels, true_images


# ---------------------------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "relative_path", "missing_file", "empty"])
def test_undecodable_row_is_skipped_listed_and_labels_stay_aligned(tmp_path, monkeypatch, capsys, kind):
    good = png_bytes(to_pil(class_patterns(np.array([0]), NUM_CLASSES))[0])
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0004.png").write_bytes(good)  # exists relative to the cwd: still refused
    monkeypatch.chdir(tmp_path)
    bad, reason = {"corrupt": (b"\x89PNG not really", "UnidentifiedImageError"),
                   "truncated": (good[:len(good) // 2], "truncated"),
                   "relative_path": ("img/0004.png", "relative image path 'img/0004.png'"),
                   "missing_file": (str(tmp_path / "gone.png"), "gone.png"),
                   "empty": (None, "neither image bytes nor a path")}[kind]
    train_file, labels, images = row_mirror(tmp_path, monkeypatch, {4: bad})
    loaded = load_split("mnist", "train", data_cfg(), progress=False)
    keep = np.delete(np.arange(NUM_ROWS), 4)
    np.testing.assert_array_equal(loaded.labels, labels[keep])
    np.testing.assert_array_equal(loaded.images, images[keep])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "skipped 1 of 30 rows" in out and str(train_file) in out and "row 4" in out
    manifest = read_manifest("mnist", "train")
    assert manifest["skipped_rows"] == [4] and reason in manifest["skipped_reasons"]["4"]
    assert manifest["num_images"] == NUM_ROWS - 1 and manifest["class_counts"] == np.bincount(labels[keep]).tolist()
    again = load_split("mnist", "train", data_cfg(), progress=False)  # the cache holds the skipped result
    np.testing.assert_array_equal(again.labels, labels[keep])
    assert capsys.readouterr().out == ""


def test_rows_without_a_usable_label_are_skipped(tmp_path, monkeypatch, capsys):
    true_labels = balanced_labels(NUM_ROWS, NUM_CLASSES)
    given: list[int | None] = list(true_labels)
    given[6], given[8], given[9] = None, -1, NUM_CLASSES  # missing, the hub's 'no label', out of range
    _, labels, images = row_mirror(tmp_path, monkeypatch, labels=given)
    loaded = load_split("mnist", "train", data_cfg(), progress=False)
    keep = np.setdiff1d(np.arange(NUM_ROWS), [6, 8, 9])
    np.testing.assert_array_equal(loaded.labels, labels[keep])
    np.testing.assert_array_equal(loaded.images, images[keep])
    manifest = read_manifest("mnist", "train")
    assert manifest["skipped_rows"] == [6, 8, 9] and manifest["skipped_reasons"]["6"] == "missing label"
    assert "outside 0..2" in manifest["skipped_reasons"]["8"] and "rows 6, 8, 9" in capsys.readouterr().out


def test_every_row_bad_is_an_error_naming_the_file_and_rows(tmp_path, monkeypatch):
    train_file, _, _ = row_mirror(tmp_path, monkeypatch, {i: b"junk" for i in range(NUM_ROWS)})
    with pytest.raises(DatasetError) as err:
        load_split("mnist", "train", data_cfg(), progress=False)
    message = str(err.value)
    assert "none of the 30 rows" in message and str(train_file) in message and "rows 0, 1, 2" in message
    assert "UnidentifiedImageError" in message and "\n" not in message
    assert read_manifest("mnist", "train") is None  # nothing cached


def test_a_few_rows_without_labels_do_not_fail_a_sampled_split(tmp_path, monkeypatch, capsys):
    """A second first-hour audit: with max_images_per_split (the smoke profile), every unlabelled row of the source
    was counted against the sample alone, so a file the default profile loads (a few rows without a label) was
    refused as mostly unusable."""
    given: list[int | None] = list(balanced_labels(NUM_ROWS, NUM_CLASSES))
    given[3] = None  # 1 of 30 rows
    row_mirror(tmp_path, monkeypatch, labels=given)
    loaded = load_split("mnist", "train", data_cfg(max_images_per_split=6), progress=False)
    assert len(loaded.labels) == 6 and "skipped 1 of 30 rows" in capsys.readouterr().out
    given = [None if i % 3 else label for i, label in enumerate(given)]  # 2 of 3 rows: still refused
    row_mirror(tmp_path, monkeypatch, labels=given)
    with pytest.raises(DatasetError, match="rows of .*train.parquet can be used"):
        load_split("mnist", "train", data_cfg(max_images_per_split=6), progress=False, rebuild=True)


def test_mostly_bad_rows_are_an_error(tmp_path, monkeypatch):
    train_file, _, _ = row_mirror(tmp_path, monkeypatch, {i: b"junk" for i in range(NUM_ROWS) if i % 3})
    with pytest.raises(DatasetError, match=r"only 10 of the 30 rows of .*train\.parquet can be used.*rows 1, 2, 4"):
        load_split("mnist", "train", data_cfg(), progress=False)


def test_bad_rows_of_a_derived_split_fall_in_the_split_that_drew_them(tmp_path, monkeypatch):
    labels = balanced_labels(NUM_ROWS, NUM_CLASSES)
    items = [png_bytes(img) for img in to_pil(class_patterns(labels, NUM_CLASSES))]
    for row in (0, 11, 25):
        items[row] = b"junk"
    write_raw_rows(tmp_path / "mnist" / "train.parquet", items, list(labels), NAMES)  # no test split
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    train = load_split("mnist", "train", data_cfg(), progress=False)
    test = load_split("mnist", "test", data_cfg(), progress=False)
    skipped = [read_manifest("mnist", split)["skipped_rows"] for split in ("train", "test")]
    assert sorted(skipped[0] + skipped[1]) == [0, 11, 25] and not set(skipped[0]) & set(skipped[1])
    assert len(train) + len(test) == NUM_ROWS - 3


def test_preprocess_batch_reports_failures_by_position():
    good = to_pil(class_patterns(np.array([0, 1]), 2))
    images, failed = preprocess_batch([good[0], b"junk", good[1], None], 28, progress=False)
    assert images.shape == (2, 28, 28) and sorted(failed) == [1, 3]
    assert failed[1].startswith("UnidentifiedImageError") and "0x" not in failed[1]
    with pytest.raises(ValueError, match="2 of 4 images cannot be decoded; item 1: UnidentifiedImageError"):
        preprocess_images([good[0], b"junk", good[1], None], 28, progress=False)


def test_preview_shows_the_decodable_rows(tmp_path, monkeypatch):
    row_mirror(tmp_path, monkeypatch, {4: b"junk", 5: b"junk"})
    shown = preview("mnist", data_cfg(), num_images=NUM_CLASSES, num_polarity=NUM_ROWS)
    assert 1 <= len(shown.raw) == len(shown.labels) == len(shown.processed) <= NUM_CLASSES
    assert shown.raw_sizes.shape == (NUM_ROWS - 2, 2)  # the polarity sample: every row but the two bad ones


# ---------------------------------------------------------------------------------------------- bad mirror folders


def test_missing_train_split_names_the_folder_and_file(tmp_path, monkeypatch):
    write_tiny_dataset(tmp_path, "mnist", num_classes=NUM_CLASSES, splits={"test": 15})
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    no_hub(monkeypatch)
    with pytest.raises(DatasetError) as err:
        load_split("mnist", "train", data_cfg(), progress=False)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "mnist" / "train.parquet") in message and "holds the split(s) test" \
        in message
    assert len(load_split("mnist", "test", data_cfg(), progress=False)) == 15  # the split that is there still loads


@pytest.mark.parametrize("missing", ["image", "label"])
def test_missing_column_names_the_file_and_the_columns(tmp_path, monkeypatch, missing):
    pictures = [png_bytes(img) for img in to_pil(class_patterns(np.arange(12) % 3, 3))]
    columns = {"image": {"scan_id": list(range(12)), "label": [0, 1, 2] * 4}, "label": {"image": pictures}}[missing]
    for split in ("train", "test"):
        (tmp_path / "mnist").mkdir(exist_ok=True)
        datasets.Dataset.from_dict(columns).to_parquet(str(tmp_path / "mnist" / f"{split}.parquet"))
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    no_hub(monkeypatch)
    with pytest.raises(DatasetError) as err:
        load_split("mnist", "train", data_cfg(), progress=False)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'mnist' / 'train.parquet'}: found no {missing} column among")
    assert "\n" not in message and ("'scan_id'" in message if missing == "image" else "['image']" in message)


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "garbled_pages"])
def test_corrupt_parquet_is_one_line_naming_the_file(tmp_path, monkeypatch, damage):
    write_tiny_dataset(tmp_path, "mnist", num_classes=NUM_CLASSES, splits={"train": 30, "test": 15})
    path = tmp_path / "mnist" / "train.parquet"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "zero_bytes":
        data = bytearray()
    else:  # footer intact, data pages overwritten
        data[100:2000] = np.random.default_rng(0).integers(0, 256, 1900, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    no_hub(monkeypatch)
    with pytest.raises(DatasetError) as err:
        load_split("mnist", "train", data_cfg(), progress=False)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "copy it again" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the raw chain is not shown


def test_corrupt_shard_is_named(tmp_path, monkeypatch):
    labels = np.arange(20) % 4
    images, names = to_pil(class_patterns(labels, 4)), ["a", "b", "c", "d"]
    write_parquet_split(tmp_path / "mnist" / "train-00000-of-00002.parquet", images[:10], labels[:10], names)
    shard = write_parquet_split(tmp_path / "mnist" / "train-00001-of-00002.parquet", images[10:], labels[10:], names)
    shard.write_bytes(shard.read_bytes()[:-20])
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    no_hub(monkeypatch)
    with pytest.raises(DatasetError, match=f"^{shard} is not a readable parquet file"):
        load_split("mnist", "train", data_cfg(), progress=False)


def test_parquet_without_rows_is_an_error(tmp_path, monkeypatch):
    write_raw_rows(tmp_path / "mnist" / "train.parquet", [], [], NAMES)
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match=f"{tmp_path / 'mnist' / 'train.parquet'} holds no rows"):
        load_split("mnist", "train", data_cfg(), progress=False)


def as_mode(grey: np.ndarray, mode: str) -> Image.Image:
    """The same picture in ``mode`` (as a decoder would hand it over)."""
    img = Image.fromarray(grey, mode="L")
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257, mode="I")
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0, mode="F")
    if mode == "1":
        return img.convert("1", dither=Image.Dither.NONE)
    if mode in ("P", "PA"):
        return img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).convert(mode)
    if mode == "YCbCr":
        return Image.merge(mode, [img, Image.new("L", img.size, 128), Image.new("L", img.size, 128)])
    return img.convert(mode)


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("I;16", "PNG"), ("LA", "PNG"),
                                       ("CMYK", "TIFF"), ("CMYK", "JPEG"), ("I", "TIFF"), ("F", "TIFF"),
                                       ("YCbCr", "TIFF"), ("PA", "TIFF"), ("P", "GIF")])
def test_odd_image_modes_in_a_mirror_load_like_grayscale(tmp_path, monkeypatch, mode, fmt):
    labels = balanced_labels(12, NUM_CLASSES)
    grey = class_patterns(labels, NUM_CLASSES)
    encoded = [png_bytes(as_mode(a, mode), fmt) for a in grey]
    assert Image.open(io.BytesIO(encoded[0])).mode == mode
    for split in ("train", "test"):
        write_raw_rows(tmp_path / "mnist" / f"{split}.parquet", encoded, list(labels), NAMES)
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    loaded = load_split("mnist", "train", data_cfg(), progress=False)
    np.testing.assert_array_equal(loaded.labels, labels)
    assert np.corrcoef(loaded.images.ravel().astype(float), grey.ravel().astype(float))[0, 1] > 0.95


def test_single_class_dataset_is_an_error(tmp_path, monkeypatch):
    write_tiny_dataset(tmp_path, "mnist", num_classes=1, splits={"train": 20, "test": 10})
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError) as err:
        load_split("mnist", "train", data_cfg(), progress=False)
    message = str(err.value)
    assert str(tmp_path / "mnist" / "train.parquet") in message and "only class 'class_0'" in message
    assert "at least 2 classes" in message and read_manifest("mnist", "train") is None


def test_fewer_classes_than_a_task_needs_names_the_split_and_the_setting():
    labels = np.arange(30) % 3
    where = "dataset 'mnist' split 'test'"
    for call in (lambda: TaskSampler(labels, 5, 20, where=where), lambda: fit_task_size(labels, 5, 20, where=where)):
        with pytest.raises(DatasetError) as err:
            call()
        message = str(err.value)
        assert "needs 5 classes (task.num_classes)" in message and f"only 3 are in {where}" in message
        assert "lower task.num_classes to at most 3" in message


# ---------------------------------------------------------------------------------------------- dataset names


def files_outside(tmp_path, home) -> set:
    return {p for p in tmp_path.rglob("*") if home not in p.parents and p != home}


@pytest.mark.parametrize("name", ["../../../victim", "ABSOLUTE", "", "a/b", "a\\b", "..", ".hidden", "-rf", "na me",
                                  "x\n", "mnist/../../x"])
def test_unsafe_names_are_refused_and_nothing_is_written_outside_home(tmp_path, monkeypatch, hmlib_home, name):
    victim = write_tiny_dataset(tmp_path, "victim", num_classes=NUM_CLASSES, splits={"train": 30, "test": 15})
    name = str(tmp_path / "elsewhere" / "evil") if name == "ABSOLUTE" else name
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("HMLIB_DATA_DIR", str(tmp_path / "mirror"))  # mirror/../victim would be the victim's folder
    before = files_outside(tmp_path, hmlib_home)
    with pytest.raises(DatasetError, match="invalid (custom )?dataset name"):
        load_split(name, "test", data_cfg(custom_datasets={name: str(victim)}), progress=False)
    with pytest.raises(DatasetError, match="invalid dataset name"):
        load_split(name, "test", data_cfg(), progress=False)
    assert files_outside(tmp_path, hmlib_home) == before


def test_names_that_are_safe_are_accepted(tmp_path):
    folder = write_tiny_dataset(tmp_path, "src", num_classes=NUM_CLASSES, splits={"train": 30, "test": 15})
    for name in ("my-data.v2", "A1_b", "7seg"):
        loaded = load_split(name, "test", data_cfg(custom_datasets={name: str(folder)}), progress=False)
        assert len(loaded) == 15 and cache_paths(name, "test")[0].is_file()


def test_names_are_checked_wherever_they_become_paths(tmp_path):
    with pytest.raises(DatasetError, match="invalid split name '../x'"):
        cache_paths("mnist", "../x")
    with pytest.raises(DatasetError, match="invalid dataset name '/etc'"):
        cache_paths("/etc", "train")
    with pytest.raises(DatasetError, match="invalid custom dataset name '../up'"):
        get_spec("mnist", data_cfg(custom_datasets={"../up": "org/up"}))
    with pytest.raises(DatasetError, match=r"custom_datasets\['blank'\] is empty"):
        get_spec("blank", data_cfg(custom_datasets={"blank": ""}))
    assert get_spec("mine", data_cfg(custom_datasets={"mine": str(tmp_path)})).local_dir == tmp_path  # a path value


# ---------------------------------------------------------------------------------------------- offline hub


def test_hub_only_dataset_offline_is_one_quick_dataset_error(monkeypatch):
    # conftest sets HF_HUB_OFFLINE after `datasets` was imported, as a notebook cell would: it must still count
    before = (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    start = time.perf_counter()
    with pytest.raises(DatasetError) as err:
        load_split("kmnist", "test", data_cfg(), progress=False)
    assert time.perf_counter() - start < 10  # no retries against an unreachable hub
    message = str(err.value)
    assert message.startswith("cannot load dataset 'kmnist' split 'test'") and "tanganke/kmnist" in message
    assert "OfflineModeIsEnabled" in message and "hub only" in message and "Traceback" not in message
    assert err.value.__cause__ is None and err.value.__context__ is None
    assert (datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE) == before  # nothing left changed
