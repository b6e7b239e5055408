"""Configuration: frozen dataclasses with package defaults, named profiles and file overrides.

A config is built with :func:`load_config` from a profile name (``smoke``, ``default``, ``seed``) plus
optional overrides (a JSON file and/or a nested dict). Unknown keys are errors naming the key and the
valid ones; every field's type and range is checked up front from its annotation and metadata
(:mod:`hmlib.validation`), so a bad value fails here, never minutes later inside a notebook.
:func:`config_to_dict` gives plain primitives for checkpoints.

Choices that name a registered concept (inner losses, settings, generators, conditioning encoders,
datasets) are read from that concept's registry, so adding one is one edit in one place.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from hmlib.validation import ConfigError, Pattern, check_dataclass, checked, read_config_file

IMAGE_SIZE = 28  # every image is 1 x 28 x 28; the models are built for it
DEVICE_NAMES = Pattern(r"auto|cpu|mps|cuda(:[0-9]+)?", "'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps'")
DEVICE_VARIABLE = "HMLIB_DEVICE"  # `hmlib run --device` sets it for the notebook kernels: load_config applies it


def _names(module: str, attribute: str) -> Callable[[], tuple[str, ...]]:
    """Choices read lazily from a registry (imported on first validation: no import cycle with the registries)."""

    def names() -> tuple[str, ...]:
        import importlib

        return tuple(getattr(importlib.import_module(module), attribute))

    return names


def _train_shifts() -> tuple[str, ...]:
    """The train family of corruptions (read lazily: hmlib.data imports this module)."""
    from hmlib.data.corruptions import train_corruptions

    return tuple(train_corruptions())


def _benchmark_shifts() -> tuple[str, ...]:
    """The benchmark (held-out) family of corruptions."""
    from hmlib.data.corruptions import benchmark_corruptions

    return tuple(benchmark_corruptions())


SETTINGS: dict[str, str] = {
    "zero_shot": "zero-shot (no model saw the held-out dataset)",
    "transductive": "transductive (the backbone adapted to the held-out dataset's unlabeled train split; never its "
                    "labels)",
}


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are preprocessed (notebook 01)."""

    data_dir: str | None = None  # local mirror <dir>/<name>/{train,test}.parquet; env HMLIB_DATA_DIR if None
    use_hub: bool = True  # fall back to the Hugging Face hub when cache and mirror miss
    image_size: int = checked(IMAGE_SIZE, choices=(IMAGE_SIZE,))  # fixed: the VAE and backbone are built for 28 x 28
    polarity: str = checked("auto", choices=("auto", "keep"))  # "auto": ink bright on dark, decided per image
    test_fraction: float = checked(0.2, min_exclusive=0.0, max_exclusive=1.0)  # datasets without a test split: stratified, seeded split
    split_seed: int = checked(0, min=0)
    max_images_per_split: int | None = checked(None, min=1)  # deterministic stratified subsample (smoke runs)
    custom_datasets: Mapping[str, str] = checked(default_factory=dict)  # name -> hub id or local folder


@dataclass(frozen=True)
class TaskConfig:
    """Shape of a task: K classes, N images (METHOD.md, 'The problem')."""

    num_classes: int = checked(4, min=2)
    num_images: int = checked(256, min=4)
    mode: str = checked("random", choices=("random", "consecutive"))  # or the prototype's consecutive 0-3, 4-7, ...


@dataclass(frozen=True)
class VAEConfig:
    """The convolutional VAE whose posteriors condition the hypernetwork (notebook 02)."""

    variant: str = checked("conv", choices=("conv", "prototype"))  # compact, or METHOD.md's residual VAE
    latent_dim: int = checked(16, min=1)
    likelihood: str = checked("bce", choices=("bce", "mse_ssim"))  # Bernoulli, or the prototype's MSE + SSIM
    ssim_weight: float = checked(1.0, min=0.0)
    beta_start: float = checked(0.25, min=0.0)
    beta_end: float = checked(1.0, min=0.0)
    epochs: int = checked(2, min=1)
    batch_size: int = checked(128, min=1)
    lr: float = checked(1e-3, min_exclusive=0.0)
    max_train_images: int | None = checked(5000, min=1)  # per epoch, an equal share per dataset; None = all
    retrain: str = checked("auto", choices=("auto", "never", "always"))


