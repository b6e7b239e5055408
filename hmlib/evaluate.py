"""The evaluation protocol: a fixed suite of held-out tasks, the hypernetwork and baselines on it, and ``hmlib eval``.

One call, :func:`evaluate_setting`, scores every method on identical tasks of a held-out dataset's
*test* split for one setting (``"zero_shot"`` or ``"transductive"``), aggregates means with 95%
confidence intervals over tasks (and over meta-training seeds for the hypernetwork), and writes
``results/eval_<setting>.json`` plus a markdown table beside it. Reopening reuses that file only
when its recorded identity (suite, sizes, settings, checkpoint and latent fingerprints) matches.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from hmlib import baselines
from hmlib.artifacts import (ArtifactError, StaleArtifactError, check_meta, file_sha256, fingerprint,
                             load_checkpoint, read_json, write_json)
from hmlib.config import (BUILTIN_DATASETS, AdaptConfig, Config, ConfigError, config_from_dict, config_to_dict,
                          load_config)
from hmlib.metrics import clustering_accuracy, mean_ci
from hmlib.paths import results_dir

if TYPE_CHECKING:
    from hmlib.data import TaskBatch
    from hmlib.hypernet import HyperNet
    from hmlib.latents import LatentSet

SETTINGS = ("zero_shot", "transductive")
SETTING_LABELS = {
    "zero_shot": "zero-shot (neither VAE nor hypernetwork saw the held-out dataset)",
    "transductive": "transductive (the VAE was also trained, without labels, on the held-out train split)",
}
RESULT_SCHEMA = "hmlib-eval/1"
# Row keys follow hmlib.plots.METHOD_COLORS: "hypernet" = before adaptation (0 inner steps), "hypernet_adapted" = after.
METHOD_LABELS = {
    "hypernet_adapted": "hypernetwork + test-time adaptation",
    "hypernet": "hypernetwork, no adaptation",
    **baselines.BASELINE_LABELS,
}


class EvalError(ValueError):
    """Bad input to the evaluation (unknown setting or dataset, mismatched checkpoint)."""


# ----------------------------------------------------------------------------------------- the suite

def suite_seed(base_seed: int, dataset: str, num_images: int) -> int:
    """Deterministic seed of one suite: ``cfg.eval.seed`` with the dataset and task size folded in."""
    return int(fingerprint("eval-suite", int(base_seed), dataset, int(num_images)), 16) % (2**31 - 1)


def suite_from_labels(labels: np.ndarray, cfg: Config, dataset: str, num_images: int) -> TaskBatch:
    """The suite's ``TaskBatch`` for a test split with these labels (random K-class tasks, seeded)."""
    from hmlib.data import sample_tasks

    return sample_tasks(np.asarray(labels), cfg.eval.num_tasks, cfg.task.num_classes, int(num_images),
                        mode="random", seed=suite_seed(cfg.eval.seed, dataset, num_images))


def build_suite(cfg: Config, dataset: str, num_images: int) -> TaskBatch:
    """Fixed, seeded suite of ``cfg.eval.num_tasks`` random K-class tasks from ``dataset``'s test split."""
    from hmlib.data import load_split

    images = load_split(dataset, "test", cfg.data, progress=False)
    return suite_from_labels(images.labels, cfg, dataset, num_images)


def suite_fingerprint(suite: TaskBatch) -> str:
    """Short hash of a suite's indices and classes (identical suites, identical fingerprints)."""
    return fingerprint(np.asarray(suite.indices).tolist(), np.asarray(suite.classes).tolist())


# ---------------------------------------------------------------------------------------- statistics

