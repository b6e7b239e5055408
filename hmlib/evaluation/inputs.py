"""Everything the methods read for one held-out dataset, setting and replicate: built from a checkpoint's bundle.

Zero-shot, the bundled VAE and backbone encode the dataset (nothing else is needed: a checkpoint copied to a
fresh machine evaluates). Transductive, the dataset's own VAE comes from ``models/`` (never trained here) and
the bundled backbone takes the dataset's normalisation statistics. Evaluation never trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmlib import data
from hmlib.backbone.embeddings import embed_split, with_dataset_statistics
from hmlib.config import Config
from hmlib.hyper.bundle import Bundle
from hmlib.hyper.inputs import TaskData, task_data_from_models
from hmlib.vae.latents import encode_split
from hmlib.vae.train import get_vae


@dataclass
class SeedInputs:
    """One replicate's view of a dataset: the hypernetwork's rows and each baseline's representation."""

    seed: int
    test: TaskData  # what the hypernetwork reads, test split
    reps: dict[str, np.ndarray]  # representation name -> (n, ...) rows of the test split
    train_reps: dict[str, np.ndarray]  # the same for the train split (supervised ceilings only)
    train_labels: np.ndarray
    identity: dict[str, Any] = field(default_factory=dict)


def setting_models(bundle: Bundle, cfg: Config, dataset: str) -> tuple[Any, dict, Any, dict | None]:
    """(vae, vae_meta, backbone, backbone_meta) that read ``dataset`` in the checkpoint's setting."""
    seed = int(bundle.meta["seed"])
    if bundle.setting == "zero_shot":
        vae, vae_meta = bundle.vae, bundle.vae_meta
    else:
        vae, vae_meta = get_vae(cfg, dataset, seed, train=False, progress=False, verbose=False)
    backbone, backbone_meta = bundle.backbone, bundle.backbone_meta
    if backbone is not None and bundle.setting == "transductive":
        backbone, backbone_meta = with_dataset_statistics(cfg, backbone, backbone_meta, dataset)
    return vae, vae_meta, backbone, backbone_meta


def seed_inputs(bundle: Bundle, cfg: Config, dataset: str, *, with_train: bool = True,
                progress: bool = False) -> SeedInputs:
    """The test rows of ``dataset`` under one checkpoint's models (and, ``with_train``, the train split's
    embeddings that the supervised ceiling learns from)."""
    vae, vae_meta, backbone, backbone_meta = setting_models(bundle, cfg, dataset)
    model_cfg = bundle.cfg
    reps, train_reps = {}, {}
    test_set = data.load_split(dataset, "test", cfg.data, progress=progress)
    test = task_data_from_models(model_cfg, test_set, vae, vae_meta, backbone, backbone_meta, progress=progress)
    reps["latent"] = encode_split(vae, vae_meta, test_set, progress=progress).mu
    reps["pixels"] = test_set.images.reshape(len(test_set.images), -1).astype(np.float32) / 255.0
    train_labels = np.zeros(0, np.int64)
    if backbone is not None:
        reps["embedding"] = embed_split(backbone, backbone_meta, test_set, progress=progress).embeddings
        if with_train:
            train_set = data.load_split(dataset, "train", cfg.data, progress=progress)
            train_reps["embedding"] = embed_split(backbone, backbone_meta, train_set, progress=progress).embeddings
            train_labels = np.asarray(train_set.labels)
    return SeedInputs(int(bundle.meta["seed"]), test, reps, train_reps, train_labels,
                      {**test.identity, "images": test_set.fingerprint})
