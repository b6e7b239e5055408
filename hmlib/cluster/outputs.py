"""The files ``hmlib cluster`` writes, all inside one output folder: assignments.csv, clusters.html, summary.json.

Policy: the default folder is ``results/cluster/<name of PATH>/`` under the artifact home
(:func:`hmlib.paths.results_dir`); an existing non-empty folder is refused unless ``overwrite`` is set, and then
only these three files are replaced (anything else in it is left alone). Every file is written atomically;
``summary.json`` goes last, so its presence means the run completed.

A run claims its folder before any long work (:func:`claim_out_dir`): it checks that it can write there, then
holds an exclusive lock (``flock`` on ``.hmlib-cluster.lock`` inside it, released by the kernel even if the run
is killed) until its files are written. A second run into the same folder meanwhile is refused at once, so two
concurrent runs can never both report success with one output lost.
"""
from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from hmlib import __version__, paths
from hmlib.artifacts import atomic_path, check_writable, storage_errors, write_json
from hmlib.cluster.images import ClusterInputError, ImageCollection, input_name
from hmlib.reports import utc_now

ASSIGNMENTS = "assignments.csv"
CONTACT_SHEET = "clusters.html"
SUMMARY = "summary.json"
OUTPUT_FILES = (ASSIGNMENTS, CONTACT_SHEET, SUMMARY)
CSV_COLUMNS = ("file", "cluster", "confidence")
LOCK_NAME = ".hmlib-cluster.lock"
OWN_HIDDEN = ".hmlib-"  # the lock, a write check's probe, an atomic write's temporary file: not the user's content
ELSEWHERE = "choose another --out"

try:
    import fcntl
except ImportError:  # Windows: no flock; the claim is then the emptiness check alone
    fcntl = None  # type: ignore[assignment]


def default_out_dir(path: str | Path) -> Path:
    """``results/cluster/<name of PATH>/`` under the artifact home."""
    return paths.results_dir() / "cluster" / input_name(path)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """The output folder as an absolute path; refuse a file, or an existing non-empty folder unless ``overwrite``."""
    if not str(out).strip():
        raise ClusterInputError("--out '' names no folder; give a folder or leave --out out for the default")
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ClusterInputError(f"output folder {out} is an existing file; choose another --out")
    if out.is_dir() and any(not p.name.startswith(OWN_HIDDEN) for p in out.iterdir()) and not overwrite:
        raise ClusterInputError(f"output folder {out} already exists and is not empty; pass --overwrite to replace "
                                f"its {', '.join(OUTPUT_FILES)}, or choose another --out")
    return out


@contextmanager
def claim_out_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Check, create and lock the output folder for the duration of the block (see the module doc); yields it.

    Refused with one line when it is a file, is not empty (without ``overwrite``), cannot be written (disk full,
    read-only, permissions) or another run holds it. A folder this call created is removed again if the block
    fails before writing anything into it.
    """
    out = check_out_dir(out, overwrite)
    created = [] if out.exists() else [out, *(p for p in out.parents if not p.exists())]  # innermost first
    check_writable(out, what="the output folder", elsewhere=ELSEWHERE)
    fd = _lock(out)
    done = False
    try:
        check_out_dir(out, overwrite)  # again, now that no other run can write: one may have finished meanwhile
        yield out
        done = True
    finally:
        _unlock(out, fd)
        for folder in created if not done else ():
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break


def _lock(out: Path) -> int | None:
    """An open, exclusively flock-ed descriptor of ``out/.hmlib-cluster.lock`` (None without flock)."""
    if fcntl is None:
        return None
    lock = out / LOCK_NAME
    while True:
        with storage_errors(lock, ELSEWHERE):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ClusterInputError(f"another hmlib cluster run is writing to {out} right now (it holds {lock.name}); "
                                    f"wait for it to finish, or choose another --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the run that held it just finished and removed it: lock the new file instead
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _unlock(out: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.unlink(out / LOCK_NAME)  # while still locked: a run waiting on this file sees it is gone and retries
    except OSError:
        pass
    os.close(fd)


def write_assignments(path: str | Path, names: Sequence[str], labels: np.ndarray, confidence: np.ndarray) -> Path:
    """``file,cluster,confidence`` rows in input order (atomic)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            writer.writerows((name, int(label), f"{float(conf):.6f}")
                             for name, label, conf in zip(names, labels, confidence))
    return Path(path)


def cluster_table(labels: np.ndarray, confidence: np.ndarray, k: int) -> list[dict[str, Any]]:
    """Per cluster: id, size, share and confidence mean (None for an empty cluster)."""
    sizes = np.bincount(labels, minlength=k)
    return [{"cluster": c, "size": int(sizes[c]), "share": float(sizes[c] / max(len(labels), 1)),
             "mean_confidence": float(confidence[labels == c].mean()) if sizes[c] else None} for c in range(k)]


def build_summary(collection: ImageCollection, estimator: Any, *, input_path: str | Path, k: int,
                  requested_steps: int | None, labels: np.ndarray, confidence: np.ndarray) -> dict[str, Any]:
    """Everything ``summary.json`` records about one run."""
    return {
        "command": "hmlib cluster",
        "hmlib_version": __version__,
        "created_utc": utc_now(),
        "input": {"path": str(input_path), "location": collection.location, "source": collection.source,
                  "split": collection.split},
        "checkpoint": str(estimator.checkpoint_path),
        "checkpoint_sha256": str(estimator.checkpoint_sha256),
        "n_clusters": int(k),
        "num_steps": estimator.num_steps,
        "requested_steps": requested_steps,
        "estimator": estimator.describe(),
        "preprocessing": dict(collection.preprocessing),
        "counts": {"images": len(collection), "skipped": len(collection.skipped), "ignored": len(collection.ignored),
                   "inverted": collection.inverted},
        "clusters": cluster_table(labels, confidence, k),
        "skipped": [{"file": name, "reason": reason} for name, reason in collection.skipped],
        "ignored": list(collection.ignored),
        "files": {"assignments": ASSIGNMENTS, "contact_sheet": CONTACT_SHEET, "summary": SUMMARY},
    }


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """``summary.json`` (atomic, sorted keys)."""
    return write_json(path, summary)
