"""Configuration: frozen dataclasses with package defaults, named profiles and file overrides.

A config is built with :func:`load_config` from a profile name (``smoke``, ``default``, ``seed``)
plus optional overrides (a JSON file and/or a nested dict). Unknown keys are errors that name the
key and list the valid ones. :func:`config_to_dict` gives plain primitives for checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

BUILTIN_DATASETS = ("mnist", "fashion_mnist", "kmnist", "hebrew_chars", "math_shapes")


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are preprocessed (notebook 01)."""

    data_dir: str | None = None  # local mirror <dir>/<name>/{train,test}.parquet; env HMLIB_DATA_DIR if None
    use_hub: bool = True  # fall back to the Hugging Face hub when cache and mirror miss
    image_size: int = 28
    polarity: str = "auto"  # "auto": make ink bright on dark (decided per image from its border); "keep"
    test_fraction: float = 0.2  # for datasets without a test split: stratified, seeded split
    split_seed: int = 0
    max_images_per_split: int | None = None  # deterministic stratified subsample (smoke runs); None = all
    custom_datasets: Mapping[str, str] = field(default_factory=dict)  # name -> hub id or local folder


@dataclass(frozen=True)
class TaskConfig:
    """Shape of a task: K classes, N images (METHOD.md, 'The problem')."""

    num_classes: int = 4
    num_images: int = 256
    mode: str = "random"  # "random" K-class subsets or the prototype's "consecutive" (0-3, 4-7, ...)


@dataclass(frozen=True)
class VAEConfig:
    """The convolutional VAE (notebook 02)."""

    variant: str = "conv"  # "conv" (compact) or "prototype" (residual encoder, pixel-shuffle decoder)
    latent_dim: int = 16
    likelihood: str = "bce"  # "bce" (Bernoulli) or "mse_ssim" (prototype: summed MSE + SSIM term)
    ssim_weight: float = 1.0
    beta_start: float = 0.25
    beta_end: float = 1.0
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    max_train_images: int | None = 20000  # images per epoch per VAE, an equal share per dataset (small ones repeated); None = all
    retrain: str = "auto"  # "auto": reuse a matching checkpoint else train; "never": refuse; "always"
    seed: int = 0


@dataclass(frozen=True)
class HyperConfig:
    """The hypernetwork and its target network (notebook 03)."""

    conditioning: str = "multihead"  # "attention" (prototype), "multihead", "stats", "hyperfast"
    # "full" (prototype per-layer heads), "compact" (learned base MLP + generated modulation), or "cluster"
    # (generated residual embedding + prototypes computed from the task by k-means, refined by the inner loop).
    # "cluster" is the default: validation accuracy after adaptation ~89% vs ~81% for "compact" (README, Results).
    generation: str = "cluster"
    target_hidden: tuple[int, ...] = (64,)
    target_input: str = "latent"  # "latent" ([mu, logvar]) or "latent+pixels"
    embed_dim: int = 64
    head_hidden: int = 128
    num_context: int = 1024  # rows of the VAE distribution read for conditioning (all if fewer)
    normalize: str = "task"  # "task": centre/scale each input dimension by the task's statistics; "whiten"; "none"
    num_seeds: int = 4  # learned queries of the "multihead" set encoder
    num_heads: int = 4  # attention heads of the "multihead" set encoder (must divide embed_dim)
    pixel_dim: int = 32  # width of the learned pixel projection for target_input "latent+pixels"
    random_features: int = 128  # "hyperfast": fixed random ReLU features per row
    num_components: int = 4  # "hyperfast": principal components of the task's random features
    cluster_iters: int = 5  # "cluster": Lloyd iterations that compute the prototypes from the task
    cluster_inits: int = 4  # "cluster": k-means++ seedings per task (fixed generator); lowest inertia wins
    cluster_tau: float = 5.0  # "cluster": initial temperature of logits -tau * mean squared distance


@dataclass(frozen=True)
class AdaptConfig:
    """The unsupervised inner loop, shared by meta-training and test time."""

    inner_loss: str = "infomax"  # "geometry" (prototype), "entropy" (TENT), "infomax" (SHOT/IIC)
    num_inner_steps: int = 4
    inner_lr: float = 0.5
    adapt_params: str = "generated"  # "generated" (target params), "last" (last target layer), "hypernet" (all)
    first_order: bool = False
    geometry_weight: float = 3.0
    balance_weight: float = 1.0  # weight of the cluster-balance term of infomax


