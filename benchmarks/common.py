"""Shared by the benchmark scripts: one-thread set-up, a note of the machine's load, and the figures file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits

from hmlib import paths
from hmlib.artifacts import write_json


def setup(threads: int = 1) -> str:
    """Limit torch and the BLAS pools to ``threads``; return a line describing the machine's state."""
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    load = os.getloadavg()[0]
    return f"{threads} thread(s), {len(os.sched_getaffinity(0))} cores visible, load average {load:.2f}"


def record(name: str, figures: dict[str, Any], results_dir: Path | None = None) -> None:
    """Write the figures to ``results/bench/<name>.json`` (``hmlib results --write`` puts them in the README)."""
    path = write_json((results_dir or paths.results_dir()) / "bench" / f"{name}.json", figures)
    print(f"wrote {path}")
