"""Repository-rooted paths, independent of the working directory.

Artifacts live under the project root: ``data_cache/``, ``models/``, ``results/``, ``reports/``. The
environment variable ``HMLIB_HOME`` moves them all elsewhere (CI uses it to keep runs apart).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


def home() -> Path:
    """Folder that holds data_cache/, models/ and reports/ (``$HMLIB_HOME`` or the repository root)."""
    value = os.environ.get("HMLIB_HOME")
    return Path(value).expanduser().resolve() if value else REPO_ROOT


def cache_dir() -> Path:
    return home() / "data_cache"


def models_dir() -> Path:
    return home() / "models"


def reports_dir() -> Path:
    return home() / "reports"


def results_dir() -> Path:
    """Evaluation and ablation results (JSON) that later notebooks and reports load."""
    return home() / "results"


def notebooks_dir() -> Path:
    return REPO_ROOT / "notebooks"