@dataclass(frozen=True)
class BackboneConfig:
    """The image representation under the hypernetwork: a conv net trained with labels on the meta-training
    datasets only (notebook 02)."""

    channels: tuple[int, ...] = checked((16, 32, 64), min_len=1, min=1)  # stride-2 conv3x3-BN-ReLU blocks
    embed_dim: int = checked(128, min=2)
    epochs: int = checked(4, min=1)
    images_per_dataset: int = checked(10000, min=1)  # per epoch, from each meta-training dataset (small ones repeated)
    batch_size: int = checked(128, min=2)
    lr: float = checked(3e-3, min_exclusive=0.0)  # one-cycle peak
    weight_decay: float = checked(5e-4, min=0.0)
    label_smoothing: float = checked(0.1, min=0.0, max_exclusive=1.0)
    augment: float = checked(1.0, min=0.0)  # random affine strength: 1 = +-15 deg, scale +-15%, shift +-12%
    shift_prob: float = checked(0.5, min=0.0, max=1.0)  # share of images under a random train-family corruption
    # weight of a contrastive term (SimCLR's NT-Xent) beside the cross-entropy: two independently shifted and
    # augmented views of every image should have the nearest projected embeddings in the batch, an objective that does
    # not specialise to the training classes (chosen on the leave-one-dataset-out folds, docs/METHOD.md; 0:
    # cross-entropy only, the recipe before it)
    contrastive: float = checked(0.3, min=0.0)
    contrastive_temperature: float = checked(0.2, min_exclusive=0.0)
    contrastive_head: int = checked(128, min=0)  # > 0: the term acts on a projection MLP of this width (SimCLR's g)
    # the meta-training datasets it learns from (None: all of meta.train_datasets); a proper subset leaves the others
    # unfamiliar to it, so that meta-training meets episodes the representation has not seen, as at test time
    datasets: tuple[str, ...] | None = checked(None, min_len=1)
    retrain: str = checked("auto", choices=("auto", "never", "always"))


@dataclass(frozen=True)
class TransductiveConfig:
    """The transductive setting: the backbone adapted to a held-out dataset's unlabeled train split (SCAN-style
    neighbour agreement with a clustering head; ``epochs = 0``: normalisation statistics only) (notebook 03)."""

    # held-out datasets adapted to and evaluated transductively (None: every one); by default clean mnist and two
    # shifts, a noise and a geometric one (every dataset costs one adaptation per seed)
    datasets: tuple[str, ...] | None = ("mnist", "mnist+shot_noise", "mnist+rotate")
    epochs: int = checked(3, min=0)
    max_images: int = checked(20000, min=100)  # unlabeled train images used (an evenly spaced sample)
    neighbours: int = checked(20, min=1)  # nearest neighbours mined once in the starting embedding
    clusters: int = checked(20, min=2)  # width of the clustering head (over-clustering, as SCAN)
    batch_size: int = checked(256, min=2)
    # step sizes chosen on the leave-one-dataset-out folds (docs/METHOD.md "Choosing the transductive step sizes")
    lr: float = checked(1e-3, min_exclusive=0.0)  # backbone
    head_lr: float = checked(1e-2, min_exclusive=0.0)
    entropy_weight: float = checked(5.0, min=0.0)
    augment: float = checked(1.0, min=0.0)  # random affine strength of both views
    # > 0: weight of a contrastive term (the backbone's NT-Xent and temperature, on a fresh projection head of
    # backbone.contrastive_head units, else on the embedding) between two augmented views of each image, beside SCAN's
    contrastive: float = checked(0.0, min=0.0)
    # when not to adapt (docs/METHOD.md "When not to adapt a backbone to a dataset"): "confidence" declines the
    # adaptation where the backbone already recognises the data, i.e. its training head's mean largest softmax
    # probability on unlabeled train images (gate_repeats subsamples of gate_images) is at least gate_confidence beyond
    # the noise (a 95% t-interval above it); "silhouette" declines it where k-means with gate_clusters clusters
    # separates those images less clearly in the adapted embedding than in the starting one beyond the noise (the
    # rule chosen with the cross-entropy backbone); "off" always uses it. Not part of the adapted checkpoint's identity
    # (decided when it is read).
    gate: str = checked("confidence", choices=("confidence", "silhouette", "off"))
    gate_confidence: float = checked(0.53, min_exclusive=0.0, max_exclusive=1.0)
    gate_clusters: int = checked(4, min=2)
    gate_images: int = checked(2000, min=10)  # per subsample
    gate_repeats: int = checked(5, min=2)  # subsamples (each with its own k-means restarts)
    retrain: str = checked("auto", choices=("auto", "never", "always"))