def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean and 95% CI half-width over tasks, plus the count."""
    values = np.asarray(values, dtype=np.float64).ravel()
    mean, half = mean_ci(values)
    return {"mean": mean, "ci": half, "n": int(values.size)}


def paired_gain(after: np.ndarray, before: np.ndarray) -> dict[str, float]:
    """Mean per-task difference ``after - before`` with its paired 95% CI, and the share of tasks improved."""
    after = np.asarray(after, dtype=np.float64)
    before = np.asarray(before, dtype=np.float64)
    if after.shape != before.shape:
        raise ValueError(f"paired gain needs matching shapes, got {after.shape} and {before.shape}")
    diff = after - before
    out = summarize(diff)
    out["excludes_zero"] = bool(abs(out["mean"]) > out["ci"])
    out["share_improved"] = float(np.mean(diff > 0))
    return out


def aggregate_seeds(acc_by_seed: np.ndarray) -> dict[str, Any]:
    """Headline over meta-training seeds: per-task mean over seeds, CI over tasks, plus the seed-to-seed spread."""
    acc_by_seed = np.asarray(acc_by_seed, dtype=np.float64)
    if acc_by_seed.ndim != 2:
        raise ValueError(f"expected (num_seeds, num_tasks), got shape {acc_by_seed.shape}")
    out = summarize(acc_by_seed.mean(axis=0))
    seed_means = acc_by_seed.mean(axis=1)
    out["num_seeds"] = int(len(seed_means))
    out["seed_means"] = seed_means.tolist()
    out["seed_std"] = float(seed_means.std(ddof=1)) if len(seed_means) > 1 else 0.0
    return out


# ------------------------------------------------------------------------------------ the hypernet

@dataclass
class HypernetScores:
    """Per-task accuracy after 0..S inner steps and seconds for generation + adaptation."""

    acc_steps: np.ndarray  # (T, S+1)
    seconds: np.ndarray  # (T,)


def score_hypernet(hypernet: HyperNet, adapt_cfg: AdaptConfig, mu: np.ndarray, logvar: np.ndarray, suite: TaskBatch, *,
                   pixels: np.ndarray | None = None, num_steps: int | None = None,
                   progress: bool = True) -> HypernetScores:
    """Run ``predict_task`` on every task of ``suite``; Hungarian-matched accuracy after each inner step."""
    import torch

    from hmlib.adapt import TaskInputs, predict_task

    indices = np.asarray(suite.indices)
    num_tasks, num_classes = indices.shape[0], np.asarray(suite.classes).shape[1]
    if indices.size and indices.max() >= len(mu):
        raise EvalError(f"suite indices reach {indices.max()} but the latents have {len(mu)} rows")
    device = next(hypernet.parameters()).device
    mu_t = torch.as_tensor(np.asarray(mu), dtype=torch.float32, device=device)
    logvar_t = torch.as_tensor(np.asarray(logvar), dtype=torch.float32, device=device)
    pixels_t = None
    if pixels is not None:
        pixels_t = torch.as_tensor(np.asarray(pixels).reshape(len(pixels), -1), dtype=torch.float32, device=device)
    hypernet.eval()
    rows, seconds = [], np.empty(num_tasks)
    for t in tqdm(range(num_tasks), desc="hypernet", disable=not progress, leave=False):
        idx = torch.as_tensor(indices[t], device=device)
        inputs = TaskInputs(mu=mu_t[idx], logvar=logvar_t[idx], pixels=None if pixels_t is None else pixels_t[idx])
        start = time.perf_counter()
        logits = predict_task(hypernet, inputs, adapt_cfg, num_steps=num_steps)  # (S+1, N, K)
        pred = logits.argmax(dim=-1).cpu().numpy()
        seconds[t] = time.perf_counter() - start
        rows.append([clustering_accuracy(p, suite.labels[t], num_classes) for p in pred])
    return HypernetScores(np.asarray(rows, dtype=np.float64), seconds)


# ----------------------------------------------------------------------------------------- inputs

@dataclass
class EvalInputs:
    """Everything the methods read for one dataset and setting (rows aligned with the test split)."""

    dataset: str
    setting: str
    test: LatentSet  # test split
    train: LatentSet  # train split (only the supervised ceiling reads it)
    pixels: np.ndarray  # (n, 784) float32 in [0, 1], test split
    labels: np.ndarray  # (n,) int64, test split
    images_fingerprint: str


def load_inputs(cfg: Config, dataset: str, setting: str, *, progress: bool = True) -> EvalInputs:
    """Test images and latents (and train latents for the ceiling) of ``dataset`` in ``setting``."""
    from hmlib.data import load_split
    from hmlib.latents import get_latents

    check_setting(setting)
    images = load_split(dataset, "test", cfg.data, progress=progress)
    test = get_latents(cfg, dataset, "test", setting, progress=progress)
    train = get_latents(cfg, dataset, "train", setting, progress=progress)
    if len(test.labels) != len(images.labels) or not np.array_equal(np.asarray(test.labels), images.labels):
        raise StaleArtifactError(f"the cached {setting} latents of {dataset}/test do not line up with its images "
                                 f"({len(test.labels)} vs {len(images.labels)} rows or different labels); "
                                 "delete the latent cache to re-encode")
    pixels = images.images.reshape(len(images.images), -1).astype(np.float32) / 255.0
    return EvalInputs(dataset, setting, test, train, pixels, np.asarray(images.labels), images.fingerprint)


def check_setting(setting: str) -> str:
    """Return ``setting`` if it is one of SETTINGS, else raise EvalError."""
    if setting not in SETTINGS:
        raise EvalError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    return setting


# ---------------------------------------------------------------------------------- one setting

def default_results_path(setting: str) -> Path:
    """``results/eval_<setting>.json`` (what notebook 03 writes and notebook 04 loads)."""
    return results_dir() / f"eval_{check_setting(setting)}.json"


def _load_checkpoints(checkpoints: Sequence[str | Path], setting: str) -> list[tuple[HyperNet, dict, Path]]:
    from hmlib.metatrain import load_hypernet

    loaded = []
    for path in checkpoints:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"checkpoint not found: {path}")
        hypernet, meta = load_hypernet(path)
        if meta.get("setting") != setting:
            raise EvalError(f"{path} was meta-trained for setting {meta.get('setting')!r}, not {setting!r}")
        loaded.append((hypernet, meta, path))
    return loaded


def checkpoint_adapt_config(meta: Mapping[str, Any], fallback: AdaptConfig) -> AdaptConfig:
    """The adaptation settings a checkpoint was meta-trained with (``fallback`` if it records no config)."""
    recorded = meta.get("config")
    return config_from_dict(recorded).adapt if recorded else fallback


def _check_vae_identity(meta: Mapping[str, Any], inputs: EvalInputs, path: Path) -> None:
    """Zero-shot: the latents must come from the VAE the hypernetwork was meta-trained on."""
    recorded = meta.get("vae_id")
    if inputs.setting == "zero_shot" and isinstance(recorded, str) and recorded != inputs.test.vae_id:
        raise StaleArtifactError(f"{path} was meta-trained on VAE {recorded}, but the {inputs.dataset} latents come "
                                 f"from VAE {inputs.test.vae_id}; re-encode with the checkpoint's VAE or retrain")


def evaluate_setting(cfg: Config, setting: str, checkpoints: Sequence[str | Path] = (), *,
                     dataset: str | None = None, sizes: Sequence[int] | None = None,
                     num_steps: int | None = None, adapt_cfg: AdaptConfig | None = None,
                     path: str | Path | None = None,
                     recompute: bool = False, inputs: EvalInputs | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Score the hypernetwork checkpoints (one per meta-training seed; may be empty) and every baseline.

    Loads ``path`` (default ``results/eval_<setting>.json``) when it was made with the same suite,
    settings, checkpoints and latents; otherwise computes, writes JSON + markdown and returns the result.
    ``adapt_cfg`` defaults to each checkpoint's recorded adaptation settings; ``num_steps`` overrides S.
    ``inputs`` (default: :func:`load_inputs`) supplies the latents and pixels, e.g. precomputed ones.
    """
    check_setting(setting)
    if dataset is None and not cfg.meta.test_datasets:
        raise EvalError("no dataset to evaluate: pass dataset= or set meta.test_datasets in the config")
    dataset = dataset or cfg.meta.test_datasets[0]
    sizes = tuple(int(n) for n in (sizes or cfg.eval.task_sizes))
    path = Path(path) if path is not None else default_results_path(setting)
    if inputs is None:
        inputs = load_inputs(cfg, dataset, setting, progress=progress)
    elif (inputs.dataset, inputs.setting) != (dataset, setting):
        raise EvalError(f"inputs are for {inputs.dataset}/{inputs.setting}, not {dataset}/{setting}")
    for ckpt in checkpoints:
        if not Path(ckpt).is_file():
            raise ArtifactError(f"checkpoint not found: {ckpt}")
    checkpoint_ids = [{"path": str(Path(p)), "sha256": file_sha256(p)} for p in checkpoints]
    identity = {
        "schema": RESULT_SCHEMA, "setting": setting, "dataset": dataset, "sizes": list(sizes),
        "num_tasks": cfg.eval.num_tasks, "num_classes": cfg.task.num_classes, "suite_seed": cfg.eval.seed,
        "kmeans_n_init": cfg.eval.kmeans_n_init, "logreg_train_per_class": cfg.eval.logreg_train_per_class,
        "gmm_covariance": cfg.eval.gmm_covariance,
        "num_steps": num_steps, "adapt": None if adapt_cfg is None else config_to_dict(adapt_cfg),
        "checkpoints": [c["sha256"] for c in checkpoint_ids], "images": inputs.images_fingerprint,
        "latents_test": inputs.test.vae_id, "latents_train": inputs.train.vae_id,
    }
    cached = None
    if not recompute and path.is_file():
        try:
            cached = read_json(path)
            check_meta(cached.get("identity", {}), identity, str(path))
            print(f"Reusing evaluation results from {path} (same suite, settings, checkpoints and latents).")
            return cached
        except (StaleArtifactError, ArtifactError) as err:
            print(f"Recomputing the evaluation: {err}")
    reusable = _reusable_baselines(cached, identity)
    loaded = _load_checkpoints(checkpoints, setting)
    for _, meta, ckpt_path in loaded:
        _check_vae_identity(meta, inputs, ckpt_path)
        if meta.get("complete") is False:
            print(f"note: {ckpt_path} is an unfinished meta-training run (iteration {meta.get('iteration')} of "
                  f"{meta.get('total_iterations')}); evaluating its best weights so far")
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA, "identity": identity, "setting": setting,
        "setting_label": SETTING_LABELS[setting], "dataset": dataset, "config": config_to_dict(cfg),
        "checkpoints": [{**c, "seed": meta.get("seed"), "vae_id": meta.get("vae_id")}
                        for c, (_, meta, _) in zip(checkpoint_ids, loaded)],
        "sizes": {},
    }
    for num_images in sizes:
        suite = suite_from_labels(inputs.labels, cfg, dataset, num_images)
        methods: dict[str, Any] = {}
        seed = suite_seed(cfg.eval.seed, dataset, num_images)
        if str(num_images) in reusable:
            methods.update(reusable[str(num_images)])
        else:
            for name, scores in _run_baselines(cfg, inputs, suite, seed, progress).items():
                methods[name] = {"acc": scores.acc.tolist(), "seconds": scores.seconds.tolist()}
        if loaded:
            per_seed = [score_hypernet(hypernet, adapt_cfg or checkpoint_adapt_config(meta, cfg.adapt),
                                       inputs.test.mu, inputs.test.logvar, suite, pixels=inputs.pixels,
                                       num_steps=num_steps, progress=progress)
                        for hypernet, meta, _ in loaded]
            methods["hypernet"] = {"seeds": [meta.get("seed") for _, meta, _ in loaded],
                                   "acc_steps": [s.acc_steps.tolist() for s in per_seed],
                                   "seconds": [s.seconds.tolist() for s in per_seed]}
        result["sizes"][str(num_images)] = {
            "suite": {"seed": seed, "num_tasks": int(len(suite.indices)), "num_images": num_images,
                      "num_classes": cfg.task.num_classes, "fingerprint": suite_fingerprint(suite),
                      "classes": np.asarray(suite.classes).tolist()},
            "methods": methods,
        }
        result["sizes"][str(num_images)]["summary"] = summary_rows_for_size(result, num_images)
    write_results(result, path)
    return result


