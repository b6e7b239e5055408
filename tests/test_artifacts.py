"""Artifacts: atomic writes, JSON, fingerprints, checkpoints that refuse stale or corrupt files, load_or_build."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hmlib.artifacts import (SCHEMA_VERSION, ArtifactError, MissingArtifactError, StaleArtifactError, atomic_path,
                             check_meta, file_sha256, fingerprint, load_checkpoint, load_or_build, named_path,
                             read_json, refuse_overwrite, save_checkpoint, set_aside, settings_diff,
                             state_fingerprint, write_json)

STATE = {"layer.weight": torch.arange(6.0).reshape(2, 3), "layer.bias": torch.tensor([0.5, -1.0])}
META = {"kind": "hypernet", "config": {"latent_dim": 16, "hidden": [64]}, "upstream": "abc123"}


def _leftovers(folder: Path) -> list[Path]:
    return list(folder.glob(".hmlib-tmp-*"))


class _Builder:
    """A ``build`` callable for load_or_build that writes STATE with ``meta`` and counts its calls."""

    def __init__(self, path: Path, meta: dict, fail: bool = False) -> None:
        self.path, self.meta, self.fail, self.calls = path, meta, fail, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("training diverged")
        save_checkpoint(self.path, STATE, self.meta)


@pytest.fixture
def folder(tmp_path) -> Path:
    """An empty folder of its own (tmp_path also holds the autouse HMLIB_HOME)."""
    path = tmp_path / "artifacts"
    path.mkdir()
    return path


# ------------------------------------------------------------------------------------ writes and JSON

def test_atomic_path_renames_on_success(tmp_path):
    """Nothing is visible at the target until the block succeeds; no temporary file is left."""
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done" and not _leftovers(target.parent)


def test_atomic_path_failure_keeps_old_file_and_leaves_nothing(tmp_path):
    """An interrupted write keeps the previous file and deletes its temporary file."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and not _leftovers(tmp_path)


def test_json_round_trip_with_numpy_and_paths(tmp_path):
    """numpy values and paths become JSON primitives; keys are sorted."""
    path = write_json(tmp_path / "r.json", {"b": np.arange(3), "a": np.float32(0.5), "p": Path("/x")})
    assert read_json(path) == {"a": 0.5, "b": [0, 1, 2], "p": "/x"}
    assert list(json.loads(path.read_text())) == ["a", "b", "p"]


def test_json_errors(tmp_path):
    """Missing or corrupt JSON is an ArtifactError; an unserialisable value writes nothing."""
    with pytest.raises(ArtifactError, match="missing file"):
        read_json(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(ArtifactError, match="corrupt"):
        read_json(tmp_path / "bad.json")
    with pytest.raises(TypeError):
        write_json(tmp_path / "obj.json", {"x": object()})
    assert not (tmp_path / "obj.json").exists() and not _leftovers(tmp_path)


def test_fingerprint_is_stable_and_sensitive():
    """Same parts, same hash (dict order ignored); other parts or order of parts, other hash."""
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint("x", "y") != fingerprint("y", "x")
    assert len(fingerprint("x")) == 16 and int(fingerprint("x"), 16) >= 0


def test_file_sha256_matches_hashlib(tmp_path):
    """The chunked file hash equals hashlib's over the whole content."""
    data = bytes(range(256)) * 5000
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin", chunk=4096) == hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ checkpoints

def test_checkpoint_round_trip(tmp_path):
    """State and meta come back exactly; expected keys that match pass."""
    path = save_checkpoint(tmp_path / "m.pt", STATE, META)
    state, meta = load_checkpoint(path, expected_meta={"kind": "hypernet", "upstream": "abc123"})
    assert meta == META and set(state) == set(STATE)
    assert all(torch.equal(state[k], STATE[k]) for k in STATE)
    assert not _leftovers(tmp_path)


def test_tuples_and_lists_compare_equal_in_meta(tmp_path):
    """A tuple expected where a list was recorded is not a difference (JSON-normalised)."""
    save_checkpoint(tmp_path / "m.pt", STATE, META)
    load_checkpoint(tmp_path / "m.pt", expected_meta={"config": {"latent_dim": 16, "hidden": (64,)}})


def test_stale_checkpoint_names_every_differing_key(tmp_path):
    """The error lists each differing key with both values, absent keys included, and not the matching ones."""
    save_checkpoint(tmp_path / "m.pt", STATE, META)
    with pytest.raises(StaleArtifactError) as err:
        load_checkpoint(tmp_path / "m.pt", expected_meta={"upstream": "zzz", "kind": "hypernet", "seed": 3})
    text = str(err.value)
    assert "upstream: recorded \"abc123\", expected \"zzz\"" in text
    assert "seed: recorded \"<absent>\"" in text and "kind" not in text.split("inputs:")[1]


def test_check_meta_passes_on_match_and_fails_on_nested_difference():
    """check_meta is silent on a match and names a nested difference by its dotted key."""
    check_meta(META, {"config": {"latent_dim": 16, "hidden": [64]}}, "x")
    with pytest.raises(StaleArtifactError, match=r"config\.latent_dim: recorded 16, expected 32"):
        check_meta(META, {"config": {"latent_dim": 32, "hidden": [64]}}, "x")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, content, monkeypatch):
    """Garbage among the home's models is an ArtifactError that says what to do."""
    monkeypatch.setenv("HMLIB_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bad.pt").write_bytes(content)
    with pytest.raises(ArtifactError, match="corrupt or not an hmlib checkpoint.*delete it"):
        load_checkpoint(tmp_path / "models" / "bad.pt")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    """Half a checkpoint is reported as corrupt."""
    path = save_checkpoint(tmp_path / "m.pt", STATE, META)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="corrupt"):
        load_checkpoint(path)


