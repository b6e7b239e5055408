"""Running an ablation: every variant of every replicate seed on identical suite tasks, cached as JSON.

For each variant and seed we keep the clustering accuracy after 0..S inner steps of every task; k-means on
the backbone embedding of the same seed and tasks is recorded beside it. Results live in
``results/ablations/<key>.json`` with every setting, checkpoint and task fingerprint that made them; a cache
made by other inputs is recomputed (and says so), never silently reused. Variants with their own
meta-training are trained here when missing (notebook 04 is the stage that makes them).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hmlib import data
from hmlib.ablations.report import AblationResult
from hmlib.ablations.spec import Ablation, Variant, define_ablations
from hmlib.artifacts import ArtifactError, file_sha256, fingerprint, read_json, write_json
from hmlib.backbone.embeddings import embed_tasks_with_task_statistics, setting_backbone
from hmlib.config import Config, ConfigError, config_to_dict, with_overrides
from hmlib.evaluation.methods import METHODS, run_clusterer
from hmlib.evaluation.suite import build_suite, fitted_size, suite_fingerprint
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.hypernet import HyperNet, TaskInputs
from hmlib.hyper.inputs import TaskData, load_task_data
from hmlib.hyper.losses import task_accuracy
from hmlib.hyper.metatrain import meta_train
from hmlib.metrics import clustering_accuracy
from hmlib.paths import results_dir
from hmlib.reproducibility import seeded
from hmlib.vae.train import encode_images, get_vae, vae_scope

RESULT_VERSION = 2
BATCH_TASKS = 50


def ablation_seeds(cfg: Config) -> tuple[int, ...]:
    """Replicate seeds every ablation uses: the first ``ablation.num_seeds`` of ``cfg.seeds``."""
    return tuple(cfg.seeds[: cfg.ablation.num_seeds])


def training_config(cfg: Config, variant: Variant) -> Config:
    """Config of a variant's hypernetwork: the protocol's, or with its overrides (and ablation.meta_iterations)."""
    if not variant.retrained:
        return cfg
    overrides = dict(variant.train_overrides)
    if cfg.ablation.meta_iterations is not None:
        overrides["meta"] = {**overrides.get("meta", {}), "iterations": int(cfg.ablation.meta_iterations)}
    return with_overrides(cfg, overrides)


def ablation_suite(cfg: Config, dataset: str) -> Any:
    """The first ``ablation.num_tasks`` tasks of the evaluation suite of ``dataset`` (size fitted to its classes)."""
    labels = data.load_split(dataset, "test", cfg.data, progress=False).labels
    if cfg.ablation.num_tasks > cfg.eval.num_tasks:
        raise ConfigError(f"ablation.num_tasks = {cfg.ablation.num_tasks} exceeds eval.num_tasks = "
                          f"{cfg.eval.num_tasks}: the ablations use the first tasks of the evaluation suite")
    return build_suite(cfg, dataset, fitted_size(cfg, labels, cfg.ablation.task_size), cfg.ablation.num_tasks)


def _hypernet(cfg: Config, variant: Variant, setting: str, seed: int, memo: dict, progress: bool
              ) -> tuple[HyperNet, Path | None, Config]:
    """The variant's hypernetwork for one seed (trained if a re-trained variant is missing), its checkpoint."""
    train_cfg = training_config(cfg, variant)
    key = ("hypernet", fingerprint(config_to_dict(train_cfg)), setting, seed, variant.untrained)
    if key not in memo:
        result = meta_train(train_cfg, setting, seed, train=variant.retrained, progress=progress)
        hypernet, path = result.hypernet, result.checkpoint_path
        if variant.untrained:  # the same architecture at its seeded initialisation
            with seeded(seed):
                hypernet = HyperNet(train_cfg.hyper, hypernet.context_dim, hypernet.feature_dim, hypernet.num_classes)
            path = None
        memo[key] = (hypernet.eval(), path)
    return (*memo[key], train_cfg)


def _task_data(train_cfg: Config, dataset: str, setting: str, seed: int, memo: dict) -> TaskData:
    key = ("data", fingerprint(config_to_dict(train_cfg.hyper)), dataset, setting, seed)
    if key not in memo:
        memo[key] = load_task_data(train_cfg, dataset, "test", setting, seed, train=False, progress=False)
    return memo[key]


def _noise_context(cfg: Config, dataset: str, setting: str, seed: int, suite: Any) -> np.ndarray:
    """VAE distribution (T, N, 2d) of uniform-noise images, one set per task (the prototype's ablation)."""
    vae, _ = get_vae(cfg, vae_scope(setting, dataset), seed, train=False, progress=False, verbose=False)
    shape = np.asarray(suite.indices).shape
    noise = np.random.default_rng(cfg.eval.seed).integers(0, 256, size=(*shape, 28, 28), dtype=np.uint8)
    mu, logvar = encode_images(vae, noise.reshape(-1, 28, 28))
    return np.concatenate([mu, logvar], axis=1).reshape(*shape, -1)