# Identity keys that only concern the hypernetwork: when only these changed, cached baselines stay valid.
_HYPERNET_KEYS = ("checkpoints", "num_steps", "adapt")


def _reusable_baselines(cached: Mapping[str, Any] | None, identity: Mapping[str, Any]) -> dict[str, dict]:
    """Baseline scores per task size from a stale result whose baseline inputs still match (else empty)."""
    if not isinstance(cached, Mapping) or not isinstance(cached.get("identity"), Mapping):
        return {}
    recorded = cached["identity"]
    if any(recorded.get(k) != v for k, v in identity.items() if k not in _HYPERNET_KEYS and k != "sizes"):
        return {}
    reuse = {}
    for size, block in (cached.get("sizes") or {}).items():
        methods = {k: v for k, v in block.get("methods", {}).items() if k in baselines.BASELINE_LABELS}
        if set(methods) == set(baselines.BASELINE_LABELS):
            reuse[size] = methods
    if reuse:
        print(f"Only the hypernetwork inputs changed: reusing the baseline scores for N = {', '.join(reuse)}.")
    return reuse


def _run_baselines(cfg: Config, inputs: EvalInputs, suite: TaskBatch, seed: int,
                   progress: bool) -> dict[str, baselines.MethodScores]:
    """Every baseline on the identical suite and inputs."""
    n_init = cfg.eval.kmeans_n_init
    return {
        "kmeans_latent": baselines.kmeans_latent(inputs.test.mu, suite, n_init=n_init, seed=seed, progress=progress),
        "gmm_latent": baselines.gmm_latent(inputs.test.mu, suite, covariance_type=cfg.eval.gmm_covariance,
                                           seed=seed, progress=progress),
        "kmeans_pixels": baselines.kmeans_pixels(inputs.pixels, suite, n_init=n_init, seed=seed, progress=progress),
        "logreg_ceiling": baselines.logreg_ceiling(inputs.train.mu, inputs.train.labels, inputs.test.mu, suite,
                                                   train_per_class=cfg.eval.logreg_train_per_class,
                                                   seed=seed, progress=progress),
    }