def test_missing_foreign_and_old_schema_checkpoints(tmp_path):
    """Absent, foreign (no meta/state) and other-schema files are told apart."""
    with pytest.raises(ArtifactError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ArtifactError, match="not an hmlib checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"schema_version": SCHEMA_VERSION + 1, "meta": {}, "state": {}}, tmp_path / "future.pt")
    with pytest.raises(StaleArtifactError, match="schema version"):
        load_checkpoint(tmp_path / "future.pt")


class _Evil:
    """Unpickling this runs code: weights_only loading must refuse it before it can."""

    ran = False

    def __reduce__(self):
        return (_mark_evil_ran, ())


def _mark_evil_ran() -> None:
    _Evil.ran = True


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    """A checkpoint whose pickle would execute code is refused (weights_only) and the code never runs."""
    torch.save({"schema_version": SCHEMA_VERSION, "meta": {"x": _Evil()}, "state": {}}, tmp_path / "evil.pt")
    _Evil.ran = False
    with pytest.raises(ArtifactError, match="corrupt or not an hmlib checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not _Evil.ran


def test_a_file_that_is_not_a_checkpoint_gets_advice_fit_for_whose_it_is(tmp_path, monkeypatch):
    """Torch's "re-run torch.load with weights_only=False" is never passed on, and "delete it to retrain" is said of
    a .pt in this home's models/ only: a user's own file (or the pipeline manifest) is not ours to delete."""
    monkeypatch.setenv("HMLIB_HOME", str(tmp_path / "home"))
    torch.save({"schema_version": SCHEMA_VERSION, "meta": {"x": _Evil()}, "state": {}}, tmp_path / "evil.pt")
    with pytest.raises(ArtifactError) as err:
        load_checkpoint(tmp_path / "evil.pt")
    assert "objects other than tensors" in str(err.value) and "weights_only" not in str(err.value)
    assert "delete" not in str(err.value)
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    for name in ("photo.png", "pipeline.json", "garbage.pt"):
        for folder in (tmp_path, models):
            (folder / name).write_bytes(b"not a checkpoint")
            with pytest.raises(ArtifactError, match="corrupt or not an hmlib checkpoint") as err:
                load_checkpoint(folder / name)
            assert ("delete it to retrain" in str(err.value)) == (folder == models and name == "garbage.pt")


def test_failed_save_leaves_old_checkpoint_and_no_temp(tmp_path):
    """A save that fails half-way keeps the previous checkpoint byte for byte."""
    path = save_checkpoint(tmp_path / "m.pt", STATE, META)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"fn": lambda x: x}, META)  # lambdas cannot be pickled
    assert path.read_bytes() == before and not _leftovers(tmp_path)


# ------------------------------------------------------------------------------------ settings_diff

def test_settings_diff_names_nested_keys_with_dots():
    """Every differing leaf is named by its dotted path, with recorded and expected values."""
    recorded = {"kind": "vae", "settings": {"lr": 0.001, "model": {"depth": 2, "widths": [8, 16]}}, "seed": 0}
    expected = {"kind": "vae", "settings": {"lr": 0.002, "model": {"depth": 2, "widths": (8, 32)}}, "seed": 0}
    assert settings_diff(recorded, expected) == ["settings.lr: recorded 0.001, expected 0.002",
                                                 "settings.model.widths: recorded [8, 16], expected [8, 32]"]
    assert settings_diff(recorded, {"kind": "vae", "seed": 0}) == []


