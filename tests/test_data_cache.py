"""The preprocessed-image cache: stale settings or sources, and tampered arrays, are rebuilt with a message;
writes are atomic."""
from __future__ import annotations

import json

import numpy as np
import pytest
from datafactory import write_tiny_dataset

import hmlib.data.cache as cache
from hmlib.config import load_config
from hmlib.data import DatasetError, cache_status, load_split
from hmlib.data.cache import CACHE_SCHEMA, cache_paths, content_sha256, read_manifest


def data_cfg(**overrides):
    return load_config("smoke", overrides={"data": {"max_images_per_split": None, **overrides}}).data


@pytest.mark.parametrize("change", [{"polarity": "keep"}, {"max_images_per_split": 9}])  # image_size is fixed at 28
def test_changed_settings_rebuild_with_a_message(mirror, capsys, change):
    before = load_split("mnist", "train", data_cfg(), progress=False)
    capsys.readouterr()
    after = load_split("mnist", "train", data_cfg(**change), progress=False)
    out = capsys.readouterr().out
    assert "stale" in out and next(iter(change)) in out
    assert after.fingerprint != before.fingerprint
    assert read_manifest("mnist", "train")["settings"][next(iter(change))] == next(iter(change.values()))


@pytest.mark.parametrize("name", ["mnist", "mnist+shear"])  # a shifted dataset is rebuilt when its base is
def test_changed_source_rebuilds(mirror, capsys, name):
    before = load_split(name, "test", data_cfg(), progress=False)
    write_tiny_dataset(mirror, "mnist", num_classes=3, splits={"train": 30, "test": 15}, seed=99)  # new pixels
    capsys.readouterr()
    after = load_split(name, "test", data_cfg(), progress=False)
    out = capsys.readouterr().out
    assert "source changed" in out and (name == "mnist" or f"cache of {name}/test is stale" in out)
    assert after.fingerprint != before.fingerprint and not np.array_equal(after.images, before.images)


def test_unchanged_cache_is_reused_silently(mirror, capsys):
    load_split("mnist", "train", data_cfg(), progress=False)
    capsys.readouterr()
    load_split("mnist", "train", data_cfg(), progress=False)
    assert capsys.readouterr().out == ""


def test_rebuild_flag_forces_a_rebuild(mirror, monkeypatch):
    load_split("mnist", "train", data_cfg(), progress=False)
    built = []
    original = cache.write_cache
    monkeypatch.setattr(cache, "write_cache", lambda *a, **k: built.append(a[:2]) or original(*a, **k))
    load_split("mnist", "train", data_cfg(), rebuild=True, progress=False)
    assert built == [("mnist", "train")]


def test_interrupted_write_leaves_no_cache(mirror, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-write")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        load_split("mnist", "train", data_cfg(), progress=False)
    arrays_path, manifest_path = cache_paths("mnist", "train")
    assert not arrays_path.exists() and not manifest_path.exists()
    assert list(arrays_path.parent.glob("*")) == []  # no temporary file left behind either


def test_corrupt_cache_is_rebuilt(mirror, capsys):
    good = load_split("mnist", "train", data_cfg(), progress=False)
    arrays_path, _ = cache_paths("mnist", "train")
    arrays_path.write_bytes(arrays_path.read_bytes()[:100])  # truncated file
    capsys.readouterr()
    again = load_split("mnist", "train", data_cfg(), progress=False)
    assert "corrupt" in capsys.readouterr().out
    np.testing.assert_array_equal(again.images, good.images)


def test_cache_without_its_source_is_still_used(mirror, monkeypatch):
    first = load_split("mnist", "train", data_cfg(), progress=False)
    monkeypatch.delenv("HMLIB_DATA_DIR")
    assert load_split("mnist", "train", data_cfg(), progress=False).fingerprint == first.fingerprint


@pytest.fixture
def cached_mnist(mirror):
    """The private mirror and a built cache of mnist/train; returns the loaded ImageSet."""
    return load_split("mnist", "train", data_cfg(), progress=False)


def rewrite_arrays(change: str) -> None:
    """Change the cached arrays in place, keeping the fingerprint stored beside them."""
    arrays_path, _ = cache_paths("mnist", "train")
    with np.load(arrays_path) as data:
        images, labels, stored = data["images"], data["labels"], data["fingerprint"]
    if change == "shuffled_rows":
        order = np.random.default_rng(1).permutation(labels.shape[0])
        images, labels = images[order], labels[order]
    elif change == "zeroed_pixels":
        images = np.zeros_like(images)
    elif change == "relabelled":
        labels = np.roll(labels, 1)
    with open(arrays_path, "wb") as fh:
        np.savez(fh, images=images, labels=labels, fingerprint=stored)


def test_manifest_records_the_content_hash(cached_mnist):
    manifest = read_manifest("mnist", "train")
    assert manifest["schema"] == CACHE_SCHEMA and manifest["skipped_rows"] == []
    assert manifest["content_sha256"] == content_sha256(cached_mnist.images, cached_mnist.labels)


@pytest.mark.parametrize("change", ["shuffled_rows", "zeroed_pixels", "relabelled"])
def test_tampered_cache_is_detected_and_rebuilt(cached_mnist, capsys, change):
    rewrite_arrays(change)
    capsys.readouterr()
    again = load_split("mnist", "train", data_cfg(), progress=False)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "corrupt" in out and "content hash" in out and "rebuilding" in out
    np.testing.assert_array_equal(again.images, cached_mnist.images)
    np.testing.assert_array_equal(again.labels, cached_mnist.labels)
    load_split("mnist", "train", data_cfg(), progress=False)
    assert capsys.readouterr().out == ""  # the rebuilt cache is whole again


def test_tampered_cache_without_a_source_is_an_error(cached_mnist, monkeypatch):
    rewrite_arrays("zeroed_pixels")
    monkeypatch.delenv("HMLIB_DATA_DIR")
    with pytest.raises(DatasetError) as err:
        load_split("mnist", "train", data_cfg(use_hub=False), progress=False)
    message = str(err.value)
    arrays_path, manifest_path = cache_paths("mnist", "train")
    assert message.splitlines()[0].endswith("its cache is corrupt and no source can rebuild it; looked in:")
    assert f"{arrays_path} (corrupt:" in message and str(manifest_path) in message and "HMLIB_DATA_DIR" in message


def test_cache_without_a_content_hash_is_stale(cached_mnist, capsys):
    _, manifest_path = cache_paths("mnist", "train")
    manifest = json.loads(manifest_path.read_text())
    manifest["schema"] = 1
    del manifest["content_sha256"]
    manifest_path.write_text(json.dumps(manifest))
    rewrite_arrays("zeroed_pixels")  # an old cache is not trusted, whatever it holds
    capsys.readouterr()
    again = load_split("mnist", "train", data_cfg(), progress=False)
    out = capsys.readouterr().out
    assert "stale" in out and "schema 1 != 2" in out
    np.testing.assert_array_equal(again.images, cached_mnist.images)
    assert read_manifest("mnist", "train")["schema"] == 2


def test_unreadable_manifest_is_shown_as_not_cached(cached_mnist):
    cache_paths("mnist", "train")[1].write_text("{ not json")
    rows = {(r["dataset"], r["split"]): r for r in cache_status(["mnist"])}
    assert rows["mnist", "train"]["cached"] is False and rows["mnist", "test"]["cached"] is False
