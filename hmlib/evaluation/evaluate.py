"""The evaluation protocol: every method on identical held-out tasks, over a grid of conditions and replicate seeds.

:func:`evaluate_setting` scores hypernetwork checkpoints (one per replicate seed) and every registered baseline
(:mod:`hmlib.evaluation.methods`) on the suite of every condition of the grid (:mod:`hmlib.evaluation.conditions`:
held-out datasets, clean and shifted, x task shapes), in one setting. Representations that depend on the
replicate (VAE means, backbone embeddings) are rebuilt from each checkpoint's bundle, so a baseline on seed s reads
exactly what the hypernetwork of seed s reads; per-task accuracies are averaged over seeds, intervals are over
tasks, differences are paired per task. Each condition is written as soon as it is done
(``results/eval/<setting>/<condition>.json``) and reused while its recorded identity matches: an interrupted
grid resumes where it stopped. The whole grid's summary is ``results/eval_<setting>.json`` (+ ``.md``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hmlib.artifacts import (ArtifactError, StaleArtifactError, check_meta, read_json, set_aside_unless_same,
                             write_json)
from hmlib.backbone.transductive import require_adapted
from hmlib.config import SETTINGS, Config, ConfigError, config_to_dict, resolve_device
from hmlib.evaluation import methods as registry
from hmlib.evaluation.conditions import Condition, grid, suite_fingerprint, suite_for, suite_seed
from hmlib.evaluation.inputs import SeedInputs, seed_inputs
from hmlib.evaluation.tables import grid_summary, write_results
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.bundle import Bundle, load_bundle
from hmlib.hyper.losses import task_accuracy
from hmlib.paths import results_dir

RESULT_SCHEMA = "hmlib-eval/3"


class EvalError(ConfigError):
    """Bad input to the evaluation (unknown setting, mismatched or duplicated checkpoints)."""


def check_setting(setting: str) -> str:
    if setting not in SETTINGS:
        raise EvalError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")
    return setting


def default_results_path(setting: str) -> Path:
    """``results/eval_<setting>.json`` (what notebook 03 writes and notebook 04 and the README read)."""
    return results_dir() / f"eval_{check_setting(setting)}.json"


def condition_path(summary_path: Path, condition: Condition) -> Path:
    """Where one condition of a grid is cached: beside the summary, in a folder named after it."""
    return summary_path.with_suffix("") / f"{condition.key}.json"


def load_bundles(checkpoints: Sequence[str | Path | Bundle], device: torch.device | str | None = None
                 ) -> list[Bundle]:
    """Bundles of distinct checkpoints with distinct seeds (duplicates refused, not double-counted), on ``device``
    (a bundle already loaded is taken as it is)."""
    bundles: list[Bundle] = []
    for path in checkpoints:
        if isinstance(path, Bundle):
            bundle, path = path, path.path
        elif not Path(path).is_file():
            raise ArtifactError(f"checkpoint not found: {path}")
        else:
            bundle = load_bundle(path, device)
        same = [b for b in bundles if b.sha256 == bundle.sha256]
        if same:
            raise EvalError(f"{path} is the same checkpoint as {same[0].path}; pass each replicate once")
        if any(b.seed == bundle.seed for b in bundles):
            other = next(b.path for b in bundles if b.seed == bundle.seed)
            raise EvalError(f"two checkpoints of replicate seed {bundle.seed} ({other} and {path}); pass one per seed "
                            "(the last `hmlib run`'s are listed in models/pipeline.json, and `hmlib eval` without "
                            "--checkpoint takes them)")
        differs = [what for what, of in (("meta-training", lambda b: b.meta.get("training")),
                                         ("VAE", lambda b: b.vae_meta.get("settings")),
                                         ("backbone", lambda b: (b.backbone_meta or {}).get("settings")))
                   if bundles and of(bundle) != of(bundles[0])]
        if differs:  # e.g. a smoke run's seed 0 recorded beside a default run's seeds 1 and 2
            raise EvalError(f"{path} (seed {bundle.seed}) was made with other {' and '.join(differs)} settings than "
                            f"{bundles[0].path} (seed {bundles[0].seed}): replicates must come from one protocol; "
                            "re-run `hmlib run` so every seed is made with one config, or pass --checkpoint for the "
                            "ones that belong together")
        bundles.append(bundle)
    if not bundles:
        raise EvalError("no checkpoint to evaluate")
    return bundles


@torch.no_grad()
def score_hypernet(inputs: SeedInputs, cfg: Config, suite: Any, num_steps: int | None,
                   chunk: int = 25) -> tuple[np.ndarray, float]:
    """(accuracy (T, S+1) after 0..S inner steps, seconds per task) of one replicate's hypernetwork, batched
    (``num_steps`` None: ``adapt.test_steps``)."""
    import time

    start = time.perf_counter()
    indices, labels = np.asarray(suite.indices), np.asarray(suite.labels)
    logits = predict_task(inputs.hypernet, inputs.test.task_inputs(indices), cfg.adapt, num_steps,
                          num_classes=int(np.asarray(suite.classes).shape[1]), chunk=chunk)  # (S+1, T, N, K)
    seconds = (time.perf_counter() - start) / len(indices)
    return np.stack([task_accuracy(step, labels) for step in logits], axis=1), seconds


def evaluate_condition(cfg: Config, inputs: Sequence[SeedInputs], condition: Condition, *, num_steps: int | None,
                       checkpoints: Sequence[str], path: Path, recompute: bool = False, progress: bool = False
                       ) -> dict[str, Any]:
    """Every method on one condition's suite under every replicate; cached at ``path`` while its identity matches."""
    labels = inputs[0].test.labels
    suite = suite_for(cfg, condition, labels)
    seed = suite_seed(cfg.eval.seed, condition)
    identity = {"schema": RESULT_SCHEMA, "setting": inputs[0].setting, "condition": condition.__dict__,
                "num_tasks": cfg.eval.num_tasks, "suite": suite_fingerprint(suite), "eval": config_to_dict(cfg.eval),
                "adapt": config_to_dict(cfg.adapt), "num_steps": num_steps, "checkpoints": list(checkpoints),
                "inputs": [i.identity for i in inputs], "methods": sorted(registry.METHODS)}
    if not recompute and path.is_file():
        try:
            cached = read_json(path)
            check_meta(cached.get("identity", {}), identity, str(path))
            return cached
        except ArtifactError as err:
            print(f"Recomputing {condition.key}: {str(err).splitlines()[0]}")
    block: dict[str, Any] = {"identity": identity, "condition": {**condition.__dict__, "key": condition.key,
                                                                "label": condition.label, "shift": condition.shift},
                             "suite": {"seed": seed, "num_tasks": len(suite), "classes": np.asarray(suite.classes).tolist()},
                             "methods": {}}
    scored = [score_hypernet(i, cfg, suite, num_steps) for i in inputs]
    block["methods"]["hypernet"] = {"acc_steps": [s[0].tolist() for s in scored], "seconds": [s[1] for s in scored]}
    contexts = [registry.MethodContext(cfg, i, suite, seed) for i in inputs]  # one memo per replicate
    for method in tqdm(registry.baselines(), desc=condition.key, disable=not progress, leave=False):
        if not available(method, inputs[0]):
            continue  # e.g. no backbone in the latent-only configuration
        per_seed = [registry.score(method, ctx) for ctx in (contexts if method.every_seed else contexts[:1])]
        block["methods"][method.name] = {"acc": [s[0].tolist() for s in per_seed],
                                         "seconds": [s[1] for s in per_seed]}
    write_json(path, block)
    return block


