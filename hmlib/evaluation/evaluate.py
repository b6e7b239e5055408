"""The evaluation protocol: every method on identical held-out tasks, aggregated over replicate seeds.

:func:`evaluate_setting` scores hypernetwork checkpoints (one per replicate seed) and every registered baseline
(:mod:`hmlib.evaluation.methods`) on the fixed suite of a held-out dataset's *test* split, for one setting.
Representations that depend on the replicate (VAE means, backbone embeddings) are rebuilt from each
checkpoint's bundle, so a baseline on seed s reads exactly what the hypernetwork of seed s reads; per-task
accuracies are averaged over seeds, intervals are over tasks, differences are paired per task. The result is
written as ``results/eval_<setting>.json`` (+ ``.md``) and reused while its recorded identity matches.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hmlib.artifacts import ArtifactError, StaleArtifactError, check_meta, read_json
from hmlib.config import SETTINGS, Config, ConfigError, config_to_dict
from hmlib.evaluation import methods as registry
from hmlib.evaluation.inputs import SeedInputs, seed_inputs
from hmlib.evaluation.suite import fitted_size, suite_fingerprint, suite_from_labels, suite_seed
from hmlib.evaluation.tables import summary_rows_for_size, write_results
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.bundle import Bundle, load_bundle
from hmlib.metrics import clustering_accuracy
from hmlib.paths import results_dir

RESULT_SCHEMA = "hmlib-eval/2"
# Scores of methods that read raw pixels depend on the suite and the images only, not on the setting or the models:
# computed once per process (zero-shot and transductive evaluate the same suite) and reused.
_PIXEL_SCORES: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


class EvalError(ConfigError):
    """Bad input to the evaluation (unknown setting, mismatched or duplicated checkpoints)."""


def default_results_path(setting: str) -> Path:
    """``results/eval_<setting>.json`` (what notebook 03 writes and notebook 04 and the README read)."""
    if setting not in SETTINGS:
        raise EvalError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    return results_dir() / f"eval_{setting}.json"


def load_bundles(checkpoints: Sequence[str | Path]) -> list[Bundle]:
    """Bundles of distinct checkpoints of one setting with distinct seeds (duplicates refused, not double-counted)."""
    bundles: list[Bundle] = []
    for path in checkpoints:
        if not Path(path).is_file():
            raise ArtifactError(f"checkpoint not found: {path}")
        bundle = load_bundle(path)
        same = [b for b in bundles if b.sha256 == bundle.sha256]
        if same:
            raise EvalError(f"{path} is the same checkpoint as {same[0].path}; pass each replicate once")
        if any(b.meta["seed"] == bundle.meta["seed"] for b in bundles):
            raise EvalError(f"two checkpoints of replicate seed {bundle.meta['seed']} ({path}); one per seed")
        bundles.append(bundle)
    if not bundles:
        raise EvalError("no checkpoint to evaluate")
    settings = {b.setting for b in bundles}
    if len(settings) != 1:
        raise EvalError(f"the checkpoints mix settings {sorted(settings)}; evaluate one setting at a time")
    return bundles


@torch.no_grad()
def score_hypernet(bundle: Bundle, cfg: Config, inputs: SeedInputs, suite: Any, num_steps: int | None,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy (T, S+1) after 0..S inner steps, seconds (T,)) of one checkpoint, one task at a time."""
    labels, num_classes = np.asarray(suite.labels), np.asarray(suite.classes).shape[1]
    acc, seconds = [], []
    for t in tqdm(range(len(suite)), desc=f"hypernet seed {inputs.seed}", disable=not progress, leave=False):
        task = inputs.test.task_inputs(suite.indices[t:t + 1])
        start = time.perf_counter()
        pred = predict_task(bundle.hypernet, task, cfg.adapt, num_steps).argmax(-1)[:, 0].numpy()  # (S+1, N)
        seconds.append(time.perf_counter() - start)
        acc.append([clustering_accuracy(p, labels[t], num_classes) for p in pred])
    return np.asarray(acc), np.asarray(seconds)


def score_baseline(method: registry.Method, cfg: Config, inputs: SeedInputs, suite: Any, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy (T,), seconds (T,)) of one baseline on the suite, under one replicate's representations."""
    rows, labels = inputs.reps[method.reads], np.asarray(suite.labels)
    num_classes = np.asarray(suite.classes).shape[1]
    acc, seconds = np.empty(len(suite)), np.empty(len(suite))
    for t in range(len(suite)):
        x = rows[suite.indices[t]]
        if method.supervised:
            start = time.perf_counter()
            train_x, train_y = _ceiling_training_set(inputs, method.reads, suite.classes[t], cfg, seed + t)
            pred = registry.logreg_predict(train_x, train_y, x, seed=seed + t)
            seconds[t] = time.perf_counter() - start
            acc[t] = float(np.mean(pred == labels[t]))
        else:
            pred, seconds[t] = registry.run_clusterer(method, x, num_classes, seed + t, cfg.eval.kmeans_n_init)
            acc[t] = clustering_accuracy(pred, labels[t], num_classes)
    return acc, seconds


