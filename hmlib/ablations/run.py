"""Running an ablation: every variant of every replicate seed on identical tasks of the ablation grid, cached.

The ablation grid is ``ablation.datasets`` (default: the held-out datasets of the protocol, clean and shifted) at
``ablation.shapes``, the first ``ablation.num_tasks`` tasks of each condition's evaluation suite; a variant's
per-task accuracy after 0..S inner steps is pooled over the grid's tasks (the condition of every task is kept, for
per-condition tables). k-means on the backbone embedding of the same seed and tasks is recorded beside it.
Results live in ``results/ablations/<key>.json`` with every setting, checkpoint and task fingerprint that made
them; a cache made by other inputs is recomputed (and says so), never silently reused. Variants with their own
meta-training are trained here when missing (notebook 04 is the stage that makes them), under
``models/ablations/``, apart from the pipeline's checkpoints.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hmlib.ablations.report import AblationResult
from hmlib.ablations.spec import Ablation, Variant, define_ablations
from hmlib.artifacts import ArtifactError, file_sha256, fingerprint, read_json, set_aside_unless_same, write_json
from hmlib.backbone.transductive import get_transductive_backbone
from hmlib.config import Config, ConfigError, config_to_dict, resolve_device, settings_of, with_overrides
from hmlib.evaluation.conditions import Condition, grid, suite_fingerprint, suite_for, suite_seed
from hmlib.evaluation.inputs import SeedInputs, seed_inputs
from hmlib.evaluation.methods import METHODS, MethodContext, score
from hmlib.hyper.adapt import choice_rule, predict_task
from hmlib.hyper.bundle import load_bundle
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.losses import task_accuracy
from hmlib.hyper.metatrain import meta_train
from hmlib.paths import results_dir
from hmlib.reproducibility import seeded
from hmlib.vae.train import encode_images

RESULT_VERSION = 4  # 4: a step curve follows the candidate chosen after the test-time steps (was: after its last)


def ablation_seeds(cfg: Config) -> tuple[int, ...]:
    """Replicate seeds every ablation uses: the first ``ablation.num_seeds`` of ``cfg.seeds``."""
    return tuple(cfg.seeds[: cfg.ablation.num_seeds])


def ablation_grid(cfg: Config, ablation: Ablation | None = None) -> list[Condition]:
    """The conditions an ablation is scored on (the transductive one: those of ``transductive.datasets``)."""
    if cfg.ablation.num_tasks > cfg.eval.num_tasks:
        raise ConfigError(f"ablation.num_tasks = {cfg.ablation.num_tasks} exceeds eval.num_tasks = "
                          f"{cfg.eval.num_tasks}: the ablations use the first tasks of the evaluation suites")
    datasets = list(cfg.ablation.datasets or cfg.meta.test_datasets)
    if ablation is not None and ablation.transductive_only:
        datasets = [d for d in datasets if d in (cfg.transductive.datasets or cfg.meta.test_datasets)]
    return grid(cfg, datasets, cfg.ablation.shapes, verbose=False)


def training_config(cfg: Config, variant: Variant) -> Config:
    """Config of a variant's hypernetwork: the protocol's, or with its overrides (and ablation.meta_iterations)."""
    if not variant.retrained:
        return cfg
    overrides = dict(variant.train_overrides)
    if cfg.ablation.meta_iterations is not None:
        overrides["meta"] = {**overrides.get("meta", {}), "iterations": int(cfg.ablation.meta_iterations)}
    return with_overrides(cfg, overrides)


def _checkpoint(cfg: Config, variant: Variant, seed: int, memo: dict, progress: bool) -> Path:
    """The checkpoint of a variant's hypernetwork for one seed (trained here if a re-trained variant is missing)."""
    train_cfg = training_config(cfg, variant)
    key = ("checkpoint", fingerprint(config_to_dict(train_cfg)), seed)
    if key not in memo:
        memo[key] = meta_train(train_cfg, seed, train=variant.retrained, progress=progress,
                               folder="ablations" if variant.retrained else None).checkpoint_path
    return memo[key]