def available(method: registry.Method, inputs: SeedInputs) -> bool:
    """Whether a method can be scored on these inputs (what it reads exists)."""
    if method.reads == "images":
        return inputs.backbone is not None
    return method.reads is None or method.reads in inputs.reps


def evaluate_setting(cfg: Config, checkpoints: Sequence[str | Path | Bundle], setting: str = "zero_shot", *,
                     datasets: Sequence[str] | None = None, shapes: Sequence[Sequence[int]] | None = None,
                     num_steps: int | None = None, path: str | Path | None = None, recompute: bool = False,
                     progress: bool = True, key: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Score the checkpoints (one per replicate seed; paths or loaded bundles) and every baseline on every condition
    of the grid (``key``: what made this result, recorded in it)."""
    check_setting(setting)
    bundles = load_bundles(checkpoints, resolve_device(cfg.device))
    path = Path(path) if path is not None else default_results_path(setting)
    conditions = grid(cfg, datasets, shapes)
    if not conditions:
        raise EvalError("no condition to evaluate: every task shape asks for more classes than its dataset has "
                        "(see the notes above); ask for a smaller K")
    if setting == "transductive":  # every adapted backbone first: a missing one fails here, not conditions later
        for dataset in dict.fromkeys(c.dataset for c in conditions):
            for bundle in bundles:
                if bundle.backbone is not None:
                    require_adapted(cfg, bundle.backbone, bundle.backbone_meta, dataset)
    shas = [b.sha256 for b in bundles]
    blocks, cache = [], {}
    bar = tqdm(conditions, desc=f"evaluate {setting}", disable=not progress)
    for condition in bar:
        bar.set_postfix_str(condition.key)
        if condition.dataset not in cache:
            cache.clear()  # one dataset's inputs in memory at a time
            cache[condition.dataset] = [seed_inputs(b, cfg, condition.dataset, setting, with_train=i == 0,
                                                    progress=False) for i, b in enumerate(bundles)]
        blocks.append(evaluate_condition(cfg, cache[condition.dataset], condition, num_steps=num_steps,
                                         checkpoints=shas, path=condition_path(path, condition), recompute=recompute,
                                         progress=False))
    result = {"schema": RESULT_SCHEMA, "setting": setting, "setting_label": SETTINGS[setting],
              "seeds": [b.seed for b in bundles],
              "checkpoints": [{"path": str(b.path), "sha256": b.sha256, "seed": b.seed} for b in bundles],
              "num_steps": cfg.adapt.steps_at_test if num_steps is None else int(num_steps),
              "num_tasks": cfg.eval.num_tasks, "profile": cfg.profile, "key": dict(key or {}), "conditions": blocks}
    result["summary"] = grid_summary(result)
    keep_previous(path, result)
    write_results(result, path)
    return result


def keep_previous(path: Path, result: Mapping[str, Any]) -> Path | None:
    """Set the result at ``path`` (and its .md) aside where other checkpoints, another grid, task count, step count or
    key made it, so a run with other settings never destroys a finished one (a re-run of the same is replaced); the
    old file's new path, or None."""
    made = lambda r: ([c.get("sha256") for c in r.get("checkpoints", [])],  # noqa: E731
                      [b.get("condition", {}).get("key") for b in r.get("conditions", [])],
                      r.get("num_tasks"), r.get("num_steps"), r.get("key"), r.get("setting"))
    return set_aside_unless_same(path, lambda old: made(old) == made(result), "other checkpoints or settings",
                                 also=(".md",))


def load_results(setting: str, path: str | Path | None = None) -> dict[str, Any]:
    """A result JSON written by :func:`evaluate_setting` (for notebooks and reports; no recomputation)."""
    path = Path(path) if path is not None else default_results_path(setting)
    result = read_json(path)
    if result.get("schema") != RESULT_SCHEMA:
        raise StaleArtifactError(f"{path} has schema {result.get('schema')!r}, expected {RESULT_SCHEMA!r}; "
                                 "re-run notebook 03 to recompute it")
    return result


def per_task_accuracy(block: Mapping[str, Any], method: str) -> np.ndarray:
    """Per-task accuracy (T,) of one method in one condition's block, averaged over replicate seeds."""
    methods = block["methods"]
    if method in ("hypernet", "hypernet_adapted"):
        acc = np.asarray(methods["hypernet"]["acc_steps"], dtype=np.float64)  # (R, T, S+1)
        return acc[:, :, -1 if method == "hypernet_adapted" else 0].mean(axis=0)
    if method not in methods:
        raise EvalError(f"no method {method!r} in this result; it has {', '.join(sorted(methods))}")
    return np.asarray(methods[method]["acc"], dtype=np.float64).mean(axis=0)


__all__ = ["EvalError", "RESULT_SCHEMA", "default_results_path", "evaluate_condition", "evaluate_setting",
           "load_bundles", "load_results", "per_task_accuracy", "score_hypernet"]