@dataclass(frozen=True)
class MetaConfig:
    """Meta-training (outer loop) and the protocol's datasets."""

    train_datasets: tuple[str, ...] = ("fashion_mnist", "hebrew_chars", "math_shapes")
    test_datasets: tuple[str, ...] = ("mnist",)
    iterations: int = 3000  # ~50-60 s on one free core (benchmarks/bench_meta.py); validation still rising at 1500
    meta_batch_size: int = 8
    outer_lr: float = 1e-3
    grad_clip: float = 1.0
    task_mixing: str = "mixed"  # "mixed": tasks from all datasets each iteration; "single": one dataset
    val_fraction: float = 0.1  # of each meta-training dataset's train split, for model selection
    eval_every: int = 100
    eval_tasks: int = 32
    use_inner_loop: bool = True  # False: meta-train without adaptation (MT3 ablation)
    seed: int = 0
    query_size: int = 128  # images per task for the outer loss, disjoint from the task's support set
    retrain: str = "auto"  # "auto": reuse/resume a matching checkpoint else retrain; "never": refuse; "always"
    outer_batch: str = "query"  # outer loss on the "query" only, or on "support+query" (the adapted support too)


@dataclass(frozen=True)
class EvalConfig:
    """The fixed evaluation suite (test split of each held-out dataset)."""

    num_tasks: int = 200
    task_sizes: tuple[int, ...] = (64, 256)
    seed: int = 1234
    num_meta_seeds: int = 3
    kmeans_n_init: int = 10
    logreg_train_per_class: int = 500  # train-split images per class for the supervised ceiling
    gmm_covariance: str = "full"  # Gaussian-mixture baseline: "full", "diag", "spherical", "tied", or "bic" (per task)


@dataclass(frozen=True)
class AblationConfig:
    """Notebook 04 sweeps."""

    step_grid: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)
    lr_grid: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)
    num_tasks: int = 200
    task_size: int = 256
    meta_iterations: int | None = 200  # for ablation re-trainings (8-minute budget); None = MetaConfig.iterations
    setting: str = "zero_shot"  # setting of the main ablations: "zero_shot" or "transductive"
    lodo_setting: str = "transductive"  # leave-one-dataset-out uses the per-dataset VAEs of notebook 02
    lodo_datasets: tuple[str, ...] | None = None  # held out in turn; None = every dataset of the protocol


@dataclass(frozen=True)
class Config:
    profile: str = "default"
    device: str = "auto"  # "auto" (cuda, then mps, then cpu) or a torch device name
    # CPU threads for torch and the BLAS/OpenMP pools of numpy/scikit-learn; None = the libraries' defaults.
    # 1 by default: on a 2-core machine two threads fight any other process for the cores (VAE training measured
    # 1,231 images/s with 2 threads vs 3,103 with 1 under load; benchmarks/bench_vae.py --threads).
    num_threads: int | None = 1
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    @property
    def datasets(self) -> tuple[str, ...]:
        """Every dataset the protocol touches, meta-training first."""
        return tuple(dict.fromkeys(self.meta.train_datasets + self.meta.test_datasets))


PROFILES: dict[str, dict[str, Any]] = {
    "default": {},
    "smoke": {
        "data": {"max_images_per_split": 600},
        "task": {"num_images": 64},
        "vae": {"epochs": 1, "max_train_images": 1500, "batch_size": 64},
        "meta": {"iterations": 20, "meta_batch_size": 2, "eval_every": 10, "eval_tasks": 4, "query_size": 32,
                 "val_fraction": 0.2},
        "eval": {"num_tasks": 10, "task_sizes": (64,), "num_meta_seeds": 1, "kmeans_n_init": 2},
        "ablation": {"step_grid": (0, 1, 2), "lr_grid": (0.5,), "num_tasks": 6, "task_size": 64,
                     "meta_iterations": 10},
    },
    "seed": {
        "meta": {"train_datasets": ("kmnist", "fashion_mnist"), "test_datasets": ("mnist",)},
        "vae": {"variant": "prototype", "latent_dim": 128, "likelihood": "mse_ssim"},
        "hyper": {"conditioning": "attention", "generation": "full", "target_hidden": (400, 200)},
        "adapt": {"inner_loss": "geometry", "num_inner_steps": 3, "inner_lr": 5e-3, "adapt_params": "hypernet"},
    },
}


