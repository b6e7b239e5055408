"""``hmlib eval``: score checkpoints and every baseline on the grid of held-out conditions.

Model settings come from the checkpoints; data and evaluation settings from ``--profile``/``--config``
(default: the checkpoint's own), and a ``--config`` that changes the test-time adaptation is honoured and
recorded. The checkpoint bundles the VAE and backbone it reads through, so a checkpoint copied to a fresh
machine evaluates zero-shot as it is; nothing is ever trained here. Results are keyed by what made them: the
default file name carries a hash of the checkpoints, conditions, task count and settings, so an evaluation with
other settings never replaces another (``--json`` names a file: one made by other inputs is refused unless
``--overwrite``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from hmlib.artifacts import (ArtifactError, check_writable, file_sha256, fingerprint, load_checkpoint, read_json,
                             refuse_overwrite)
from hmlib.cli import add_device_option
from hmlib.data.registry import check_name, parse_shifted
from hmlib.config import (TEST_TIME_ONLY, Config, ConfigError, config_to_dict, configure_runtime, load_config,
                          registered_datasets, with_overrides)
from hmlib.evaluation.evaluate import EvalError, evaluate_setting
from hmlib.evaluation.tables import summary_markdown
from hmlib.hyper.checkpoints import CHECKPOINT_KIND
from hmlib.hyper.metatrain import recorded_checkpoints
from hmlib.paths import results_dir
from hmlib.validation import read_config_file

MODEL_SECTIONS = ("task", "vae", "backbone", "hyper", "film", "full", "meta")  # what made the checkpoint (not cfg.seeds: a
# checkpoint is one replicate, its seed is in its meta; the profile's seeds keep ablation.num_seeds valid)


def _shape(text: str) -> tuple[int, int]:
    """'4x256' -> (4, 256): K classes by N images."""
    try:
        K, N = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a task shape KxN such as 4x256, got {text!r}") from None
    if K < 2 or N < 2 * K:
        raise argparse.ArgumentTypeError(f"a task shape KxN needs K >= 2 and N >= 2K, got {text!r}")
    return K, N


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hmlib eval``; its handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "eval", help="score checkpoints and the baselines on the grid of held-out conditions",
        description="Run the evaluation grid (held-out datasets, clean or shifted such as mnist+rotate, at task "
                    "shapes KxN; seeded random tasks from each test split) for hypernetwork checkpoints (one per "
                    "replicate seed, aggregated), against k-means / GMM / spectral clustering on the backbone "
                    "embedding, per-task normalisation statistics, plain test-time adaptation (no meta-learning), "
                    "k-means / GMM on the VAE means, k-means on pixels and a supervised ceiling. Prints the tables "
                    "and writes JSON + .md. Never trains.")
    parser.add_argument("--checkpoint", nargs="+", type=Path, metavar="PATH",
                        help="hypernetwork checkpoint(s) models/hypernet_seed<s>-<hash>.pt, one per replicate seed "
                             "(default: those of the last `hmlib run`, listed in models/pipeline.json)")
    parser.add_argument("--dataset", nargs="+", metavar="NAME",
                        help="held-out dataset(s), e.g. mnist mnist+rotate (default: the checkpoint's test datasets; "
                             "with --setting transductive its transductive.datasets, those notebook 03 adapted to)")
    parser.add_argument("--setting", default="zero_shot", choices=("zero_shot", "transductive"),
                        help="zero_shot (default) or transductive (the backbone adapted to each dataset's unlabeled "
                             "train split; made by notebook 03)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="local mirror holding DIR/NAME/{train,test}.parquet (a dataset never seen before is fine)")
    parser.add_argument("--shapes", type=_shape, nargs="+", metavar="KxN",
                        help="task shapes, e.g. 4x256 10x500 (default: eval.shapes)")
    parser.add_argument("--tasks", type=_at_least(2), metavar="T", help="tasks per condition, >= 2 (default: eval.num_tasks)")
    parser.add_argument("--steps", type=_at_least(0), metavar="S",
                        help="inner steps at test time (default: adapt.test_steps)")
    parser.add_argument("--json", type=Path, metavar="OUT",
                        help="result JSON (default: results/eval/<setting>-<hash of what made it>.json); .md beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace --json if it was made by other inputs")
    parser.add_argument("--profile", default=None, help="config profile for data/eval settings (default: the checkpoint's)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="JSON overrides (data, eval, and test-time adapt settings); model settings are the checkpoint's")
    parser.add_argument("--recompute", action="store_true", help="ignore matching cached results")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_option(parser, "the evaluation")
    parser.set_defaults(func=run_eval_command)
    return parser


def config_for_checkpoint(meta: Mapping[str, Any], *, profile: str | None = None, config_path: str | Path | None = None,
                          overrides: Mapping[str, Any] | None = None) -> Config:
    """Evaluation config: model sections and the adaptation the checkpoint was meta-trained with from the checkpoint
    (but for test-time-only settings such as ``adapt.test_steps``), the rest from ``profile`` (default the
    checkpoint's), then ``config_path`` and ``overrides``; a file that changes a model section is refused."""
    recorded = dict(meta.get("config") or {})
    if not recorded:
        raise EvalError("the checkpoint records no config; it was not written by hmlib meta-training")
    file_overrides = read_config_file(config_path) if config_path is not None else {}
    fixed = [k for k in file_overrides if k in MODEL_SECTIONS]
    if fixed:
        raise EvalError(f"--config changes {', '.join(fixed)}, which are fixed by the checkpoint; only data, eval "
                        "and adapt (test-time adaptation) settings can change at evaluation")
    model = {k: recorded[k] for k in MODEL_SECTIONS if k in recorded}
    base = load_config(profile or recorded.get("profile", "default"), None, model)
    recorded_adapt = {k: v for k, v in (recorded.get("adapt") or {}).items() if k not in TEST_TIME_ONLY}
    adapt = {**recorded_adapt, **file_overrides.pop("adapt", {})}
    merged = _deep_merge(_deep_merge(file_overrides, {"adapt": adapt}), overrides or {})
    return with_overrides(base, merged)


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "custom_datasets":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _dataset_overrides(args: argparse.Namespace, names: Sequence[str], custom: Mapping[str, str]) -> dict[str, Any]:
    """data.* overrides for --dataset/--data-dir, refusing names that could point outside the artifact folder."""
    out: dict[str, Any] = {}
    known = set(registered_datasets()) | set(custom)
    data_dir = None
    if args.data_dir is not None:
        data_dir = Path(args.data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise EvalError(f"--data-dir {args.data_dir} is not a folder")
        out["data_dir"] = str(data_dir)
    for name in names:
        base, _ = parse_shifted(check_name(name, "--dataset name"))
        if data_dir is not None and base not in registered_datasets():
            folder = data_dir / base
            if not (folder / "test.parquet").is_file() and not (folder / "train.parquet").is_file():
                raise EvalError(f"{folder} holds no train.parquet / test.parquet")
            out["custom_datasets"] = {**custom, **out.get("custom_datasets", {}), base: str(folder)}
            known.add(base)
        if base not in known:
            raise EvalError(f"unknown dataset '{base}'; registered: {', '.join(sorted(known))}. For a local mirror "
                            "folder pass --data-dir DIR with DIR/NAME/{train,test}.parquet")
    return out


def run_eval_command(args: argparse.Namespace) -> int:
    """Handler of ``hmlib eval``: validate, evaluate, print the tables; returns 0."""
    if args.json is not None and Path(args.json).suffix != ".json":
        raise EvalError(f"--json {args.json}: name a .json file (the table is written beside it, as .md)")
    if args.config is not None:
        read_config_file(args.config)  # a bad file fails before any checkpoint is read
    if not args.checkpoint:
        args.checkpoint = recorded_checkpoints(", or pass --checkpoint for the ones to evaluate")
        if not args.checkpoint:
            raise EvalError("no checkpoint given and none recorded in models/pipeline.json; run `make run` first or "
                            "pass --checkpoint")
    for path in args.checkpoint:
        if not Path(path).is_file():
            raise EvalError(f"checkpoint not found: {path}")
    meta = load_checkpoint(args.checkpoint[0])[1]  # settings first: bad arguments fail before models load
    if meta.get("kind") != CHECKPOINT_KIND:
        raise EvalError(f"{args.checkpoint[0]} is a {meta.get('kind') or 'foreign'} checkpoint, not a hypernetwork "
                        "one; hmlib eval scores the hypernetwork checkpoints of meta-training "
                        "(models/hypernet_seed<s>-<id>.pt)")
    recorded = meta.get("config") or {}
    custom = dict((recorded.get("data") or {}).get("custom_datasets") or {})
    default = ((recorded.get("transductive") or {}).get("datasets") if args.setting == "transductive" else None)
    datasets = list(args.dataset or default or (recorded.get("meta") or {}).get("test_datasets") or [])
    if not datasets:
        raise EvalError("no dataset to evaluate: pass --dataset NAME")
    overrides: dict[str, Any] = {"data": _dataset_overrides(args, datasets, custom), "eval": {}}
    if args.tasks is not None:
        overrides["eval"]["num_tasks"] = args.tasks
    if getattr(args, "device", None) is not None:
        overrides["device"] = args.device
    if args.shapes is not None:
        overrides["eval"]["shapes"] = [list(s) for s in args.shapes]
        overrides["eval"]["shifted_shapes"] = None  # the shapes asked for, for shifted datasets too
    try:
        cfg = config_for_checkpoint(meta, profile=args.profile, config_path=args.config,
                                    overrides={k: v for k, v in overrides.items() if v})
    except ConfigError as err:
        raise EvalError(str(err)) from None
    configure_runtime(cfg)  # deterministic kernels, the profile's threads, as in the notebooks
    trained_on = [d for d in datasets if parse_shifted(d)[0] in {parse_shifted(t)[0] for t in cfg.meta.train_datasets}]
    if trained_on:
        print(f"note: {', '.join(trained_on)} derive from meta-training datasets of these checkpoints; this is not a "
              "held-out evaluation", file=sys.stderr)
    key = {"checkpoints": sorted(file_sha256(p) for p in args.checkpoint), "datasets": datasets,
           "setting": args.setting, "eval": config_to_dict(cfg.eval), "adapt": config_to_dict(cfg.adapt),
           "steps": args.steps, "data": {name: str(Path(where).resolve()) if Path(where).exists() else where
                                         for name, where in sorted(cfg.data.custom_datasets.items())}}
    out = args.json or results_dir() / "eval" / f"{args.setting}-{fingerprint(key)[:10]}.json"
    if args.json is not None and out.exists() and not args.overwrite and not _same_evaluation(out, key):
        raise EvalError(f"--json {out} holds another evaluation (other checkpoints, conditions or settings); choose "
                        "another path or pass --overwrite to replace it")
    if args.json is not None and not out.exists():
        refuse_overwrite(Path(out).with_suffix(".md"), args.overwrite, "the table beside --json")
    check_writable(Path(out).parent, what="the results folder", elsewhere="choose another --json")
    result = evaluate_setting(cfg, args.checkpoint, args.setting, datasets=datasets, num_steps=args.steps, path=out,
                              recompute=args.recompute, progress=not args.quiet, key=key)
    print(f"\n{result['setting_label']}\n")
    print(summary_markdown(result))
    print(f"\nwrote {out} and {Path(out).with_suffix('.md')} (every condition's full table)")
    return 0


def _same_evaluation(path: Path, key: Mapping[str, Any]) -> bool:
    """Whether ``path`` is an evaluation result made by the same inputs (which a recomputation may replace)."""
    try:
        data = read_json(path)
    except ArtifactError:
        return False
    return isinstance(data, dict) and fingerprint(data.get("key")) == fingerprint(dict(key))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hmlib.evaluation.cli ...``: the same arguments as ``hmlib eval``."""
    parser = argparse.ArgumentParser(prog="hmlib")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