# ------------------------------------------------------------------------------------- summaries

def summary_rows_for_size(result: Mapping[str, Any], num_images: int) -> list[dict[str, Any]]:
    """Table rows (one per method) for one task size: accuracy mean ± 95% CI, ms per task, gain for the hypernet."""
    block = result["sizes"][str(num_images)]
    base = {"setting": result["setting"], "dataset": result["dataset"], "num_images": int(num_images),
            "num_tasks": block["suite"]["num_tasks"]}
    rows = []
    hyper = block["methods"].get("hypernet")
    if hyper is not None:
        acc = np.asarray(hyper["acc_steps"], dtype=np.float64)  # (R, T, S+1)
        ms = 1000 * float(np.mean(hyper["seconds"]))
        before, after = aggregate_seeds(acc[:, :, 0]), aggregate_seeds(acc[:, :, -1])
        gain = paired_gain(acc[:, :, -1].mean(axis=0), acc[:, :, 0].mean(axis=0))
        steps = acc.shape[2] - 1
        rows.append({**base, "method": "hypernet_adapted", "label": f"hypernetwork + {steps} inner steps",
                     "accuracy": after["mean"], "ci": after["ci"], "ms_per_task": ms,
                     "num_seeds": after["num_seeds"], "seed_means": after["seed_means"],
                     "seed_std": after["seed_std"], "num_steps": steps,
                     "gain": gain["mean"], "gain_ci": gain["ci"], "gain_excludes_zero": gain["excludes_zero"],
                     "share_improved": gain["share_improved"]})
        rows.append({**base, "method": "hypernet", "label": METHOD_LABELS["hypernet"],
                     "accuracy": before["mean"], "ci": before["ci"], "ms_per_task": None,
                     "num_seeds": before["num_seeds"], "seed_means": before["seed_means"],
                     "seed_std": before["seed_std"]})
    for name, scores in block["methods"].items():
        if name == "hypernet":
            continue
        stats = summarize(scores["acc"])
        rows.append({**base, "method": name, "label": METHOD_LABELS.get(name, name),
                     "accuracy": stats["mean"], "ci": stats["ci"],
                     "ms_per_task": 1000 * float(np.mean(scores["seconds"])),
                     "supervised": name == "logreg_ceiling"})
    return rows