def _merge(base: Any, overrides: Mapping[str, Any], where: str) -> Any:
    """Return a copy of dataclass ``base`` with nested ``overrides`` applied; unknown keys raise."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {overrides!r}")
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(sorted(fields))}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, path)
        elif isinstance(current, tuple) and isinstance(value, (list, tuple)):
            changes[key] = tuple(value)
        elif key == "custom_datasets":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a mapping name -> hub id or local folder")
            changes[key] = dict(value)
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)


def validate(cfg: Config) -> Config:
    """Check enumerated choices and ranges; raise ConfigError naming the bad field."""
    choices = {
        "device": (cfg.device, None),
        "data.polarity": (cfg.data.polarity, ("auto", "keep")),
        "task.mode": (cfg.task.mode, ("random", "consecutive")),
        "vae.variant": (cfg.vae.variant, ("conv", "prototype")),
        "vae.likelihood": (cfg.vae.likelihood, ("bce", "mse_ssim")),
        "vae.retrain": (cfg.vae.retrain, ("auto", "never", "always")),
        "hyper.conditioning": (cfg.hyper.conditioning, ("attention", "multihead", "stats", "hyperfast")),
        "hyper.generation": (cfg.hyper.generation, ("full", "compact", "cluster")),
        "hyper.target_input": (cfg.hyper.target_input, ("latent", "latent+pixels")),
        "adapt.inner_loss": (cfg.adapt.inner_loss, ("geometry", "entropy", "infomax")),
        "adapt.adapt_params": (cfg.adapt.adapt_params, ("generated", "last", "hypernet")),
        "meta.task_mixing": (cfg.meta.task_mixing, ("mixed", "single")),
        "eval.gmm_covariance": (cfg.eval.gmm_covariance, ("full", "diag", "spherical", "tied", "bic")),
        "ablation.setting": (cfg.ablation.setting, ("zero_shot", "transductive")),
        "ablation.lodo_setting": (cfg.ablation.lodo_setting, ("zero_shot", "transductive")),
        "hyper.normalize": (cfg.hyper.normalize, ("task", "whiten", "none")),
        "meta.retrain": (cfg.meta.retrain, ("auto", "never", "always")),
        "meta.outer_batch": (cfg.meta.outer_batch, ("query", "support+query")),
    }
    for name, (value, allowed) in choices.items():
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")
    positive = {
        "task.num_classes": cfg.task.num_classes, "task.num_images": cfg.task.num_images,
        "data.image_size": cfg.data.image_size, "vae.latent_dim": cfg.vae.latent_dim,
        "vae.epochs": cfg.vae.epochs, "vae.batch_size": cfg.vae.batch_size,
        "meta.meta_batch_size": cfg.meta.meta_batch_size, "eval.num_tasks": cfg.eval.num_tasks,
    }
    for name, value in positive.items():
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if cfg.num_threads is not None and (not isinstance(cfg.num_threads, int) or cfg.num_threads <= 0):
        raise ConfigError(f"num_threads must be a positive integer or null, got {cfg.num_threads!r}")
    if cfg.task.num_classes < 2:
        raise ConfigError("task.num_classes must be at least 2")
    if not 0.0 < cfg.data.test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    if cfg.adapt.num_inner_steps < 0:
        raise ConfigError("adapt.num_inner_steps must be >= 0")
    if cfg.hyper.generation == "cluster" and cfg.hyper.target_input != "latent":
        raise ConfigError("hyper.generation = 'cluster' computes its prototypes from the [mu, logvar] rows, so it needs "
                          "hyper.target_input = 'latent'; use generation 'compact' or 'full' for 'latent+pixels'")
    overlap = set(cfg.meta.train_datasets) & set(cfg.meta.test_datasets)
    if overlap:
        raise ConfigError(f"datasets both meta-trained on and held out: {sorted(overlap)}")
    known = set(BUILTIN_DATASETS) | set(cfg.data.custom_datasets)
    for name in cfg.datasets:
        if name not in known:
            raise ConfigError(f"unknown dataset '{name}'; registered: {', '.join(sorted(known))} "
                              "(add others under data.custom_datasets as name -> hub id or local folder)")
    return cfg


def load_config(profile: str = "default", path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a validated config: package defaults, then a profile, then a JSON file, then overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    cfg = _merge(Config(profile=profile), PROFILES[profile], "")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            file_overrides = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON: {err}") from err
        cfg = _merge(cfg, file_overrides, "")
    if overrides:
        cfg = _merge(cfg, overrides, "")
    return validate(cfg)


def config_to_dict(obj: Any) -> dict[str, Any]:
    """Plain-primitive dict of a config (or sub-config): tuples become lists, mappings dicts."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` for a whole Config (validated)."""
    data = dict(data)
    profile = data.pop("profile", "default")
    return validate(_merge(Config(profile=profile), data, ""))


def configure_runtime(cfg: Config) -> "torch.device":  # noqa: F821
    """Apply ``cfg.num_threads`` to torch and to numpy/scikit-learn's thread pools; return the resolved device."""
    import torch
    from threadpoolctl import threadpool_limits

    from hmlib.reproducibility import deterministic_kernels

    deterministic_kernels()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
        threadpool_limits(limits=cfg.num_threads)  # applies process-wide from here on
    return resolve_device(cfg.device)


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """'auto' picks cuda, then mps, then cpu; any other name is passed to torch.device."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device = {name!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:0', 'mps')") from err
