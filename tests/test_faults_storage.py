"""Fault pass (issue 19): a full, read-only or foreign disk is one line naming the path and the fix, not a bug.

Tests run as root in CI, where ``chmod`` stops nothing, so read-only folders and full disks are SIMULATED by
monkeypatching the call that would fail (``tempfile.mkstemp``, ``os.replace``, ``Path.mkdir``, the file torch
writes into). Where this machine lets us mount a tiny tmpfs, the last test also uses a really full file system
(skipped elsewhere: the simulated cases cover the same code). ``hmlib run``'s checks are in ``test_faults_run``.
"""
from __future__ import annotations

import builtins
import errno
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from hmlib import artifacts, cli, runner
from hmlib.artifacts import (MIN_FREE_BYTES, atomic_path, check_writable, load_checkpoint, save_checkpoint,
                             set_aside, write_json)
from hmlib.errors import HmlibError, StorageError

DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC: a real full disk in one file


def _fail_under(monkeypatch, folder: Path, code: int, target=tempfile, name: str = "mkstemp") -> None:
    """Make ``target.name`` raise OSError(code) for calls whose ``dir`` (or first argument) lies under ``folder``."""
    real = getattr(target, name)

    def failing(*args, **kwargs):
        where = str(kwargs.get("dir") or (args[0] if args else ""))
        if where.startswith(str(folder)):
            raise OSError(code, os.strerror(code), where)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def _one_error_line(capsys, prefix="hmlib: error: ") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


# ------------------------------------------------------------------------------------ artifacts' writers

def test_full_disk_at_the_rename_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "results" / "eval.json"
    write_json(target, {"old": True})
    _fail_under(monkeypatch, tmp_path, errno.ENOSPC, os, "replace")
    with pytest.raises(StorageError) as err:
        write_json(target, {"new": True})
    assert str(err.value) == (f"cannot write {target}: no space left on the disk (ENOSPC); free space on that disk, "
                              "or choose a writable folder on a disk with room")
    assert isinstance(err.value, HmlibError) and isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert artifacts.read_json(target) == {"old": True}
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".hmlib-tmp-")]


def test_read_only_artifact_home_names_hmlib_home_as_the_fix(hmlib_home, monkeypatch):
    _fail_under(monkeypatch, hmlib_home, errno.EROFS)
    target = hmlib_home / "models" / "vae.pt"
    with pytest.raises(StorageError, match=r"^cannot write .*/models/vae\.pt: the file system is read-only \(EROFS\); "
                                           r"set HMLIB_HOME to a writable folder with room$"):
        save_checkpoint(target, {"w": torch.zeros(2)}, {"kind": "vae"})


def test_permission_denied_on_the_folder(tmp_path, monkeypatch):
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(StorageError, match=r"permission denied \(EACCES\); make it writable for this user, or"):
        with atomic_path(tmp_path / "locked" / "sub" / "x.txt") as tmp:
            tmp.write_text("x")


def test_quota_exceeded_while_writing_the_body(tmp_path):
    with pytest.raises(StorageError, match=r"disk quota exceeded \(EDQUOT\)"):
        with atomic_path(tmp_path / "q" / "x.json") as tmp:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert list((tmp_path / "q").iterdir()) == []