@dataclass(frozen=True)
class HyperConfig:
    """The hypernetwork: the set encoder that reads a task's VAE distribution, and which generator emits the
    task-specific part of the network (each generator has its own section: ``film``, ``full``) (notebook 03)."""

    generation: str = checked("film", choices=_names("hmlib.hyper.generators", "GENERATORS"))
    conditioning: str = checked("multihead", choices=_names("hmlib.hyper.encoders", "ENCODERS"))
    embed_dim: int = checked(64, min=1)  # width of the task code
    num_context: int = checked(128, min=1)  # rows of the VAE distribution read for conditioning (a random sample)
    num_seeds: int = checked(4, min=1)  # learned queries of the multihead set encoder
    num_heads: int = checked(4, min=1)  # attention heads of the multihead set encoder (must divide embed_dim)


@dataclass(frozen=True)
class FilmConfig:
    """Generator ``film`` (method v3): per-task FiLM and statistics blend of every backbone normalisation layer,
    and a k-means cluster head with a generated temperature."""

    init_std: float = checked(0.01, min_exclusive=0.0)  # initial weights of the output heads: small, never zero
    blend_init: float = checked(0.5, min_exclusive=0.0, max_exclusive=1.0)  # initial blend (1 = task statistics)
    tau: float = checked(10.0, min_exclusive=0.0)  # initial temperature of the cluster head's cosine logits
    adapt: str = checked("both", choices=("head", "film", "both"))  # what the inner loop updates
    adapt_blocks: int = checked(1, min=1)  # the last blocks whose FiLM the inner loop updates
    inner_lr: float = checked(0.05, min_exclusive=0.0)  # initial step size of the FiLM parameters
    head_lr: float = checked(0.01, min_exclusive=0.0)  # initial step size of the prototypes and temperature
    learn_inner_lr: bool = True  # Meta-SGD: per-parameter step sizes meta-learned in the outer loop
    normalize_steps: bool = True  # steps along the gradient divided by its RMS per task (scale-free step sizes)
    cluster_iters: int = checked(10, min=0)  # Lloyd iterations computing the prototypes from the task
    cluster_inits: int = checked(10, min=1)  # k-means++ seedings per task (fixed generator); lowest inertia wins


@dataclass(frozen=True)
class FullConfig:
    """Generator ``full`` (the prototype's, ``seed`` profile): an MLP on the task's [mu, logvar] rows whose weights
    and biases are all generated."""

    head_hidden: int = checked(128, min=1)
    target_hidden: tuple[int, ...] = checked((64,), min=1)  # hidden widths of the generated MLP


