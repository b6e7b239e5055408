"""The preprocessed-image cache: stale settings or sources are rebuilt with a message; writes are atomic."""
from __future__ import annotations

import numpy as np
import pytest
from datafactory import write_tiny_dataset

import hmlib.data.cache as cache
from hmlib.config import load_config
from hmlib.data import load_split
from hmlib.data.cache import cache_paths, read_manifest


def data_cfg(**overrides):
    return load_config("smoke", overrides={"data": {"max_images_per_split": None, **overrides}}).data


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A private mirror (this test may rewrite it) holding a tiny 'mnist'."""
    root = tmp_path / "mirror"
    write_tiny_dataset(root, "mnist", num_classes=3, splits={"train": 30, "test": 15})
    monkeypatch.setenv("HMLIB_DATA_DIR", str(root))
    return root


@pytest.mark.parametrize("change", [{"polarity": "keep"}, {"image_size": 16}, {"max_images_per_split": 9}])
def test_changed_settings_rebuild_with_a_message(mirror, capsys, change):
    before = load_split("mnist", "train", data_cfg(), progress=False)
    capsys.readouterr()
    after = load_split("mnist", "train", data_cfg(**change), progress=False)
    out = capsys.readouterr().out
    assert "stale" in out and next(iter(change)) in out
    assert after.fingerprint != before.fingerprint
    assert read_manifest("mnist", "train")["settings"][next(iter(change))] == next(iter(change.values()))


def test_changed_source_rebuilds(mirror, capsys):
    before = load_split("mnist", "test", data_cfg(), progress=False)
    write_tiny_dataset(mirror, "mnist", num_classes=3, splits={"train": 30, "test": 15}, seed=99)  # new pixels
    capsys.readouterr()
    after = load_split("mnist", "test", data_cfg(), progress=False)
    assert "source changed" in capsys.readouterr().out
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