def test_an_error_reading_another_file_inside_the_block_is_not_blamed_on_the_write(tmp_path):
    with pytest.raises(PermissionError):
        with atomic_path(tmp_path / "x.json"):
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/somewhere/else")


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full")
def test_torch_save_into_a_full_disk_is_a_storage_error_not_unexpected_pos(tmp_path, monkeypatch):
    """The file torch writes into is /dev/full: a real ENOSPC from torch's own writer (before: 'unexpected pos')."""
    monkeypatch.setattr(artifacts, "open", lambda path, mode="r", *a, **k: builtins.open(DEV_FULL, mode, *a, **k),
                        raising=False)
    target = tmp_path / "models" / "big.pt"
    with pytest.raises(StorageError, match=r"no space left on the disk \(ENOSPC\)") as err:
        save_checkpoint(target, {"w": torch.zeros(1 << 16)}, {"kind": "test"})
    assert str(target) in str(err.value) and "unexpected pos" not in str(err.value)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_torch_write_failure_without_an_errno_is_still_a_storage_error(tmp_path, monkeypatch):
    def save(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(artifacts.torch, "save", save)
    with pytest.raises(StorageError, match=r"cannot write .*x\.pt: torch\.save failed part-way \(\[enforce fail .*"
                                           r"unexpected pos 768 vs 662; [0-9.]+ MiB free on the disk\); free space"):
        save_checkpoint(tmp_path / "x.pt", {}, {})


def test_other_torch_errors_stay_bugs(tmp_path, monkeypatch):
    def save(obj, f, *args, **kwargs):
        raise RuntimeError("Can't pickle local object")

    monkeypatch.setattr(artifacts.torch, "save", save)
    with pytest.raises(RuntimeError, match="pickle") as err:
        save_checkpoint(tmp_path / "x.pt", {}, {})
    assert not isinstance(err.value, StorageError)


def test_set_aside_on_a_read_only_disk(tmp_path, monkeypatch):
    path = tmp_path / "old.pt"
    path.write_bytes(b"x")
    _fail_under(monkeypatch, tmp_path, errno.EROFS, os, "replace")
    with pytest.raises(StorageError, match="read-only"):
        set_aside(path, "stale")
    assert path.read_bytes() == b"x"


# ------------------------------------------------------------------------------------ check_writable

def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    folder = tmp_path / "a" / "b"
    assert check_writable(folder) == folder.resolve() and list(folder.iterdir()) == []


@pytest.mark.parametrize("code, words", [(errno.EROFS, "the file system is read-only (EROFS); choose another --out"),
                                         (errno.EACCES, "permission denied (EACCES); make it writable for this "
                                                        "user, or choose another --out"),
                                         (errno.ENOSPC, "no space left on the disk (ENOSPC); free space on that "
                                                        "disk, or choose another --out")])
def test_check_writable_refuses_with_the_fix(tmp_path, monkeypatch, code, words):
    _fail_under(monkeypatch, tmp_path, code)
    with pytest.raises(StorageError) as err:
        check_writable(tmp_path / "out", elsewhere="choose another --out")
    assert str(err.value) == f"cannot write {tmp_path / 'out'}: {words}"


def test_a_folder_that_cannot_be_created_names_itself_and_the_fix(tmp_path, monkeypatch):
    """A mkdir failing with an errno that is not about storage (ENOENT under /proc) used to reach the user as
    "No such file or directory: /proc/x", with no word on which folder or what to do."""
    def mkdir(self, *args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(self))

    monkeypatch.setattr(artifacts.Path, "mkdir", mkdir)
    with pytest.raises(StorageError) as err:
        check_writable(tmp_path / "x", what="the output folder", elsewhere="choose another --out")
    assert str(err.value) == (f"cannot create the output folder {tmp_path / 'x'} (No such file or directory); "
                              "choose another --out")


def test_check_writable_refuses_a_nearly_full_disk_and_a_file(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        check_writable(tmp_path / "afile")
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 20})())
    with pytest.raises(StorageError, match=rf"only 1\.0 MiB free on its disk \(folder needs at least "
                                           rf"{MIN_FREE_BYTES >> 20} MiB\)"):
        check_writable(tmp_path / "ok")


# ------------------------------------------------------------------------------------ the commands

def test_a_raw_disk_error_anywhere_in_a_command_is_one_line_not_a_bug(monkeypatch, capsys):
    def run_notebooks(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/home/models/x.pt")

    monkeypatch.setattr(runner, "run_notebooks", run_notebooks)
    assert cli.main(["run", "--quiet"]) == 2
    assert _one_error_line(capsys).startswith("hmlib: error: cannot write /data/home/models/x.pt: no space left on "
                                              "the disk (ENOSPC); free space on that disk")


# ------------------------------------------------------------------------------------ a real tiny disk

@pytest.fixture
def tiny_disk(tmp_path):
    """A 24 MiB tmpfs mounted for the test (root with mount rights only; skipped elsewhere)."""
    where = tmp_path / "tiny_disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}); the simulated "
                    "cases cover the same code")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_real_full_disk_in_save_checkpoint(tiny_disk):
    with pytest.raises(StorageError, match=r"no space left on the disk \(ENOSPC: [0-9.]+ MiB free, the checkpoint "
                                           r"needs 48\.0 MiB\)"):
        save_checkpoint(tiny_disk / "big.pt", {"w": torch.zeros(12 << 20)}, {"kind": "test"})  # 48 MB
    assert [p.name for p in tiny_disk.iterdir()] == []
    save_checkpoint(tiny_disk / "small.pt", {"w": torch.zeros(4)}, {"kind": "test"})  # the space came back
    assert load_checkpoint(tiny_disk / "small.pt")[1] == {"kind": "test"}