def per_task_accuracy(result: Mapping[str, Any], num_images: int, method: str) -> np.ndarray:
    """Per-task accuracy (T,) of one method; hypernet rows are averaged over meta-training seeds."""
    block = result["sizes"][str(num_images)]["methods"]
    if method in ("hypernet", "hypernet_adapted"):
        if "hypernet" not in block:
            raise EvalError("this result holds no hypernetwork scores (evaluated without checkpoints)")
        acc = np.asarray(block["hypernet"]["acc_steps"], dtype=np.float64)  # (R, T, S+1)
        return acc[:, :, -1 if method == "hypernet_adapted" else 0].mean(axis=0)
    if method not in block:
        raise EvalError(f"no method {method!r} in this result; it has {', '.join(sorted(block))}")
    return np.asarray(block[method]["acc"], dtype=np.float64)


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Summary rows of every task size in a result (what tables, headlines and figures read)."""
    return [row for n in result["sizes"] for row in result["sizes"][n]["summary"]]


def markdown_table(result_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of summary rows: setting, N, method, accuracy % ± 95% CI, ms per task, test-time gain."""
    rows = summary_rows(result_or_rows) if isinstance(result_or_rows, Mapping) else list(result_or_rows)
    lines = ["| setting | dataset | N | tasks | method | accuracy % (95% CI) | ms / task "
             "| test-time gain, points (paired 95% CI) |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        acc = f"{100 * row['accuracy']:.1f} ± {100 * row['ci']:.1f}"
        if row.get("num_seeds", 1) > 1:
            acc += f" (seed sd {100 * row['seed_std']:.1f}, {row['num_seeds']} seeds)"
        ms = "" if row.get("ms_per_task") is None else f"{row['ms_per_task']:.1f}"
        gain = f"{100 * row['gain']:+.1f} ± {100 * row['gain_ci']:.1f}" if "gain" in row else ""
        lines.append(f"| {row['setting']} | {row['dataset']} | {row['num_images']} | {row['num_tasks']} | "
                     f"{row['label']} | {acc} | {ms} | {gain} |")
    return "\n".join(lines)


def headline_rows(result_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows of display strings (for ``hmlib.reports.record_headline``): one per method and task size."""
    rows = summary_rows(result_or_rows) if isinstance(result_or_rows, Mapping) else list(result_or_rows)
    flat = []
    for row in rows:
        seeds = row.get("num_seeds", 1)
        flat.append({
            "setting": row["setting"], "dataset": row["dataset"], "N": row["num_images"], "tasks": row["num_tasks"],
            "method": row["label"], "accuracy %": f"{100 * row['accuracy']:.1f} ± {100 * row['ci']:.1f}",
            "seeds": seeds, "seed sd": f"{100 * row['seed_std']:.1f}" if seeds > 1 else "",
            "ms / task": "" if row.get("ms_per_task") is None else f"{row['ms_per_task']:.1f}",
            "gain, points": f"{100 * row['gain']:+.1f} ± {100 * row['gain_ci']:.1f}" if "gain" in row else "",
        })
    return flat


def write_results(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write the result JSON and its markdown table (``.md`` beside it), both atomically."""
    from hmlib.artifacts import atomic_path

    path = Path(path)
    write_json(path, result)
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(f"# Evaluation: {result['dataset']}, {result['setting_label']}\n\n"
                       f"{markdown_table(result)}\n")
    return path


def load_results(setting: str, path: str | Path | None = None) -> dict[str, Any]:
    """Read a result JSON written by :func:`evaluate_setting` (no staleness check; for reports)."""
    path = Path(path) if path is not None else default_results_path(setting)
    result = read_json(path)
    if result.get("schema") != RESULT_SCHEMA:
        raise StaleArtifactError(f"{path} has schema {result.get('schema')!r}, expected {RESULT_SCHEMA!r}; "
                                 "delete it to recompute")
    return result


# --------------------------------------------------------------------------------------------- CLI

def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hmlib eval`` on an argparse subparsers object; the handler is ``args.func(args)``."""
    parser = subparsers.add_parser(
        "eval", help="score a hypernetwork checkpoint and the baselines on a held-out dataset's task suite",
        description="Run the fixed evaluation suite (random K-class tasks from the test split) for a checkpoint "
                    "on any registered dataset or a local mirror folder, against k-means / GMM on the VAE means, "
                    "k-means on pixels and a supervised logistic-regression ceiling. Prints a markdown table and "
                    "writes JSON + .md.")
    parser.add_argument("--checkpoint", required=True, nargs="+", type=Path, metavar="PATH",
                        help="hypernetwork checkpoint(s); several (one per meta-training seed) are aggregated")
    parser.add_argument("--dataset", required=True, metavar="NAME", help="dataset to evaluate on (its test split)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="local mirror holding DIR/NAME/{train,test}.parquet (a dataset never seen before is fine)")
    parser.add_argument("--tasks", type=_positive_int, metavar="T",
                        help="number of tasks (default: config eval.num_tasks)")
    parser.add_argument("--n", type=_positive_int, nargs="+", metavar="N",
                        help="images per task (default: config eval.task_sizes)")
    parser.add_argument("--steps", type=_non_negative_int, metavar="S",
                        help="inner steps at test time (default: the checkpoint's)")
    parser.add_argument("--json", type=Path, metavar="OUT",
                        help="result JSON (default: results/eval_<setting>_<dataset>_<checkpoint>.json); .md beside it")
    parser.add_argument("--profile", default=None,
                        help="config profile for data/eval settings (default: the checkpoint's)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="JSON config overrides")
    parser.add_argument("--recompute", action="store_true", help="ignore a matching cached result")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=partial(run_eval_command, parser=parser))
    return parser


def config_for_checkpoint(meta: Mapping[str, Any], *, profile: str | None = None, config_path: str | Path | None = None,
                          overrides: Mapping[str, Any] | None = None) -> Config:
    """Config to evaluate a checkpoint: model settings (task, vae, hyper, adapt, meta) from the checkpoint,
    data/eval settings from ``profile``/``config_path`` (default: the checkpoint's own), then ``overrides``."""
    recorded = dict(meta.get("config") or {})
    if not recorded:
        raise ArtifactError("the checkpoint records no config; it was not written by hmlib.metatrain")
    recorded_profile = recorded.pop("profile", "default")
    if profile is None and config_path is None:
        merged = _deep_merge(recorded, overrides or {})
        return load_config(recorded_profile, None, merged)
    model_sections = {k: recorded[k] for k in ("task", "vae", "hyper", "adapt", "meta") if k in recorded}
    return load_config(profile or recorded_profile, config_path, _deep_merge(model_sections, overrides or {}))


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "custom_datasets":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def run_eval_command(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Handler of ``hmlib eval``: validate arguments, evaluate, print the markdown table; returns 0."""

    def fail(message: str) -> None:
        if parser is not None:
            parser.error(message)  # prints usage + message, exits with status 2
        raise EvalError(message)

    checkpoints = [Path(p) for p in args.checkpoint]
    for path in checkpoints:
        if not path.is_file():
            fail(f"checkpoint not found: {path}")
    metas = []
    for path in checkpoints:
        try:
            metas.append(load_checkpoint(path)[1])
        except ArtifactError as err:
            fail(str(err))
    settings = {m.get("setting") for m in metas}
    if len(settings) != 1 or not settings <= set(SETTINGS):
        fail(f"checkpoints must all record one setting of {', '.join(SETTINGS)}; found {sorted(map(str, settings))}")
    setting = settings.pop()

    overrides: dict[str, Any] = {"eval": {}, "data": {}}
    dataset = args.dataset
    custom = dict(((metas[0].get("config") or {}).get("data") or {}).get("custom_datasets") or {})
    if args.data_dir is not None:
        data_dir = Path(args.data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            fail(f"--data-dir {args.data_dir} is not a folder")
        overrides["data"]["data_dir"] = str(data_dir)
        if dataset not in BUILTIN_DATASETS:
            folder = data_dir / dataset
            if not (folder / "test.parquet").is_file() and not (folder / "train.parquet").is_file():
                fail(f"unknown dataset '{dataset}': {folder} holds no train.parquet / test.parquet "
                     f"(registered: {', '.join(sorted(set(BUILTIN_DATASETS) | set(custom)))})")
            custom[dataset] = str(folder)
            overrides["data"]["custom_datasets"] = custom
    if dataset not in BUILTIN_DATASETS and dataset not in custom:
        fail(f"unknown dataset '{dataset}'; registered: {', '.join(sorted(set(BUILTIN_DATASETS) | set(custom)))}. "
             "For a local mirror folder pass --data-dir DIR with DIR/NAME/{train,test}.parquet")
    if args.tasks is not None:
        overrides["eval"]["num_tasks"] = args.tasks
    if args.n is not None:
        overrides["eval"]["task_sizes"] = list(args.n)
    try:
        cfg = config_for_checkpoint(metas[0], profile=args.profile, config_path=args.config,
                                    overrides={k: v for k, v in overrides.items() if v})
    except ConfigError as err:
        fail(str(err))
    if dataset in cfg.meta.train_datasets:
        print(f"note: {dataset} is one of the checkpoint's meta-training datasets; this is not a held-out evaluation",
              file=sys.stderr)
    out = args.json or results_dir() / f"eval_{setting}_{dataset}_{checkpoints[0].stem}.json"
    result = evaluate_setting(cfg, setting, checkpoints, dataset=dataset, num_steps=args.steps, path=out,
                              recompute=args.recompute, progress=not args.quiet)
    print(f"\n{SETTING_LABELS[setting]}\n")
    print(markdown_table(result))
    print(f"\nwrote {out} and {Path(out).with_suffix('.md')}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (``python -m hmlib.evaluate ...``), same arguments as ``hmlib eval``."""
    parser = argparse.ArgumentParser(prog="hmlib")
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
