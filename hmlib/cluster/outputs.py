"""The files ``hmlib cluster`` writes, all inside one output folder: assignments.csv, clusters.html, summary.json.

Policy: the default folder is ``results/cluster/<name of PATH>/`` under the artifact home
(:func:`hmlib.paths.results_dir`); an existing non-empty folder is refused unless ``overwrite`` is set, and then
only these three files are replaced (anything else in it is left alone). Every file is written atomically;
``summary.json`` goes last, so its presence means the run completed.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hmlib import __version__, paths
from hmlib.artifacts import atomic_path, write_json
from hmlib.cluster.images import ClusterInputError, ImageCollection, input_name
from hmlib.reports import utc_now

ASSIGNMENTS = "assignments.csv"
CONTACT_SHEET = "clusters.html"
SUMMARY = "summary.json"
OUTPUT_FILES = (ASSIGNMENTS, CONTACT_SHEET, SUMMARY)
CSV_COLUMNS = ("file", "cluster", "confidence")


def default_out_dir(path: str | Path) -> Path:
    """``results/cluster/<name of PATH>/`` under the artifact home."""
    return paths.results_dir() / "cluster" / input_name(path)


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """The output folder as an absolute path; refuse a file, or an existing non-empty folder unless ``overwrite``."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ClusterInputError(f"output folder {out} is an existing file; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ClusterInputError(f"output folder {out} already exists and is not empty; pass --overwrite to replace "
                                f"its {', '.join(OUTPUT_FILES)}, or choose another --out")
    return out


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
