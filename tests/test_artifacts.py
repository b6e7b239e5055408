"""Artifacts: atomic writes, JSON, fingerprints, checkpoints that refuse stale or corrupt files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hmlib.artifacts import (SCHEMA_VERSION, ArtifactError, StaleArtifactError, atomic_path, check_meta,
                             file_sha256, fingerprint, load_checkpoint, read_json, save_checkpoint, write_json)

STATE = {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.tensor([0.5, -1.0])}
META = {"kind": "hypernet", "config": {"latent_dim": 16, "hidden": [64]}, "upstream": "abc123"}


def _leftovers(folder: Path) -> list[Path]:
    return list(folder.glob(".hmlib-tmp-*"))


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("done")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_text() == "done" and not _leftovers(target.parent)


def test_atomic_path_failure_keeps_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and not _leftovers(tmp_path)


def test_json_round_trip_with_numpy_and_paths(tmp_path):
    path = write_json(tmp_path / "r.json", {"b": np.arange(3), "a": np.float32(0.5), "p": Path("/x")})
    assert read_json(path) == {"a": 0.5, "b": [0, 1, 2], "p": "/x"}
    assert list(json.loads(path.read_text())) == ["a", "b", "p"]  # sorted keys: stable diffs


def test_json_errors(tmp_path):
    with pytest.raises(ArtifactError, match="missing file"):
        read_json(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ArtifactError, match="corrupt"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(TypeError):
        write_json(tmp_path / "obj.json", {"x": object()})
    assert not (tmp_path / "obj.json").exists() and not _leftovers(tmp_path)


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint("x", "y") != fingerprint("y", "x")
    assert len(fingerprint("x")) == 16 and int(fingerprint("x"), 16) >= 0


def test_file_sha256_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 5000
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin", chunk=4096) == hashlib.sha256(data).hexdigest()


def test_checkpoint_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", STATE, META)
    state, meta = load_checkpoint(path, expected_meta={"kind": "hypernet", "upstream": "abc123"})
    assert meta == META and set(state) == set(STATE)
    assert all(torch.equal(state[k], STATE[k]) for k in STATE)
    assert not _leftovers(tmp_path)


def test_tuples_and_lists_compare_equal_in_meta(tmp_path):
    save_checkpoint(tmp_path / "m.pt", STATE, META)
    load_checkpoint(tmp_path / "m.pt", expected_meta={"config": {"latent_dim": 16, "hidden": (64,)}})


def test_stale_checkpoint_names_every_differing_key(tmp_path):
    save_checkpoint(tmp_path / "m.pt", STATE, META)
    with pytest.raises(StaleArtifactError) as err:
        load_checkpoint(tmp_path / "m.pt", expected_meta={"upstream": "zzz", "kind": "hypernet", "seed": 3})
    text = str(err.value)
    assert "upstream: recorded \"abc123\", expected \"zzz\"" in text
    assert "seed: recorded \"<absent>\"" in text and "kind" not in text.split("inputs:")[1]


def test_check_meta_passes_on_match_and_fails_on_nested_difference():
    check_meta(META, {"config": {"latent_dim": 16, "hidden": [64]}}, "x")
    with pytest.raises(StaleArtifactError, match="config"):
        check_meta(META, {"config": {"latent_dim": 32, "hidden": [64]}}, "x")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content):
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(ArtifactError, match="corrupt or not an hmlib checkpoint.*delete it"):
        load_checkpoint(tmp_path / "bad.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", STATE, META)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_checkpoint(path)


def test_missing_foreign_and_old_schema_checkpoints(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ArtifactError, match="not an hmlib checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"schema_version": SCHEMA_VERSION + 1, "meta": {}, "state": {}}, tmp_path / "future.pt")
    with pytest.raises(StaleArtifactError, match="schema version"):
        load_checkpoint(tmp_path / "future.pt")


class _Evil:
    """Arbitrary pickled object: weights_only loading must refuse it."""


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save({"schema_version": SCHEMA_VERSION, "meta": {"x": _Evil()}, "state": {}}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError, match="corrupt or not an hmlib checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")


def test_failed_save_leaves_old_checkpoint_and_no_temp(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", STATE, META)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"fn": lambda x: x}, META)  # lambdas cannot be pickled
    assert path.read_bytes() == before and not _leftovers(tmp_path)