@torch.no_grad()
def variant_curves(cfg: Config, variant: Variant, dataset: str, setting: str, seed: int, suite: Any, memo: dict,
                   progress: bool = False) -> np.ndarray:
    """(T, S+1) accuracy of every suite task after 0..S inner steps of the variant (one seed)."""
    hypernet, _, train_cfg = _hypernet(cfg, variant, setting, seed, memo, progress)
    adapt_cfg = with_overrides(cfg, {"adapt": {**variant.adapt_overrides, **(
        {"num_inner_steps": variant.num_steps} if variant.num_steps is not None else {})}}).adapt
    task_data = _task_data(train_cfg, dataset, setting, seed, memo)
    indices, labels = np.asarray(suite.indices), np.asarray(suite.labels)
    context = task_data.context[indices]
    features = task_data.features[indices]
    if variant.context == "noise":
        context = _noise_context(train_cfg, dataset, setting, seed, suite)
    if variant.task_batchnorm:
        backbone, _ = setting_backbone(train_cfg, dataset, setting, seed, train=False, progress=False)
        images = data.load_split(dataset, "test", cfg.data, progress=False).images
        features = embed_tasks_with_task_statistics(backbone, images[indices])
    curves = []
    for start in range(0, len(indices), BATCH_TASKS):
        part = slice(start, start + BATCH_TASKS)
        logits = predict_task(hypernet, TaskInputs.from_arrays(context[part], features[part]), adapt_cfg)
        curves.append(np.stack([task_accuracy(step, labels[part]) for step in logits], axis=1))
    return np.concatenate(curves)


def kmeans_reference(cfg: Config, dataset: str, setting: str, seed: int, suite: Any, memo: dict) -> np.ndarray:
    """(T,) k-means on the backbone embedding of this seed, on the same tasks (the baseline beside every table)."""
    key = ("kmeans", dataset, setting, seed, suite_fingerprint(suite))
    if key not in memo:
        rows = _task_data(cfg, dataset, setting, seed, memo).features
        method = METHODS["kmeans_embedding"]
        num_classes = np.asarray(suite.classes).shape[1]
        memo[key] = np.array([clustering_accuracy(run_clusterer(method, rows[idx], num_classes, cfg.eval.seed + t,
                                                                cfg.eval.kmeans_n_init)[0], lab, num_classes)
                              for t, (idx, lab) in enumerate(zip(suite.indices, suite.labels))])
    return memo[key]


def result_path(key: str) -> Path:
    """Where an ablation's cached JSON lives."""
    return results_dir() / "ablations" / f"{key}.json"


def _cache_identity(cfg: Config, ablation: Ablation, suite: Any) -> dict[str, Any]:
    settings = config_to_dict(cfg)
    for volatile in ("profile", "device", "num_threads"):
        settings.pop(volatile, None)
    return {"version": RESULT_VERSION, "spec": [config_to_dict(v) for v in ablation.variants],
            "reference": ablation.reference, "config": settings, "suite": suite_fingerprint(suite)}


def run_ablation(cfg: Config, ablation: Ablation, *, recompute: bool = False, progress: bool = True,
                 memo: dict | None = None) -> AblationResult:
    """Scores of every variant and seed on identical tasks; loaded from JSON when made by the same inputs."""
    memo = {} if memo is None else memo
    dataset, setting = cfg.meta.test_datasets[0], cfg.ablation.setting
    suite = ablation_suite(cfg, dataset)
    identity = _cache_identity(cfg, ablation, suite)
    started = time.perf_counter()
    checkpoints = {}
    for variant in ablation.variants:  # resolve (and train, for re-trained variants) every hypernetwork first
        paths = [_hypernet(cfg, variant, setting, s, memo, progress)[1] for s in ablation_seeds(cfg)]
        checkpoints[variant.label] = [None if p is None else file_sha256(p) for p in paths]
    identity["checkpoints"] = checkpoints
    cached = None if recompute else load_cached(ablation.key, identity)
    if cached is not None:
        print(f"Loaded {ablation.key}: {result_path(ablation.key).name} matches every checkpoint, task and setting.")
        return cached
    acc = {variant.label: np.stack([variant_curves(cfg, variant, dataset, setting, s, suite, memo, progress)
                                    for s in ablation_seeds(cfg)])  # (R, T, S+1)
           for variant in tqdm(ablation.variants, desc=ablation.key, disable=not progress, leave=False)}
    kmeans = np.stack([kmeans_reference(cfg, dataset, setting, s, suite, memo) for s in ablation_seeds(cfg)])
    result = AblationResult(key=ablation.key, title=ablation.title, question=ablation.question,
                            reference=ablation.reference, variants=[config_to_dict(v) for v in ablation.variants],
                            acc=acc, kmeans=kmeans, dataset=dataset, setting=setting,
                            task_size=int(np.asarray(suite.indices).shape[1]), seeds=list(ablation_seeds(cfg)),
                            meta=identity, seconds=time.perf_counter() - started)
    write_json(result_path(ablation.key), result.to_json())
    return result


def load_cached(key: str, identity: Mapping[str, Any]) -> AblationResult | None:
    """The cached result if it exists and was made with exactly ``identity``; None if absent, corrupt or stale."""
    path = result_path(key)
    if not path.is_file():
        return None
    try:
        saved = read_json(path)
    except ArtifactError:
        return None
    if not isinstance(saved, dict) or fingerprint(saved.get("meta")) != fingerprint(dict(identity)):
        print(f"Recomputing {key}: the cached result was made by other inputs or settings.")
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