def _inputs(cfg: Config, path: Path, dataset: str, memo: dict, backbone: str = "setting") -> SeedInputs:
    """What a checkpoint's models read of a held-out dataset, with the backbone a variant asks for."""
    key = ("inputs", str(path), dataset, backbone)
    if key not in memo:
        setting = cfg.ablation.setting if backbone == "setting" else backbone
        if setting == "statistics":  # the transductive stage with no epoch: statistics only (trained here: cheap)
            stats_cfg = with_overrides(cfg, {"transductive": {"epochs": 0, "gate": "off"}})
            bundle = load_bundle(path, resolve_device(cfg.device))
            get_transductive_backbone(stats_cfg, bundle.backbone, bundle.backbone_meta, dataset, progress=False)
            memo[key] = seed_inputs(bundle, stats_cfg, dataset, "transductive", with_train=False)
        elif setting == "ungated":  # the protocol's adapted backbone, used even where the gate declines it
            memo[key] = seed_inputs(load_bundle(path, resolve_device(cfg.device)),
                                    with_overrides(cfg, {"transductive": {"gate": "off"}}), dataset, "transductive",
                                    with_train=False)
        else:
            memo[key] = seed_inputs(load_bundle(path, resolve_device(cfg.device)), cfg, dataset, setting,
                                    with_train=False)
    return memo[key]


def variant_hypernet(variant: Variant, inputs: SeedInputs, seed: int, memo: dict) -> HyperNet:
    """The hypernetwork a variant adapts with: as trained, untrained, or with test-time generator overrides."""
    key = ("hypernet", id(inputs), variant.untrained, tuple(sorted(variant.film_overrides.items())))
    if key not in memo:
        hypernet = inputs.hypernet
        if variant.untrained:
            hypernet = initial_hypernet(inputs, seed)
        if variant.film_overrides:
            # a deep copy: a shallow copy of a Module shares its table of submodules, so assigning the copy's
            # generator would change the protocol's hypernetwork for every later variant
            hypernet = copy.deepcopy(hypernet)
            hypernet.generator.film = dataclasses.replace(hypernet.generator.film, **variant.film_overrides)
        memo[key] = hypernet.eval()
    return memo[key]


def initial_hypernet(inputs: SeedInputs, seed: int) -> HyperNet:
    """The meta-trained architecture re-initialised from the replicate's seed (the backbone and the conditioning's
    normalisation kept): what meta-training started from."""
    trained = inputs.hypernet
    with seeded(seed):
        fresh = HyperNet(trained.full_cfg, trained.context_dim, trained.num_classes,
                         backbone=copy.deepcopy(getattr(trained.generator, "backbone", None)),
                         feature_dim=trained.feature_dim)
    fresh.to(trained.device)  # initialised on the CPU (the same weights on every device)
    fresh.context_mean.copy_(trained.context_mean)
    fresh.context_std.copy_(trained.context_std)
    return fresh.eval()


def _context(variant: Variant, inputs: SeedInputs, bundle_vae: Any, indices: np.ndarray, seed: int
             ) -> torch.Tensor | None:
    """Conditioning rows replacing the task's own: noise images' VAE distribution, or a constant (the mean row)."""
    if variant.context == "task":
        return None
    T, N = indices.shape
    if variant.context == "noise":
        noise = np.random.default_rng(seed).integers(0, 256, size=(T * N, 28, 28), dtype=np.uint8)
        mu, logvar = encode_images(bundle_vae, noise)
        return torch.as_tensor(np.concatenate([mu, logvar], axis=1).reshape(T, N, -1))
    mean = inputs.hypernet.context_mean.view(1, 1, -1)
    return mean.expand(T, N, -1).clone()


