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

from hmlib.artifacts import ArtifactError, MissingArtifactError, check_writable, load_checkpoint, read_json
from hmlib.backbone.transductive import get_transductive_backbone
from hmlib.cli import add_device_option
from hmlib.config import (Config, ConfigError, config_to_dict, configure_runtime, load_config, resolve_device,
                          with_overrides)
from hmlib.data.corruptions import benchmark_corruptions
from hmlib.data.registry import parse_shifted
from hmlib.evaluation.evaluate import EvalError, evaluate_setting, load_bundles, load_results, per_task_accuracy
from hmlib.evaluation.tables import over_conditions, summary_markdown
from hmlib.hyper.bundle import Bundle
from hmlib.hyper.metatrain import recorded_checkpoints
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
                  progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Evaluate the pipeline's checkpoints (``models/pipeline.json``) on the full grid in ``setting``; resumable per
    condition (and per adapted backbone). A finished benchmark made with other settings (checkpoints, grid, task
    count, evaluation or test-time settings) is an ArtifactError unless ``overwrite``: it is replaced, not resumed."""
    if setting not in BENCHMARK_FILES:
        raise ConfigError(f"unknown benchmark setting {setting!r}; choose one of: {', '.join(BENCHMARK_FILES)}")
    checkpoints = checkpoints or recorded_checkpoints()
    if not checkpoints:
        raise MissingArtifactError("no pipeline checkpoint recorded in models/pipeline.json; make them with `make run`")
    path = results_dir() / BENCHMARK_FILES[setting]
    check_writable(path.parent, what="the results folder")
    bench = benchmark_config(cfg)
    datasets = benchmark_datasets(cfg)
    shapes = cfg.benchmark.shapes if setting == "zero_shot" else cfg.benchmark.transductive_shapes
    bundles = load_bundles(checkpoints, resolve_device(cfg.device))  # loaded once, for both stages
    if path.is_file() and not overwrite:
        differs = other_settings(read_json(path), bench, [b.sha256 for b in bundles], datasets, shapes)
        if differs:
            raise ArtifactError(f"{path} holds a finished benchmark made with other settings ({differs}); pass "
                                "--overwrite to replace it, or run this one in another home (HMLIB_HOME=<folder>)")
    if setting == "transductive":
        adapt_backbones(bench, bundles, datasets, progress=progress)
    return evaluate_setting(bench, bundles, setting, datasets=datasets, shapes=shapes, path=path,
                            progress=progress, key={"benchmark": True, "profile": cfg.profile})


def other_settings(result: Mapping[str, Any], cfg: Config, shas: list[str], datasets: list[str],
                   shapes) -> str:
    """What differs between a finished benchmark ``result`` and one of ``cfg`` (the benchmark's config) on the
    checkpoints ``shas``, ``datasets`` and ``shapes``; '' where nothing does (the same benchmark, or a larger grid
    that holds all of it: it resumes, and loses nothing)."""
    blocks = [b for b in result.get("conditions", []) if "condition" in b]
    identity = blocks[0].get("identity", {}) if blocks else {}
    made = {(b["condition"]["num_classes"], b["condition"]["num_images"]) for b in blocks}
    checks = {"profile": result.get("profile") == cfg.profile,
              "checkpoints": [c.get("sha256") for c in result.get("checkpoints", [])] == shas,
              "task count": result.get("num_tasks") == cfg.eval.num_tasks,
              "test-time steps": result.get("num_steps") == cfg.adapt.steps_at_test,
              "datasets": {b["condition"]["dataset"] for b in blocks} <= set(datasets),
              "task shapes": made <= {(int(k), int(n)) for k, n in shapes},
              "evaluation settings": without_count(identity.get("eval")) == without_count(config_to_dict(cfg.eval)),
              "test-time settings": identity.get("adapt") == config_to_dict(cfg.adapt)}
    return ", ".join(f"its {what}" for what, same in checks.items() if not same)


def without_count(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """Evaluation settings without the task count (compared on its own)."""
    return {key: value for key, value in (settings or {}).items() if key != "num_tasks"}


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
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished benchmark of this setting made with other settings (refused without)")
    add_device_option(parser, "the benchmark")
    parser.set_defaults(func=run_benchmark_command)
    return parser


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Handler of ``hmlib benchmark``: the profile's config (data, evaluation and the benchmark grid; the model
    settings are the checkpoints' own) on the pipeline's checkpoints."""
    device = getattr(args, "device", None)
    cfg = load_config(args.profile, args.config, {"device": device} if device is not None else None)
    configure_runtime(cfg)  # deterministic kernels, the profile's threads, as in the notebooks
    checkpoints = recorded_checkpoints()
    if not checkpoints:
        raise MissingArtifactError("no pipeline checkpoint recorded in models/pipeline.json; make them with "
                                   f"`hmlib run --profile {args.profile}`")
    recorded = load_checkpoint(checkpoints[0])[1].get("config", {})
    if recorded.get("profile") != cfg.profile:
        print(f"note: the pipeline's checkpoints were made by the '{recorded.get('profile')}' profile")
    result = run_benchmark(cfg, checkpoints, setting=args.setting, progress=not args.quiet, overwrite=args.overwrite)
    print(summary_markdown(result))
    zero_shot = results_dir() / BENCHMARK_FILES["zero_shot"]
    if args.setting == "transductive" and zero_shot.is_file():
        comparison = setting_comparison(result, load_results("zero_shot", zero_shot))
        if comparison["conditions"]:
            print("\nTransductive minus zero-shot (the hypernetwork after its inner steps, the same tasks):\n")
            print(comparison_markdown(comparison))
    print(f"\nwrote {results_dir() / BENCHMARK_FILES[args.setting]} and its .md (every condition's full table)")
    return 0