def test_settings_diff_absent_keys_and_extra_recorded_keys():
    """Expected-but-absent and recorded-but-unexpected nested keys differ; unasked top-level keys are ignored."""
    recorded = {"settings": {"lr": 0.1, "extra": 1}, "timing": 3.2}
    diffs = settings_diff(recorded, {"settings": {"lr": 0.1}, "seed": 4})
    assert diffs == ['seed: recorded "<absent>", expected 4', 'settings.extra: recorded 1, expected "<absent>"']


# ------------------------------------------------------------------------------------ state_fingerprint

def test_state_fingerprint_identifies_the_weights():
    """Same tensors give the same id whatever the dict order; any change of value, dtype, shape or name differs."""
    same = {k: v.clone() for k, v in reversed(list(STATE.items()))}
    assert list(same) != list(STATE) and state_fingerprint(same) == state_fingerprint(STATE)
    base = state_fingerprint(STATE)
    nudged = {**STATE, "layer.bias": STATE["layer.bias"] + torch.tensor([0.0, 1e-6])}
    assert state_fingerprint(nudged) != base
    assert state_fingerprint({**STATE, "layer.bias": STATE["layer.bias"].double()}) != base
    assert state_fingerprint({**STATE, "layer.weight": STATE["layer.weight"].reshape(3, 2)}) != base
    assert state_fingerprint({"other.weight": STATE["layer.weight"], "layer.bias": STATE["layer.bias"]}) != base
    assert len(base) == 16


def test_state_fingerprint_ignores_layout_and_grad():
    """A non-contiguous view and a tensor that requires grad hash like their plain copies."""
    weight = STATE["layer.weight"].t().contiguous().t()  # non-contiguous, same values
    assert not weight.is_contiguous()
    assert state_fingerprint({**STATE, "layer.weight": weight}) == state_fingerprint(STATE)
    grad = {k: v.clone().requires_grad_() for k, v in STATE.items()}
    assert state_fingerprint(grad) == state_fingerprint(STATE)


# ------------------------------------------------------------------------------------ names and files

def test_named_path_hashes_the_identity(tmp_path):
    """Same identity, same file; a different identity (any nested setting), another file with the same stem."""
    a = named_path(tmp_path, "vae_shared", {"seed": 0, "settings": {"lr": 0.1}})
    assert a == named_path(tmp_path, "vae_shared", {"settings": {"lr": 0.1}, "seed": 0})
    b = named_path(tmp_path, "vae_shared", {"seed": 0, "settings": {"lr": 0.2}})
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith("vae_shared-") and a.suffix == ".pt" and len(a.stem) == len("vae_shared-") + 8
    assert named_path(tmp_path, "x", {"a": 1}, suffix=".npz").suffix == ".npz"


def test_set_aside_renames_and_numbers(tmp_path):
    """The file is renamed (content kept), never deleted; a second one gets the next number; nothing -> None."""
    path = tmp_path / "vae-1234.pt"
    path.write_bytes(b"first")
    moved = set_aside(path, "corrupt")
    assert moved == tmp_path / "vae-1234.corrupt-1.pt" and moved.read_bytes() == b"first" and not path.exists()
    path.write_bytes(b"second")
    assert set_aside(path, "corrupt") == tmp_path / "vae-1234.corrupt-2.pt"
    assert (tmp_path / "vae-1234.corrupt-1.pt").read_bytes() == b"first"
    assert set_aside(path, "corrupt") is None


def test_refuse_overwrite(tmp_path):
    """A new path is fine; an existing file needs overwrite=True; a folder is never a file."""
    path = tmp_path / "report.html"
    assert refuse_overwrite(path, overwrite=False) == path
    path.write_text("x")
    with pytest.raises(ArtifactError, match="exists.*--overwrite"):
        refuse_overwrite(path, overwrite=False, what="report")
    assert refuse_overwrite(path, overwrite=True) == path
    with pytest.raises(ArtifactError, match="is a folder"):
        refuse_overwrite(tmp_path, overwrite=True)


# ------------------------------------------------------------------------------------ load_or_build