@dataclass(frozen=True)
class AdaptConfig:
    """The unsupervised inner loop, shared by meta-training and test time."""

    inner_loss: str = checked("neighbours", choices=_names("hmlib.hyper.losses", "INNER_LOSSES"))
    num_inner_steps: int = checked(3, min=0)  # inner steps while meta-training
    # inner steps at test time (evaluation, ``hmlib cluster``, notebook 04, the explorer); None = num_inner_steps.
    # Not part of a checkpoint's identity. 8 (chosen on the leave-one-dataset-out folds, where it gained in every fold
    # and seed over the meta-training count) gained on every held-out condition of a fresh-clone run (docs/METHOD.md,
    # "Eight inner steps at test time").
    test_steps: int | None = checked(8, min=0)
    inner_lr: float = checked(0.5, min_exclusive=0.0)  # step size where the generator does not learn its own
    lr_scale: float = checked(1.0, min_exclusive=0.0)  # multiplies every step size (meta-learned ones included)
    adapt_params: str = checked("generated", choices=("generated", "hypernet"))  # generated params, or all of the hypernet
    # test time: candidates adapted side by side, the one with the best silhouette kept per task (hmlib.hyper.adapt)
    candidates: tuple[str, ...] = checked(("generated", "stored", "task"), min_len=1,
                                          choices=_names("hmlib.hyper.adapt", "CANDIDATES"))
    choice: str = checked("learned", choices=("learned", "silhouette"))  # the meta-learned selector (where meta-
    # training fitted one that beat the silhouette rule on validation beyond the noise), or the silhouette rule
    neighbours: int = checked(5, min=1)  # nearest neighbours of the neighbour-agreement loss
    geometry_weight: float = checked(3.0, min=0.0)
    balance_weight: float = checked(1.0, min=0.0)  # weight of the cluster-balance term

    @property
    def steps_at_test(self) -> int:
        """Inner steps at test time: ``test_steps``, or the meta-training ``num_inner_steps`` where it is None."""
        return self.num_inner_steps if self.test_steps is None else self.test_steps


# adapt settings read at test time only: not part of a checkpoint's identity, and at evaluation taken from the profile
# and config, not from what the checkpoint recorded
TEST_TIME_ONLY = ("test_steps",)
# transductive settings of the gate, decided when an adapted backbone is read (not part of any checkpoint's identity):
# a loaded checkpoint's config takes them from its profile too
GATE_SETTINGS = ("gate", "gate_confidence", "gate_clusters", "gate_images", "gate_repeats")


@dataclass(frozen=True)
class MetaConfig:
    """Meta-training (outer loop) and the protocol's datasets."""

    train_datasets: tuple[str, ...] = checked(("fashion_mnist", "hebrew_chars", "math_shapes"), min_len=1)
    test_datasets: tuple[str, ...] = checked(  # held out; shifted variants by name (dataset+corruption)
        ("mnist", "mnist+shot_noise", "mnist+glass_blur", "mnist+scale", "mnist+rotate", "mnist+fog"), min_len=1)
    iterations: int = checked(150, min=1)
    meta_batch_size: int = checked(8, min=1)
    min_classes: int = checked(2, min=2)  # K of each meta-batch drawn from min..max (capped by the dataset)
    max_classes: int = checked(10, min=2)
    task_images: int = checked(128, min=4)  # N of a meta-training task
    shifts: tuple[str, ...] | None = checked(None, choices=_train_shifts)  # None: every train-family corruption
    shift_prob: float = checked(0.7, min=0.0, max=1.0)  # share of meta-training tasks under a random shift
    outer_loss: str = checked("both", choices=("centroids", "aligned", "both"))  # class-centroid / aligned CE
    backbone_lr: float = checked(0.0, min=0.0)  # > 0: the outer loop also fine-tunes the backbone (episodic)
    outer_lr: float = checked(1e-3, min_exclusive=0.0)
    grad_clip: float = checked(1.0, min_exclusive=0.0)
    val_fraction: float = checked(0.1, min_exclusive=0.0, max_exclusive=1.0)  # of each meta-training dataset's train split, for selection
    eval_every: int = checked(25, min=1)
    eval_tasks: int = checked(64, min=1)
    use_inner_loop: bool = True  # False: meta-train without adaptation (MT3 ablation)
    selector_episodes: int = checked(40, min=0)  # meta-batches that fit the test-time selector (0: none)
    retrain: str = checked("auto", choices=("auto", "never", "always"))


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation grid: every held-out dataset (``meta.test_datasets``) at every task shape (K, N), each a
    fixed, seeded suite of tasks from the dataset's test split, identical for every method (notebook 03)."""

    num_tasks: int = checked(40, min=2)  # tasks per condition, identical for every method and seed (the time budget)
    shapes: tuple[tuple[int, int], ...] = ((4, 256), (10, 500))  # (K classes, N images) of a task
    shifted_shapes: tuple[tuple[int, int], ...] | None = ((4, 256),)  # of the shifted datasets; None: ``shapes``
    seed: int = checked(1234, min=0)
    kmeans_n_init: int = checked(10, min=1)
    logreg_train_per_class: int = checked(100, min=1)  # train-split images per class for the supervised ceiling
    plain_steps: int = checked(15, min=0)  # the non-meta-learned adaptation baseline: Adam steps on every BN layer
    plain_lr: float = checked(0.01, min_exclusive=0.0)