def _ceiling_training_set(inputs: SeedInputs, reads: str, classes: np.ndarray, cfg: Config, seed: int
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``eval.logreg_train_per_class`` labeled train-split rows of each of the task's classes."""
    rng = np.random.default_rng(seed)
    rows, ys = [], []
    for j, c in enumerate(classes):
        members = np.flatnonzero(inputs.train_labels == c)
        if len(members) == 0:
            raise EvalError(f"class {c} has no images in the train split; the supervised ceiling needs some")
        take = rng.choice(members, size=min(cfg.eval.logreg_train_per_class, len(members)), replace=False)
        rows.append(take)
        ys.append(np.full(len(take), j))
    rows = np.concatenate(rows)
    return inputs.train_reps[reads][rows], np.concatenate(ys)


def evaluate_setting(cfg: Config, checkpoints: Sequence[str | Path], *, dataset: str | None = None,
                     sizes: Sequence[int] | None = None, num_steps: int | None = None, path: str | Path | None = None,
                     recompute: bool = False, progress: bool = True) -> dict[str, Any]:
    """Score the checkpoints (one per replicate seed) and every baseline on the held-out suite; cached JSON."""
    bundles = load_bundles(checkpoints)
    setting = bundles[0].setting
    dataset = dataset or (cfg.meta.test_datasets[0] if cfg.meta.test_datasets else None)
    if dataset is None:
        raise EvalError("no dataset to evaluate: pass dataset= or set meta.test_datasets")
    path = Path(path) if path is not None else default_results_path(setting)
    inputs = [seed_inputs(b, cfg, dataset, with_train=i == 0, progress=progress) for i, b in enumerate(bundles)]
    labels = inputs[0].test.labels
    sizes = sorted({fitted_size(cfg, labels, n) for n in (sizes or cfg.eval.task_sizes)})
    identity = {"schema": RESULT_SCHEMA, "setting": setting, "dataset": dataset, "sizes": list(sizes),
                "num_tasks": cfg.eval.num_tasks, "num_classes": cfg.task.num_classes, "suite_seed": cfg.eval.seed,
                "eval": config_to_dict(cfg.eval), "adapt": config_to_dict(cfg.adapt), "num_steps": num_steps,
                "checkpoints": [b.sha256 for b in bundles], "inputs": [i.identity for i in inputs],
                "methods": sorted(registry.METHODS)}
    if not recompute and path.is_file():
        try:
            cached = read_json(path)
            check_meta(cached.get("identity", {}), identity, str(path))
            print(f"Reusing evaluation results from {path.name} (same suite, settings, checkpoints and inputs).")
            return cached
        except ArtifactError as err:
            print(f"Recomputing the evaluation: {err}")
    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA, "identity": identity, "setting": setting, "setting_label": SETTINGS[setting],
        "dataset": dataset, "seeds": [int(b.meta["seed"]) for b in bundles],
        "checkpoints": [{"path": str(b.path), "sha256": b.sha256, "seed": b.meta["seed"]} for b in bundles],
        "num_steps": cfg.adapt.num_inner_steps if num_steps is None else int(num_steps), "sizes": {}}
    for num_images in sizes:
        suite = suite_from_labels(labels, cfg, dataset, num_images)
        seed = suite_seed(cfg.eval.seed, dataset, num_images)
        block: dict[str, Any] = {"suite": {"seed": seed, "num_tasks": len(suite), "num_images": int(num_images),
                                           "fingerprint": suite_fingerprint(suite),
                                           "classes": np.asarray(suite.classes).tolist()}, "methods": {}}
        scored = [score_hypernet(b, cfg, i, suite, num_steps, progress) for b, i in zip(bundles, inputs)]
        block["methods"]["hypernet"] = {"acc_steps": [s[0].tolist() for s in scored],
                                        "seconds": [s[1].tolist() for s in scored]}
        for method in tqdm(registry.baselines(), desc=f"baselines N={num_images}", disable=not progress, leave=False):
            if method.reads not in inputs[0].reps:
                continue  # e.g. no backbone in the latent-only configuration
            if method.reads == "pixels":
                key = (method.name, suite_fingerprint(suite), inputs[0].identity["images"], cfg.eval.kmeans_n_init, seed)
                if key not in _PIXEL_SCORES:
                    _PIXEL_SCORES[key] = score_baseline(method, cfg, inputs[0], suite, seed)
                per_seed = [_PIXEL_SCORES[key]]
            else:
                per_seed = [score_baseline(method, cfg, i, suite, seed) for i in
                            (inputs if method.every_seed else inputs[:1])]
            block["methods"][method.name] = {"acc": [s[0].tolist() for s in per_seed],
                                             "seconds": [s[1].tolist() for s in per_seed]}
        result["sizes"][str(num_images)] = block
        block["summary"] = summary_rows_for_size(result, num_images)
    write_results(result, path)
    return result


def load_results(setting: str, path: str | Path | None = None) -> dict[str, Any]:
    """A result JSON written by :func:`evaluate_setting` (for notebooks and reports; no recomputation)."""
    path = Path(path) if path is not None else default_results_path(setting)
    result = read_json(path)
    if result.get("schema") != RESULT_SCHEMA:
        raise StaleArtifactError(f"{path} has schema {result.get('schema')!r}, expected {RESULT_SCHEMA!r}; "
                                 "re-run notebook 03 to recompute it")
    return result


def per_task_accuracy(result: Mapping[str, Any], num_images: int, method: str) -> np.ndarray:
    """Per-task accuracy (T,) of one method, averaged over replicate seeds."""
    block = result["sizes"][str(num_images)]["methods"]
    if method in ("hypernet", "hypernet_adapted"):
        acc = np.asarray(block["hypernet"]["acc_steps"], dtype=np.float64)  # (R, T, S+1)
        return acc[:, :, -1 if method == "hypernet_adapted" else 0].mean(axis=0)
    if method not in block:
        raise EvalError(f"no method {method!r} in this result; it has {', '.join(sorted(block))}")
    return np.asarray(block[method]["acc"], dtype=np.float64).mean(axis=0)


__all__ = ["EvalError", "RESULT_SCHEMA", "default_results_path", "evaluate_setting", "load_bundles",
           "load_results", "per_task_accuracy", "score_baseline", "score_hypernet"]