def test_load_or_build_builds_then_reuses(folder, capsys):
    """A missing artifact is built; a matching one is reused without building."""
    path = folder / "m.pt"
    build = _Builder(path, META)
    state, meta, reused = load_or_build(path, META, build, what="model")
    assert (build.calls, reused, meta) == (1, False, META) and torch.equal(state["layer.bias"], STATE["layer.bias"])
    state, meta, reused = load_or_build(path, META, build, what="model")
    assert (build.calls, reused, meta) == (1, True, META)
    assert "Reusing model m.pt" in capsys.readouterr().out


def test_load_or_build_sets_stale_aside_and_rebuilds(folder, capsys):
    """A checkpoint of other settings is renamed '.stale-1' (not deleted) and a new one is built."""
    path = folder / "m.pt"
    save_checkpoint(path, STATE, {**META, "upstream": "old"})
    before = path.read_bytes()
    build = _Builder(path, META)
    _, meta, reused = load_or_build(path, META, build, what="model")
    assert (build.calls, reused, meta["upstream"]) == (1, False, "abc123")
    assert (folder / "m.stale-1.pt").read_bytes() == before
    assert "upstream: recorded" in capsys.readouterr().out


def test_load_or_build_sets_other_schema_aside(folder):
    """A checkpoint of another schema version is stale: set aside and rebuilt."""
    path = folder / "m.pt"
    torch.save({"schema_version": SCHEMA_VERSION - 1, "meta": META, "state": STATE}, path)
    build = _Builder(path, META)
    _, _, reused = load_or_build(path, META, build)
    assert build.calls == 1 and not reused and (folder / "m.stale-1.pt").is_file()


def test_load_or_build_sets_corrupt_aside_and_rebuilds(folder):
    """A corrupt checkpoint is renamed '.corrupt-1' with its bytes and a new one is built."""
    path = folder / "m.pt"
    path.write_bytes(b"garbage")
    build = _Builder(path, META)
    _, _, reused = load_or_build(path, META, build)
    assert build.calls == 1 and not reused
    assert (folder / "m.corrupt-1.pt").read_bytes() == b"garbage"
    assert load_checkpoint(path)[1] == META


def test_load_or_build_never_refuses_to_build(folder):
    """retrain='never' names the file and the command to make it, builds nothing and moves nothing."""
    path = folder / "m.pt"
    build = _Builder(path, META)
    with pytest.raises(MissingArtifactError, match=r"m\.pt not found; make it with: hmlib run --only 02"):
        load_or_build(path, META, build, retrain="never", how_to_make="hmlib run --only 02")
    path.write_bytes(b"garbage")
    with pytest.raises(MissingArtifactError, match="cannot be reused"):
        load_or_build(path, META, build, retrain="never")
    assert build.calls == 0 and path.read_bytes() == b"garbage" and len(list(folder.iterdir())) == 1
    save_checkpoint(path, STATE, META)
    assert load_or_build(path, META, build, retrain="never")[2] is True  # a match is still reused


def test_load_or_build_allow_build_false(folder):
    """allow_build=False behaves like 'never': a MissingArtifactError, nothing built or moved."""
    path = folder / "m.pt"
    build = _Builder(path, META)
    with pytest.raises(MissingArtifactError, match="make it with: cmd"):
        load_or_build(path, META, build, allow_build=False, how_to_make="cmd")
    save_checkpoint(path, STATE, {**META, "upstream": "old"})
    with pytest.raises(MissingArtifactError, match="cannot be reused"):
        load_or_build(path, META, build, allow_build=False)
    assert build.calls == 0 and sorted(p.name for p in folder.iterdir()) == ["m.pt"]


def test_load_or_build_always_keeps_the_previous_beside(folder):
    """retrain='always' rebuilds a matching checkpoint and keeps the old one as '.previous-1'."""
    path = folder / "m.pt"
    save_checkpoint(path, STATE, {**META, "note": "old run"})
    before = path.read_bytes()
    build = _Builder(path, META)
    _, meta, reused = load_or_build(path, META, build, retrain="always")
    assert build.calls == 1 and not reused and "note" not in meta
    assert (folder / "m.previous-1.pt").read_bytes() == before


def test_load_or_build_failed_rebuild_keeps_the_previous_in_place(folder):
    """retrain='always' whose build fails leaves the previous checkpoint where it was, unchanged."""
    path = folder / "m.pt"
    save_checkpoint(path, STATE, META)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="diverged"):
        load_or_build(path, META, _Builder(path, META, fail=True), retrain="always")
    assert path.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["m.pt"]
    assert load_or_build(path, META, _Builder(path, META), retrain="never")[2] is True