@torch.no_grad()
def variant_curves(cfg: Config, variant: Variant, condition: Condition, seed: int, memo: dict,
                   progress: bool = False) -> np.ndarray:
    """(T, S+1) accuracy of every ablation task of a condition after 0..S inner steps of the variant (one seed);
    a baseline variant repeats its one accuracy over the steps."""
    main_path = _checkpoint(cfg, Variant("main"), seed, memo, progress)
    inputs = _inputs(cfg, main_path, condition.dataset, memo, variant.backbone)
    suite = suite_for(cfg, condition, inputs.test.labels, cfg.ablation.num_tasks)
    steps = cfg.adapt.steps_at_test if variant.num_steps is None else variant.num_steps
    choose_at = min(cfg.adapt.steps_at_test, steps)  # the candidate a test-time run keeps, followed to `steps`
    if variant.baseline is not None:
        key = ("baseline", variant.baseline, str(main_path), condition.key)
        if key not in memo:
            ctx = MethodContext(cfg, inputs, suite, suite_seed(cfg.eval.seed, condition))
            memo[key] = score(METHODS[variant.baseline], ctx)[0]
        return np.repeat(memo[key][:, None], steps + 1, axis=1)
    path = _checkpoint(cfg, variant, seed, memo, progress) if variant.retrained else main_path
    adapt_cfg = with_overrides(cfg, {"adapt": dict(variant.adapt_overrides)}).adapt
    if variant.retrained:
        inputs = _inputs(cfg, path, condition.dataset, memo, variant.backbone)
    hypernet = variant_hypernet(variant, inputs, seed, memo)
    # what the curves depend on (not the label): the main configuration recurs in most ablations, computed once; the
    # choice as it is made (the silhouette rule where no selector was kept, whatever adapt.choice asks)
    effective = dataclasses.replace(adapt_cfg, choice=choice_rule(hypernet, adapt_cfg, variant.fixed or None))
    key = ("curves", str(path), condition.key, cfg.ablation.setting if variant.backbone == "setting" else
           variant.backbone, variant.untrained, tuple(sorted(variant.film_overrides.items())),
           fingerprint(config_to_dict(effective)), steps, choose_at, variant.context,
           tuple(sorted(variant.fixed.items())))
    if key not in memo:
        indices, labels = np.asarray(suite.indices), np.asarray(suite.labels)
        vae = load_bundle(main_path, resolve_device(cfg.device)).vae if variant.context == "noise" else None
        logits = predict_task(hypernet, inputs.test.task_inputs(indices), adapt_cfg, steps,
                              num_classes=condition.num_classes, fixed=dict(variant.fixed) or None,
                              context=_context(variant, inputs, vae, indices, cfg.eval.seed), choose_at=choose_at)
        memo[key] = np.stack([task_accuracy(step, labels) for step in logits], axis=1)
    return memo[key].copy()


def kmeans_reference(cfg: Config, condition: Condition, seed: int, memo: dict) -> np.ndarray:
    """(T,) k-means on the backbone embedding of this seed, on the same tasks (the baseline beside every table)."""
    main_path = _checkpoint(cfg, Variant("main"), seed, memo, False)
    key = ("kmeans", str(main_path), condition.key)
    if key not in memo:
        inputs = _inputs(cfg, main_path, condition.dataset, memo)
        suite = suite_for(cfg, condition, inputs.test.labels, cfg.ablation.num_tasks)
        ctx = MethodContext(cfg, inputs, suite, suite_seed(cfg.eval.seed, condition))
        memo[key] = score(METHODS["kmeans_embedding"], ctx)[0]
    return memo[key]


def result_path(key: str) -> Path:
    """Where an ablation's cached JSON lives."""
    return results_dir() / "ablations" / f"{key}.json"


def _cache_identity(cfg: Config, ablation: Ablation, conditions: Sequence[Condition]) -> dict[str, Any]:
    return {"version": RESULT_VERSION, "spec": [config_to_dict(v) for v in ablation.variants],
            "reference": ablation.reference, "config": settings_of(cfg), "conditions": [c.key for c in conditions]}


