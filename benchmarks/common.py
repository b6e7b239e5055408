"""Shared by the benchmark scripts: one-thread set-up, the models and images they time, and the figures file."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from hmlib import paths
from hmlib.artifacts import write_json


def setup(threads: int = 1) -> str:
    """Limit torch and the BLAS pools to ``threads``, keep freed memory as every hmlib stage does
    (:mod:`hmlib.allocator`); return a line describing the machine's state."""
    from hmlib.allocator import retain_freed_memory

    retain_freed_memory()
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    load = os.getloadavg()[0]
    return f"{threads} thread(s), {len(os.sched_getaffinity(0))} cores visible, load average {load:.2f}"


def record(name: str, figures: dict[str, Any], results_dir: Path | None = None) -> None:
    """Write the figures to ``results/bench/<name>.json`` (``hmlib results --write`` puts them in the README)."""
    path = write_json((results_dir or paths.results_dir()) / "bench" / f"{name}.json", figures)
    print(f"wrote {path}")


@dataclass
class Models:
    """What a benchmark times: the hypernetwork (its film generator holds the backbone), the VAE, the config."""

    hypernet: Any  # hmlib.hyper.hypernet.HyperNet, eval mode
    vae: Any  # hmlib.vae.model.VAE
    backbone: Any  # hmlib.backbone.model.ConvBackbone the hypernetwork modulates (None for generator 'full')
    cfg: Any  # hmlib.config.Config the models were made with
    what: str  # a checkpoint's file name, or 'untrained <profile> models'

    @property
    def trained(self) -> bool:
        return not self.what.startswith("untrained")


def load_models(profile: str, checkpoint: str | None = None) -> Models:
    """The models of ``checkpoint``, else of the pipeline's first checkpoint, else untrained models of ``profile``'s
    architecture (latency does not depend on the weights; accuracy does, so scripts skip it then)."""
    from hmlib.artifacts import ArtifactError
    from hmlib.cluster.estimator import default_checkpoint
    from hmlib.hyper.bundle import load_bundle

    if checkpoint is None:
        try:
            checkpoint = default_checkpoint()
        except ArtifactError:
            return untrained_models(profile)
    bundle = load_bundle(checkpoint)
    return Models(bundle.hypernet.eval(), bundle.vae.eval(), bundle.backbone, bundle.cfg, bundle.path.name)


def untrained_models(profile: str) -> Models:
    """Freshly initialised models of a profile (seeded)."""
    from hmlib.backbone.model import ConvBackbone
    from hmlib.config import load_config
    from hmlib.hyper.hypernet import HyperNet
    from hmlib.hyper.inputs import reads_images
    from hmlib.reproducibility import seeded
    from hmlib.vae.model import build_vae

    cfg = load_config(profile)
    context_dim = 2 * cfg.vae.latent_dim
    with seeded(0):
        vae = build_vae(cfg.vae).eval()
        backbone = ConvBackbone(cfg.backbone.channels, cfg.backbone.embed_dim, 10).eval()
        if reads_images(cfg):
            hypernet = HyperNet(cfg, context_dim, cfg.task.num_classes, backbone=backbone)
        else:
            hypernet, backbone = HyperNet(cfg, context_dim, cfg.task.num_classes, feature_dim=context_dim), None
    return Models(hypernet.eval(), vae, backbone, cfg, f"untrained {profile} models")


def task_inputs(cfg: Any, context: np.ndarray, images: np.ndarray) -> Any:
    """TaskInputs of tasks (T, N, ...) as the configured generator reads them (images, or the VAE rows)."""
    from hmlib.hyper.generators import TaskInputs
    from hmlib.hyper.inputs import reads_images

    context = torch.as_tensor(context)
    return TaskInputs(context, torch.as_tensor(images)) if reads_images(cfg) else TaskInputs(context, features=context)


def encode_tasks(vae: Any, images: np.ndarray) -> np.ndarray:
    """The conditioning rows (T, N, 2d) of tasks' images (T, N, 28, 28): their VAE distribution [mu, logvar]."""
    from hmlib.vae.train import encode_images

    mu, logvar = encode_images(vae, images.reshape(-1, *images.shape[-2:]))
    return np.concatenate([mu, logvar], axis=1).reshape(*images.shape[:-2], -1)


def split_images(cfg: Any, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray, str]:
    """(images, labels, what) of a dataset's test split, or synthetic noise images when no copy is reachable."""
    from hmlib import data

    try:
        split = data.load_split(dataset, "test", cfg.data, progress=False)
        return split.images, np.asarray(split.labels), f"{dataset} test split"
    except data.DatasetError as err:
        print(f"{dataset} is not reachable ({' '.join(str(err).split())[:160]}); timing synthetic images instead")
        rng = np.random.default_rng(0)
        return (rng.random((10000, 28, 28)) * 255).astype(np.uint8), np.repeat(np.arange(10), 1000), \
            "synthetic images"


def task_size(labels: np.ndarray, num_classes: int, num_images: int) -> int:
    """``num_images``, or the largest task size the split's classes can fill (said when smaller)."""
    from hmlib.data import fit_task_size

    size = fit_task_size(labels, num_classes, num_images)
    if size < num_images:
        print(f"note: the split's classes fill tasks of at most {size} images; timing N = {size}, not {num_images}")
    return size