@dataclass(frozen=True)
class BenchmarkConfig:
    """``make benchmark``: the full grid on the pipeline's checkpoints (its own command, beyond the default run)."""

    corruptions: tuple[str, ...] | None = checked(None, choices=_benchmark_shifts)  # None: the whole benchmark family
    shapes: tuple[tuple[int, int], ...] = ((2, 64), (4, 64), (4, 256), (10, 500))
    # ``hmlib benchmark --setting transductive``: the same datasets, each adapted to (one adaptation per dataset and
    # seed), at these task shapes
    transductive_shapes: tuple[tuple[int, int], ...] = ((4, 256),)
    num_tasks: int = checked(40, min=2)


@dataclass(frozen=True)
class AblationConfig:
    """Notebook 04 sweeps."""

    step_grid: tuple[int, ...] = checked((0, 1, 2, 4, 8, 16, 32), min_len=1, min=0)
    lr_grid: tuple[float, ...] = checked((0.25, 0.5, 2.0, 4.0), min_exclusive=0.0)  # step-size scales (adapt.lr_scale)
    num_tasks: int = checked(30, min=2)  # the first tasks of each condition's evaluation suite
    # held-out datasets of the ablation grid (None: meta.test_datasets): clean mnist and shrunk digits, where METHOD.md
    # found that the task's own statistics cost 13 points (when not to adapt)
    datasets: tuple[str, ...] | None = ("mnist", "mnist+scale")
    shapes: tuple[tuple[int, int], ...] = ((4, 256),)  # task shapes (K, N) of the ablation grid
    meta_iterations: int | None = checked(None, min=1)  # re-trained variants; None = meta.iterations
    num_seeds: int = checked(2, min=1)  # replicate seeds every ablation averages over: the first of cfg.seeds
    setting: str = checked("zero_shot", choices=tuple(SETTINGS))


