"""``hmlib eval``: score checkpoints and every baseline on a held-out dataset's fixed task suite.

Model settings come from the checkpoints; data and evaluation settings from ``--profile``/``--config``
(default: the checkpoint's own), and a ``--config`` that changes the test-time adaptation is honoured and
recorded. The checkpoint bundles the VAE and backbone it reads through, so a zero-shot checkpoint copied
to a fresh machine evaluates as it is; nothing is ever trained here.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from hmlib.artifacts import ArtifactError, load_checkpoint, read_json, refuse_overwrite
from hmlib.data.registry import check_name
from hmlib.config import Config, ConfigError, load_config, registered_datasets, with_overrides
from hmlib.evaluation.evaluate import EvalError, evaluate_setting, load_bundles
from hmlib.evaluation.tables import markdown_table
from hmlib.paths import results_dir
from hmlib.validation import read_config_file

MODEL_SECTIONS = ("task", "vae", "backbone", "hyper", "meta")  # what made the checkpoint (not cfg.seeds: a
# checkpoint is one replicate, its seed is in its meta; the profile's seeds keep ablation.num_seeds valid)


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
        "eval", help="score checkpoints and the baselines on a held-out dataset's task suite",
        description="Run the fixed evaluation suite (random K-class tasks from the test split) for hypernetwork "
                    "checkpoints (one per replicate seed, aggregated) on a registered dataset or a local mirror "
                    "folder, against k-means / GMM / spectral clustering on the backbone embedding, k-means / GMM "
                    "on the VAE means, k-means on pixels and supervised ceilings. Prints a markdown table and "
                    "writes JSON + .md. Never trains.")
    parser.add_argument("--checkpoint", required=True, nargs="+", type=Path, metavar="PATH",
                        help="hypernetwork checkpoint(s) models/hypernet_<setting>_seed<s>-<hash>.pt, one per seed")
    parser.add_argument("--dataset", required=True, metavar="NAME", help="dataset to evaluate on (its test split)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="local mirror holding DIR/NAME/{train,test}.parquet (a dataset never seen before is fine)")
    parser.add_argument("--tasks", type=_at_least(2), metavar="T", help="number of tasks, >= 2 (default: eval.num_tasks)")
    parser.add_argument("--n", type=_at_least(4), nargs="+", metavar="N", help="images per task (default: eval.task_sizes)")
    parser.add_argument("--steps", type=_at_least(0), metavar="S", help="inner steps at test time (default: the checkpoint's)")
    parser.add_argument("--json", type=Path, metavar="OUT",
                        help="result JSON (default: results/eval_<setting>_<dataset>_<checkpoint>.json); .md beside it")
    parser.add_argument("--overwrite", action="store_true", help="replace --json if it exists and was not made by hmlib eval")
    parser.add_argument("--profile", default=None, help="config profile for data/eval settings (default: the checkpoint's)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="JSON overrides (data, eval, and test-time adapt settings); model settings are the checkpoint's")
    parser.add_argument("--recompute", action="store_true", help="ignore a matching cached result")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_eval_command)
    return parser


def config_for_checkpoint(meta: Mapping[str, Any], *, profile: str | None = None, config_path: str | Path | None = None,
                          overrides: Mapping[str, Any] | None = None) -> Config:
    """Evaluation config: model sections from the checkpoint, the rest from ``profile`` (default the checkpoint's),
    then ``config_path`` and ``overrides``; a file that changes a model section is refused."""
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
    adapt = {**recorded.get("adapt", {}), **file_overrides.pop("adapt", {})}
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


def _dataset_overrides(args: argparse.Namespace, custom: Mapping[str, str]) -> dict[str, Any]:
    """data.* overrides for --dataset/--data-dir, refusing names that could point outside the artifact folder."""
    dataset = check_name(args.dataset, "--dataset name")
    out: dict[str, Any] = {}
    known = set(registered_datasets()) | set(custom)
    if args.data_dir is not None:
        data_dir = Path(args.data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise EvalError(f"--data-dir {args.data_dir} is not a folder")
        out["data_dir"] = str(data_dir)
        if dataset not in registered_datasets():
            folder = data_dir / dataset
            if not (folder / "test.parquet").is_file() and not (folder / "train.parquet").is_file():
                raise EvalError(f"{folder} holds no train.parquet / test.parquet")
            out["custom_datasets"] = {**custom, dataset: str(folder)}
            known.add(dataset)
    if dataset not in known:
        raise EvalError(f"unknown dataset '{dataset}'; registered: {', '.join(sorted(known))}. For a local mirror "
                        "folder pass --data-dir DIR with DIR/NAME/{train,test}.parquet")
    return out


def run_eval_command(args: argparse.Namespace) -> int:
    """Handler of ``hmlib eval``: validate, evaluate, print the markdown table; returns 0."""
    if args.config is not None:
        read_config_file(args.config)  # a bad file fails before any checkpoint is read
    for path in args.checkpoint:
        if not Path(path).is_file():
            raise EvalError(f"checkpoint not found: {path}")
    meta = load_checkpoint(args.checkpoint[0])[1]  # settings first: bad arguments fail before models load
    custom = dict(((meta.get("config") or {}).get("data") or {}).get("custom_datasets") or {})
    overrides: dict[str, Any] = {"data": _dataset_overrides(args, custom), "eval": {}}
    if args.tasks is not None:
        overrides["eval"]["num_tasks"] = args.tasks
    if args.n is not None:
        overrides["eval"]["task_sizes"] = list(args.n)
    try:
        cfg = config_for_checkpoint(meta, profile=args.profile, config_path=args.config,
                                    overrides={k: v for k, v in overrides.items() if v})
    except ConfigError as err:
        raise EvalError(str(err)) from None
    bundles = load_bundles(args.checkpoint)
    setting = bundles[0].setting
    if args.dataset in cfg.meta.train_datasets:
        print(f"note: {args.dataset} is a meta-training dataset of these checkpoints; this is not a held-out "
              "evaluation", file=sys.stderr)
    out = args.json or results_dir() / f"eval_{setting}_{args.dataset}_{Path(args.checkpoint[0]).stem}.json"
    if args.json is not None and not _made_by_eval(out):
        refuse_overwrite(out, args.overwrite, "--json")
    if args.json is not None and not (Path(out).is_file() and _made_by_eval(out)):  # not the table of a result
        refuse_overwrite(Path(out).with_suffix(".md"), args.overwrite, "the table beside --json")
    result = evaluate_setting(cfg, [b.path for b in bundles], dataset=args.dataset, num_steps=args.steps, path=out,
                              recompute=args.recompute, progress=not args.quiet)
    print(f"\n{result['setting_label']}\n")
    print(markdown_table(result))
    print(f"\nwrote {out} and {Path(out).with_suffix('.md')}")
    return 0


def _made_by_eval(path: Path) -> bool:
    """Whether ``path`` is an evaluation result (which a new evaluation may replace)."""
    if not path.is_file():
        return True
    try:
        data = read_json(path)
    except ArtifactError:
        return False
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("hmlib-eval/")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hmlib.evaluation.cli ...``: the same arguments as ``hmlib eval``."""
    parser = argparse.ArgumentParser(prog="hmlib")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
