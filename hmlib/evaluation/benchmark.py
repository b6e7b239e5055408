"""``hmlib benchmark`` (``make benchmark``): the full held-out grid on the pipeline's checkpoints.

Every clean held-out dataset of the protocol (the bases of ``meta.test_datasets``) and every benchmark
corruption of it (``benchmark.corruptions``: all fifteen by default), at every task shape of
``benchmark.shapes``, ``benchmark.num_tasks`` tasks each, zero-shot. It is the default run's evaluation on a
larger grid: the same methods and scoring, each condition written as soon as it is done
(``results/benchmark_zero_shot/<condition>.json``) and reused when interrupted and restarted, the summary in
``results/benchmark_zero_shot.json`` (+ ``.md``), which ``hmlib results --write`` puts in the README.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hmlib.artifacts import MissingArtifactError, check_writable, load_checkpoint
from hmlib.cli import add_device_option
from hmlib.config import Config, configure_runtime, load_config, with_overrides
from hmlib.data.corruptions import benchmark_corruptions
from hmlib.data.registry import parse_shifted
from hmlib.evaluation.evaluate import evaluate_setting
from hmlib.evaluation.tables import summary_markdown
from hmlib.hyper.metatrain import pipeline_checkpoints
from hmlib.paths import results_dir

BENCHMARK_FILE = "benchmark_zero_shot.json"


def benchmark_datasets(cfg: Config) -> list[str]:
    """The clean held-out datasets and every configured benchmark corruption of each."""
    bases = list(dict.fromkeys(parse_shifted(d)[0] for d in cfg.meta.test_datasets))
    corruptions = list(cfg.benchmark.corruptions or benchmark_corruptions())
    return [name for base in bases for name in (base, *(f"{base}+{c}" for c in corruptions))]


def benchmark_config(cfg: Config) -> Config:
    """The run's config with the benchmark's task count (the grid itself is passed to the evaluation)."""
    return with_overrides(cfg, {"eval": {"num_tasks": cfg.benchmark.num_tasks}})


def run_benchmark(cfg: Config, checkpoints: list[Path] | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Evaluate the pipeline's checkpoints (``models/pipeline.json``) on the full grid; resumable per condition."""
    checkpoints = checkpoints or [p for p in pipeline_checkpoints() if p.is_file()]
    if not checkpoints:
        raise MissingArtifactError("no pipeline checkpoint recorded in models/pipeline.json; make them with `make run`")
    path = results_dir() / BENCHMARK_FILE
    check_writable(path.parent, what="the results folder")
    bench = benchmark_config(cfg)
    return evaluate_setting(bench, checkpoints, "zero_shot", datasets=benchmark_datasets(cfg),
                            shapes=cfg.benchmark.shapes, path=path, progress=progress,
                            key={"benchmark": True, "profile": cfg.profile})


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hmlib benchmark``."""
    parser = subparsers.add_parser(
        "benchmark", help="the full held-out grid (every benchmark corruption, every task shape) on the pipeline's "
                          "checkpoints; resumable",
        description="Evaluate the checkpoints of the last `hmlib run` (models/pipeline.json) on every clean held-out "
                    "dataset and every benchmark corruption of it, at every task shape of benchmark.shapes. Each "
                    "condition is saved as soon as it is done; an interrupted run resumes where it stopped.")
    parser.add_argument("--profile", default="default", help="config profile (default: default)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="JSON overrides")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_option(parser, "the benchmark")
    parser.set_defaults(func=run_benchmark_command)
    return parser


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Handler of ``hmlib benchmark``: the profile's config (data, evaluation and the benchmark grid; the model
    settings are the checkpoints' own) on the pipeline's checkpoints."""
    device = getattr(args, "device", None)
    cfg = load_config(args.profile, args.config, {"device": device} if device is not None else None)
    configure_runtime(cfg)  # deterministic kernels, the profile's threads, as in the notebooks
    checkpoints = [p for p in pipeline_checkpoints() if p.is_file()]
    if not checkpoints:
        raise MissingArtifactError("no pipeline checkpoint recorded in models/pipeline.json; make them with "
                                   f"`hmlib run --profile {args.profile}`")
    recorded = load_checkpoint(checkpoints[0])[1].get("config", {})
    if recorded.get("profile") != cfg.profile:
        print(f"note: the pipeline's checkpoints were made by the '{recorded.get('profile')}' profile")
    result = run_benchmark(cfg, checkpoints, progress=not args.quiet)
    print(summary_markdown(result))
    print(f"\nwrote {results_dir() / BENCHMARK_FILE} and its .md (every condition's full table)")
    return 0