@dataclass(frozen=True)
class Config:
    profile: str = "default"
    # where every stage computes: "auto" (cuda, then mps, then cpu); not part of any artifact's identity
    device: str = checked("auto", pattern=DEVICE_NAMES)
    # CPU threads for torch and the BLAS/OpenMP pools of numpy/scikit-learn; None = the libraries' defaults.
    num_threads: int | None = checked(1, min=1)
    # Replicates of the whole pipeline: replicate s trains its VAEs, backbones and hypernetworks from seed s.
    seeds: tuple[int, ...] = checked((0, 1, 2), min_len=1, min=0)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transductive: TransductiveConfig = field(default_factory=TransductiveConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    film: FilmConfig = field(default_factory=FilmConfig)
    full: FullConfig = field(default_factory=FullConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    @property
    def datasets(self) -> tuple[str, ...]:
        """Every dataset the protocol touches, meta-training first."""
        return tuple(dict.fromkeys(self.meta.train_datasets + self.meta.test_datasets))


PROFILES: dict[str, dict[str, Any]] = {
    "default": {"num_threads": 2},  # the main job uses both cores of the 2-core machine it is sized for
    "smoke": {
        "seeds": (0,),
        "data": {"max_images_per_split": 600},
        "task": {"num_images": 64},
        "vae": {"epochs": 1, "max_train_images": 1500, "batch_size": 64},
        "backbone": {"channels": (8, 16, 16), "embed_dim": 32, "epochs": 1, "images_per_dataset": 300},
        "hyper": {"embed_dim": 16, "num_seeds": 2, "num_heads": 2},
        "film": {"cluster_inits": 3},
        "adapt": {"test_steps": 4},  # differs from num_inner_steps (3), so the tests exercise the test-time count
        "meta": {"iterations": 10, "meta_batch_size": 2, "eval_every": 5, "eval_tasks": 4, "val_fraction": 0.2,
                 "max_classes": 4, "task_images": 32, "test_datasets": ("mnist", "mnist+rotate"),
                 "selector_episodes": 4},
        "eval": {"num_tasks": 10, "shapes": ((4, 64), (2, 32)), "kmeans_n_init": 2, "plain_steps": 3},
        "benchmark": {"corruptions": ("rotate", "shot_noise"), "shapes": ((4, 64),), "transductive_shapes": ((4, 64),),
                      "num_tasks": 6},
        "transductive": {"epochs": 1, "max_images": 300, "batch_size": 64, "datasets": ("mnist",)},
        "ablation": {"step_grid": (0, 1, 2), "lr_grid": (2.0,), "num_tasks": 6, "shapes": ((4, 64),), "datasets": None,
                     "meta_iterations": 5, "num_seeds": 1},
    },
    "seed": {  # the prototype's protocol: latent-only target MLP, geometry loss, prototype VAE
        "meta": {"train_datasets": ("kmnist", "fashion_mnist"), "test_datasets": ("mnist",), "min_classes": 4,
                 "max_classes": 4, "task_images": 64, "shift_prob": 0.0, "outer_loss": "aligned"},
        "vae": {"variant": "prototype", "latent_dim": 128, "likelihood": "mse_ssim"},
        "backbone": {"contrastive": 0.0},  # the cross-entropy backbone the profile was measured with
        "task": {"mode": "consecutive"},
        "hyper": {"conditioning": "attention", "generation": "full"},
        "full": {"target_hidden": (400, 200)},
        "eval": {"shapes": ((4, 64), (4, 256))},
        "adapt": {"inner_loss": "geometry", "num_inner_steps": 3, "test_steps": None, "inner_lr": 5e-3,
                  "adapt_params": "hypernet", "candidates": ("generated",)},  # test time: the meta-training count
    },
}


def registered_datasets(cfg: Config | None = None) -> tuple[str, ...]:
    """Built-in dataset names (the hub registry); custom ones are added by the config that declares them."""
    from hmlib.data.registry import HUB_IDS  # hmlib.data imports this module: read lazily

    return tuple(HUB_IDS)


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
        changes[key] = _merge(current, value, path) if dataclasses.is_dataclass(current) else value
    return dataclasses.replace(base, **changes)


def validate(cfg: Config) -> Config:
    """Types and ranges of every field (from annotations and metadata), then rules across fields."""
    cfg = check_dataclass(cfg)
    from hmlib.data.corruptions import CORRUPTIONS, train_corruptions  # hmlib.data imports this module: read lazily
    from hmlib.data.registry import check_name, parse_shifted

    for name in cfg.data.custom_datasets:  # a name becomes a folder: refused (DatasetError) if it could escape
        check_name(name, "custom dataset name", shifted=False)
    shifts = {name: parse_shifted(name) for name in cfg.datasets}  # (base, corruption): unsafe names refused
    known = set(registered_datasets()) | set(cfg.data.custom_datasets)
    for name, (base, _) in shifts.items():
        if base not in known:
            where = f" (the base of '{name}')" if base != name else ""
            raise ConfigError(f"unknown dataset '{base}'{where}; registered: {', '.join(sorted(known))} "
                              "(add others under data.custom_datasets as name -> hub id or local folder)")
    held_out = [name for name in cfg.meta.train_datasets
                if shifts[name][1] is not None and CORRUPTIONS[shifts[name][1]].family == "benchmark"]
    if held_out:
        raise ConfigError(f"meta.train_datasets {held_out} use benchmark corruptions: held-out shifts must not be "
                          f"meta-trained on (train-family corruptions: {', '.join(train_corruptions())})")
    unknown = sorted(set(cfg.backbone.datasets or ()) - set(cfg.meta.train_datasets))
    if unknown:
        raise ConfigError(f"backbone.datasets {unknown} are not meta-training datasets; the backbone learns from a "
                          f"subset of meta.train_datasets ({', '.join(cfg.meta.train_datasets)})")
    overlap = set(cfg.meta.train_datasets) & set(cfg.meta.test_datasets)
    if overlap:
        raise ConfigError(f"datasets both meta-trained on and held out: {sorted(overlap)}")
    if cfg.hyper.embed_dim % cfg.hyper.num_heads:
        raise ConfigError(f"hyper.embed_dim = {cfg.hyper.embed_dim} must be divisible by hyper.num_heads = "
                          f"{cfg.hyper.num_heads}")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds must be distinct, got {list(cfg.seeds)}")
    lists = {"meta.train_datasets": cfg.meta.train_datasets, "meta.test_datasets": cfg.meta.test_datasets,
             "backbone.datasets": cfg.backbone.datasets, "transductive.datasets": cfg.transductive.datasets,
             "ablation.datasets": cfg.ablation.datasets, "eval.shapes": cfg.eval.shapes,
             "eval.shifted_shapes": cfg.eval.shifted_shapes, "benchmark.shapes": cfg.benchmark.shapes,
             "benchmark.transductive_shapes": cfg.benchmark.transductive_shapes, "ablation.shapes": cfg.ablation.shapes}
    for name, values in lists.items():  # a repeated condition would count twice in every mean and interval
        values = list(values or ())
        repeated = sorted({str(list(v) if isinstance(v, tuple) else v) for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(f"{name} lists {', '.join(repeated)} more than once; each must appear once (a repeated "
                              "dataset or shape would count twice in every mean and interval)")
    if cfg.ablation.num_seeds > len(cfg.seeds):
        raise ConfigError(f"ablation.num_seeds = {cfg.ablation.num_seeds} but only {len(cfg.seeds)} seeds are "
                          "configured (seeds)")
    if cfg.meta.min_classes > cfg.meta.max_classes:
        raise ConfigError(f"meta.min_classes = {cfg.meta.min_classes} exceeds meta.max_classes = "
                          f"{cfg.meta.max_classes}")
    if cfg.meta.task_images < 2 * cfg.meta.max_classes:
        raise ConfigError(f"meta.task_images = {cfg.meta.task_images} is too small for {cfg.meta.max_classes}-class "
                          "tasks (at least 2 images per class)")
    for where, shapes in (("eval.shapes", cfg.eval.shapes), ("eval.shifted_shapes", cfg.eval.shifted_shapes or ((2, 4),)),
                          ("benchmark.shapes", cfg.benchmark.shapes),
                          ("benchmark.transductive_shapes", cfg.benchmark.transductive_shapes),
                          ("ablation.shapes", cfg.ablation.shapes)):
        if not shapes:
            raise ConfigError(f"{where} is empty; give at least one [K, N] task shape")
        for K, N in shapes:
            if K < 2 or N < 2 * K:
                raise ConfigError(f"{where}: a task shape [K, N] needs K >= 2 and N >= 2K, got [{K}, {N}]")
    from hmlib.hyper.generators import GENERATORS  # each generator validates what it needs

    GENERATORS[cfg.hyper.generation].check_config(cfg)
    return cfg


def load_config(profile: str = "default", path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a validated config: package defaults, then a profile, then a JSON file, then the environment variable
    ``HMLIB_DEVICE`` (set by ``hmlib run --device`` for its notebook kernels), then overrides."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile '{profile}'; choose one of: {', '.join(PROFILES)}")
    cfg = _merge(Config(profile=profile), PROFILES[profile], "")
    if path is not None:
        settings = read_config_file(path)
        if "profile" in settings and settings["profile"] != profile:  # it would relabel the run, not change it
            raise ConfigError(f"{path}: \"profile\": {settings['profile']!r} is not the profile asked for "
                              f"('{profile}'); a config file cannot choose the profile: pass --profile instead")
        cfg = _merge(cfg, settings, "")
    if os.environ.get(DEVICE_VARIABLE, "").strip():
        cfg = _merge(cfg, {"device": os.environ[DEVICE_VARIABLE].strip()}, "")
    if overrides:
        cfg = _merge(cfg, overrides, "")
    return validate(cfg)


VOLATILE = ("profile", "device", "num_threads")  # where and under which name a run computes, not what it computes


def settings_of(cfg: "Config") -> dict[str, Any]:
    """What ``cfg`` computes: :func:`config_to_dict` without :data:`VOLATILE` (results made under another profile
    name, device or thread count with the same settings are the same results)."""
    return {k: v for k, v in config_to_dict(cfg).items() if k not in VOLATILE}


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


def with_profile_test_time(cfg: Config) -> Config:
    """``cfg`` with its test-time-only adapt settings (:data:`TEST_TIME_ONLY`) and the transductive gate's
    (:data:`GATE_SETTINGS`) those of its profile: what a checkpoint recorded for them is not part of it (a reused
    checkpoint may have been made by a run with others, or before the gate's rule changed)."""
    profile = load_config(cfg.profile) if cfg.profile in PROFILES else Config()
    kept = {k: getattr(profile.adapt, k) for k in TEST_TIME_ONLY}
    gate = {k: getattr(profile.transductive, k) for k in GATE_SETTINGS}
    return dataclasses.replace(cfg, adapt=dataclasses.replace(cfg.adapt, **kept),
                               transductive=dataclasses.replace(cfg.transductive, **gate))


def with_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """``cfg`` with nested overrides applied and validated (unknown keys raise ConfigError)."""
    return validate(_merge(cfg, overrides, "")) if overrides else cfg


def configure_runtime(cfg: Config) -> "torch.device":  # noqa: F821
    """Deterministic kernels, ``cfg.num_threads`` for torch and numpy/scikit-learn, freed CPU memory kept for reuse
    (:mod:`hmlib.allocator`); return the resolved device."""
    import torch
    from threadpoolctl import threadpool_limits

    from hmlib.allocator import retain_freed_memory
    from hmlib.reproducibility import deterministic_kernels

    deterministic_kernels()
    retain_freed_memory()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
        threadpool_limits(limits=cfg.num_threads)  # applies process-wide from here on
    return resolve_device(cfg.device)


def device_name(text: str) -> str:
    """A device name as the config accepts it (``--device`` of the commands): 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    (whether this machine has it is checked where it is used: :func:`resolve_device`)."""
    name = str(text).strip()
    if not DEVICE_NAMES.matches(name):
        raise ConfigError(f"device must be {DEVICE_NAMES.words}, got {text!r}")
    return name


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """The one device every stage computes on: 'auto' picks cuda, then mps, then cpu; any other name is passed to
    torch.device. A device this machine does not have is a ConfigError (one line), never a crash in a stage."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device = {name!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:0', 'mps')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but torch {torch.__version__} sees no CUDA GPU on this machine; use "
                          "'auto' or 'cpu' (or install a CUDA build of torch)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device = {name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not mps:
        raise ConfigError(f"device = {name!r} but MPS (Apple GPU) is not available here; use 'auto' or 'cpu'")
    return device
