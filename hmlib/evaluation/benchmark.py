"""``hmlib benchmark`` (``make benchmark``): the full held-out grid on the pipeline's checkpoints.

Every clean held-out dataset of the protocol (the bases of ``meta.test_datasets``) and every benchmark
corruption of it (``benchmark.corruptions``: all fifteen by default), at every task shape of
``benchmark.shapes``, ``benchmark.num_tasks`` tasks each, zero-shot. It is the default run's evaluation on a
larger grid: the same methods and scoring, each condition written as soon as it is done
(``results/benchmark_zero_shot/<condition>.json``) and reused when interrupted and restarted, the summary in
``results/benchmark_zero_shot.json`` (+ ``.md``), which ``hmlib results --write`` puts in the README.

``--setting transductive`` runs the same datasets transductively: every dataset's unlabeled train split adapted to
first (:func:`hmlib.backbone.get_transductive_backbone`, one adaptation per dataset and replicate seed, reused like
notebook 03's), then the grid at ``benchmark.transductive_shapes`` (``results/benchmark_transductive.json``). Its
conditions hold the zero-shot benchmark's tasks, so :func:`setting_comparison` pairs the two per task.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping

from tqdm.auto import tqdm

from hmlib.artifacts import MissingArtifactError, check_writable, load_checkpoint
from hmlib.backbone.transductive import get_transductive_backbone
from hmlib.cli import add_device_option
from hmlib.config import Config, ConfigError, configure_runtime, load_config, resolve_device, with_overrides
from hmlib.data.corruptions import benchmark_corruptions
from hmlib.data.registry import parse_shifted
from hmlib.evaluation.evaluate import EvalError, evaluate_setting, load_bundles, load_results, per_task_accuracy
from hmlib.evaluation.tables import over_conditions, summary_markdown
from hmlib.hyper.bundle import Bundle
from hmlib.hyper.metatrain import pipeline_checkpoints
from hmlib.paths import results_dir
from hmlib.stats import paired, signed

BENCHMARK_FILES = {"zero_shot": "benchmark_zero_shot.json", "transductive": "benchmark_transductive.json"}
BENCHMARK_FILE = BENCHMARK_FILES["zero_shot"]


def benchmark_datasets(cfg: Config) -> list[str]:
    """The clean held-out datasets and every configured benchmark corruption of each."""
    bases = list(dict.fromkeys(parse_shifted(d)[0] for d in cfg.meta.test_datasets))
    corruptions = list(cfg.benchmark.corruptions or benchmark_corruptions())
    return [name for base in bases for name in (base, *(f"{base}+{c}" for c in corruptions))]


def benchmark_config(cfg: Config) -> Config:
    """The run's config with the benchmark's task count (the grid itself is passed to the evaluation)."""
    return with_overrides(cfg, {"eval": {"num_tasks": cfg.benchmark.num_tasks}})


def adapt_backbones(cfg: Config, bundles: list[Bundle], datasets: list[str], *, progress: bool = True) -> None:
    """Make (or reuse) every checkpoint's backbone adapted to every dataset's unlabeled train split."""
    for bundle in bundles:
        if bundle.backbone is None:
            raise ConfigError(f"{bundle.path.name} has no backbone to adapt; the transductive benchmark needs a run "
                              "whose method reads the backbone")
    for dataset in tqdm(datasets, desc="transductive backbones", disable=not progress):
        for bundle in bundles:
            get_transductive_backbone(cfg, bundle.backbone, bundle.backbone_meta, dataset, progress=False)


def run_benchmark(cfg: Config, checkpoints: list[Path] | None = None, *, setting: str = "zero_shot",
                  progress: bool = True) -> dict[str, Any]:
    """Evaluate the pipeline's checkpoints (``models/pipeline.json``) on the full grid in ``setting``; resumable per
    condition (and per adapted backbone)."""
    if setting not in BENCHMARK_FILES:
        raise ConfigError(f"unknown benchmark setting {setting!r}; choose one of: {', '.join(BENCHMARK_FILES)}")
    checkpoints = checkpoints or [p for p in pipeline_checkpoints() if p.is_file()]
    if not checkpoints:
        raise MissingArtifactError("no pipeline checkpoint recorded in models/pipeline.json; make them with `make run`")
    path = results_dir() / BENCHMARK_FILES[setting]
    check_writable(path.parent, what="the results folder")
    bench = benchmark_config(cfg)
    datasets = benchmark_datasets(cfg)
    shapes = cfg.benchmark.shapes
    bundles = load_bundles(checkpoints, resolve_device(cfg.device))  # loaded once, for both stages
    if setting == "transductive":
        adapt_backbones(bench, bundles, datasets, progress=progress)
        shapes = cfg.benchmark.transductive_shapes
    return evaluate_setting(bench, bundles, setting, datasets=datasets, shapes=shapes, path=path,
                            progress=progress, key={"benchmark": True, "profile": cfg.profile})


def setting_comparison(transductive: Mapping[str, Any], zero_shot: Mapping[str, Any],
                       method: str = "hypernet_adapted") -> dict[str, Any]:
    """``method`` transductive minus zero-shot, paired per task on every condition both results hold (their suites
    must be the same tasks), and the mean over those conditions with a t-interval over conditions."""
    blocks = {b["condition"]["key"]: b for b in zero_shot["conditions"]}
    conditions = []
    for block in transductive["conditions"]:
        other = blocks.get(block["condition"]["key"])
        if other is None:
            continue
        if other["suite"] != block["suite"]:
            raise EvalError(f"{block['condition']['key']}: the two results hold different tasks (other seeds, task "
                            "counts or data); compare results of the same protocol")
        conditions.append({"key": block["condition"]["key"], "label": block["condition"]["label"],
                           "shift": block["condition"]["shift"],
                           "difference": paired(per_task_accuracy(block, method), per_task_accuracy(other, method))})
    diffs = [c["difference"] for c in conditions]
    return {"method": method, "conditions": conditions,
            "overall": {"all": over_conditions(diffs),
                        "shifted": over_conditions([c["difference"] for c in conditions if c["shift"] != "clean"])}}


def comparison_markdown(comparison: Mapping[str, Any]) -> str:
    """One line per condition (transductive minus zero-shot, paired), then the means over conditions."""
    lines = ["| condition | transductive minus zero-shot, points |", "|---|---:|"]
    lines += [f"| {c['label']} | {signed(c['difference'])} |" for c in comparison["conditions"]]
    for part, label in (("all", "over conditions"), ("shifted", "over the shifted conditions")):
        stat = comparison["overall"][part]
        if stat.get("n"):
            lines.append(f"| **{label}** (t-interval over conditions; wins / ties / losses {stat['wins']} / "
                         f"{stat['ties']} / {stat['losses']}, worst {100 * stat['worst']:+.1f}) | {signed(stat)} |")
    return "\n".join(lines)


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hmlib benchmark``."""
    parser = subparsers.add_parser(
        "benchmark", help="the full held-out grid (every benchmark corruption, every task shape) on the pipeline's "
                          "checkpoints; resumable",
        description="Evaluate the checkpoints of the last `hmlib run` (models/pipeline.json) on every clean held-out "
                    "dataset and every benchmark corruption of it, at every task shape of benchmark.shapes. Each "
                    "condition is saved as soon as it is done; an interrupted run resumes where it stopped. "
                    "--setting transductive first adapts the backbone to every dataset's unlabeled train split "
                    "(never its labels), then scores benchmark.transductive_shapes, paired with the zero-shot "
                    "benchmark's same tasks where that was run.")
    parser.add_argument("--setting", default="zero_shot", choices=tuple(BENCHMARK_FILES),
                        help="zero_shot (default) or transductive")
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
    result = run_benchmark(cfg, checkpoints, setting=args.setting, progress=not args.quiet)
    print(summary_markdown(result))
    zero_shot = results_dir() / BENCHMARK_FILES["zero_shot"]
    if args.setting == "transductive" and zero_shot.is_file():
        comparison = setting_comparison(result, load_results("zero_shot", zero_shot))
        if comparison["conditions"]:
            print("\nTransductive minus zero-shot (the hypernetwork after its inner steps, the same tasks):\n")
            print(comparison_markdown(comparison))
    print(f"\nwrote {results_dir() / BENCHMARK_FILES[args.setting]} and its .md (every condition's full table)")
    return 0