def run_ablation(cfg: Config, ablation: Ablation, *, recompute: bool = False, progress: bool = True,
                 memo: dict | None = None) -> AblationResult:
    """Scores of every variant and seed on identical tasks; loaded from JSON when made by the same inputs."""
    memo = {} if memo is None else memo
    conditions = ablation_grid(cfg, ablation)
    identity = _cache_identity(cfg, ablation, conditions)
    started = time.perf_counter()
    checkpoints = {}
    for variant in ablation.variants:  # resolve (and train, for re-trained variants) every hypernetwork first
        source = variant if variant.retrained else Variant("main")
        checkpoints[variant.label] = [file_sha256(_checkpoint(cfg, source, s, memo, progress))
                                      for s in ablation_seeds(cfg)]
    identity["checkpoints"] = checkpoints
    cached = None if recompute else load_cached(ablation.key, identity)
    if cached is not None:
        print(f"Loaded {ablation.key}: {result_path(ablation.key).name} matches every checkpoint, task and setting.")
        return cached
    acc = {}
    for variant in tqdm(ablation.variants, desc=ablation.key, disable=not progress, leave=False):
        acc[variant.label] = np.stack([np.concatenate([variant_curves(cfg, variant, c, s, memo, progress)
                                                       for c in conditions]) for s in ablation_seeds(cfg)])
    kmeans = np.stack([np.concatenate([kmeans_reference(cfg, c, s, memo) for c in conditions])
                       for s in ablation_seeds(cfg)])
    counts = [min(cfg.ablation.num_tasks, cfg.eval.num_tasks) for _ in conditions]
    result = AblationResult(key=ablation.key, title=ablation.title, question=ablation.question,
                            reference=ablation.reference, variants=[config_to_dict(v) for v in ablation.variants],
                            acc=acc, kmeans=kmeans, conditions=[c.key for c in conditions], condition_tasks=counts,
                            setting=cfg.ablation.setting, seeds=list(ablation_seeds(cfg)), meta=identity,
                            seconds=time.perf_counter() - started)
    keep_other(result_path(ablation.key), identity)
    write_json(result_path(ablation.key), result.to_json())
    return result


def _saved(path: Path) -> dict | None:
    """The ablation result saved at ``path``; None if absent or not readable as one."""
    if not path.is_file():
        return None
    try:
        saved = read_json(path)
    except ArtifactError:
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("meta"), dict) else None


def keep_other(path: Path, identity: Mapping[str, Any]) -> Path | None:
    """Set the result at ``path`` aside (as ``<key>.replaced-<n>.json``) where other inputs or settings made it, so
    a run with other settings never destroys a finished ablation (a recomputation of the same is replaced); the old
    file's new path, or None."""
    return set_aside_unless_same(path, lambda old: not isinstance(old.get("meta"), dict) or  # not a result
                                 fingerprint(old["meta"]) == fingerprint(dict(identity)), "other inputs or settings")


def load_cached(key: str, identity: Mapping[str, Any]) -> AblationResult | None:
    """The cached result if it exists and was made with exactly ``identity``; None if absent, corrupt or stale."""
    saved = _saved(result_path(key))
    if saved is None:
        return None
    if fingerprint(saved["meta"]) != fingerprint(dict(identity)):
        print(f"Recomputing {key}: the cached result was made by other inputs or settings "
              "(it is kept beside the new one).")
        return None
    return AblationResult.from_json(saved)


def run_all(cfg: Config, keys: Sequence[str] | None = None, *, recompute: bool = False,
            progress: bool = True) -> dict[str, AblationResult]:
    """Run (or load) the ablations named in ``keys`` (all by default), in notebook order."""
    ablations = {a.key: a for a in define_ablations(cfg)}
    keys = list(ablations) if keys is None else list(keys)
    unknown = [k for k in keys if k not in ablations]
    if unknown:
        raise ConfigError(f"unknown ablation(s) {unknown}; choose from {', '.join(ablations)}")
    memo: dict = {}
    return {k: run_ablation(cfg, ablations[k], recompute=recompute, progress=progress, memo=memo) for k in keys}
