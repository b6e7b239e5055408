"""Everything the methods read for one held-out dataset, setting and replicate: built from a checkpoint's bundle.

Zero-shot, the bundled VAE and backbone read the dataset (nothing else is needed: a checkpoint copied to a fresh
machine evaluates). Transductive, the backbone is the one adapted to the dataset's unlabeled train split
(:mod:`hmlib.backbone.transductive`, made by notebook 03, found in ``models/``); the hypernetwork modulates that
backbone and every embedding baseline reads it. Evaluation never trains.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hmlib import data
from hmlib.backbone.embeddings import embed_split
from hmlib.backbone.model import ConvBackbone
from hmlib.backbone.transductive import get_transductive_backbone
from hmlib.config import Config
from hmlib.hyper.bundle import Bundle
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.inputs import TaskData, task_data_from_models
from hmlib.vae.latents import encode_split


@dataclass
class SeedInputs:
    """One replicate's view of a dataset: the hypernetwork (with the setting's backbone) and every representation."""

    seed: int
    setting: str
    hypernet: HyperNet
    backbone: ConvBackbone | None
    test: TaskData  # what the hypernetwork reads, test split
    reps: dict[str, np.ndarray]  # representation name -> (n, ...) rows of the test split
    train_reps: dict[str, np.ndarray] = field(default_factory=dict)  # the same for the train split (ceiling)
    train_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> np.ndarray:
        return self.test.images


def setting_models(bundle: Bundle, cfg: Config, dataset: str, setting: str) -> tuple[HyperNet, Any, dict | None]:
    """(hypernetwork, backbone, backbone meta) that read ``dataset`` in ``setting`` (transductive: the backbone
    adapted to the dataset's unlabeled train split, modulated by the same hypernetwork)."""
    if setting == "zero_shot" or bundle.backbone is None:
        return bundle.hypernet, bundle.backbone, bundle.backbone_meta
    backbone, meta = get_transductive_backbone(cfg, bundle.backbone, bundle.backbone_meta, dataset, train=False)
    hypernet = copy.deepcopy(bundle.hypernet)
    hypernet.generator.backbone.load_state_dict(backbone.state_dict())
    return hypernet.eval(), hypernet.generator.backbone, meta


def seed_inputs(bundle: Bundle, cfg: Config, dataset: str, setting: str, *, with_train: bool = True,
                progress: bool = False) -> SeedInputs:
    """The test rows of ``dataset`` under one checkpoint's models in ``setting`` (and, ``with_train``, the train
    split's embeddings that the supervised ceiling learns from)."""
    hypernet, backbone, backbone_meta = setting_models(bundle, cfg, dataset, setting)
    test_set = data.load_split(dataset, "test", cfg.data, progress=progress)
    test = task_data_from_models(bundle.cfg, test_set, bundle.vae, bundle.vae_meta, progress=progress)
    reps = {"latent": encode_split(bundle.vae, bundle.vae_meta, test_set, progress=progress).mu,
            "pixels": test_set.images.reshape(len(test_set.images), -1).astype(np.float32) / 255.0}
    train_reps, train_labels = {}, np.zeros(0, np.int64)
    identity = {**test.identity}
    if backbone is not None:
        reps["embedding"] = embed_split(backbone, backbone_meta, test_set, progress=progress).embeddings
        identity["backbone_id"] = backbone_meta["backbone_id"]
        if "gate" in backbone_meta:  # transductive: whether the adaptation was used, and why
            identity["transductive_gate"] = backbone_meta["gate"]
        if with_train:
            train_set = data.load_split(dataset, "train", cfg.data, progress=progress)
            train_reps["embedding"] = embed_split(backbone, backbone_meta, train_set, progress=progress).embeddings
            train_labels = np.asarray(train_set.labels)
    return SeedInputs(bundle.seed, setting, hypernet, backbone, test, reps, train_reps, train_labels, identity)
