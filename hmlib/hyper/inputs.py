"""What the hypernetwork reads of a dataset split: conditioning rows, target features and labels, aligned.

:func:`load_task_data` is the one place that decides, for a setting and replicate seed, which VAE gives
the conditioning rows and which backbone (with or without the dataset's own normalisation statistics) gives the features; meta-training, evaluation, ablations, the explorer and
``hmlib cluster`` all read tasks through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hmlib import data
from hmlib.backbone.embeddings import embed_split, setting_backbone
from hmlib.config import Config
from hmlib.hyper.hypernet import TaskInputs
from hmlib.vae.latents import encode_split
from hmlib.vae.train import get_vae, vae_scope


@dataclass
class TaskData:
    """One dataset split as the hypernetwork reads it; rows of ``context``, ``features`` and ``labels`` align."""

    name: str
    split: str
    context: np.ndarray  # (n, C) float32 conditioning rows
    features: np.ndarray  # (n, F) float32 target-network inputs
    labels: np.ndarray  # (n,) int64 (scoring and the outer loss only)
    identity: dict[str, Any] = field(default_factory=dict)  # ids of the VAE and backbone that made the rows

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "TaskData":
        """The rows in ``index``."""
        return replace(self, context=self.context[index], features=self.features[index], labels=self.labels[index])

    def task_inputs(self, indices: np.ndarray) -> TaskInputs:
        """TaskInputs of tasks given by a (T, N) index array."""
        indices = np.asarray(indices)
        return TaskInputs.from_arrays(self.context[indices], self.features[indices])


def task_data_from_models(cfg: Config, image_set: Any, vae: Any, vae_meta: dict[str, Any], backbone: Any = None,
                          backbone_meta: dict[str, Any] | None = None, *, progress: bool = False) -> TaskData:
    """TaskData of an ImageSet under given models (cached by their identities): what every loader ends in."""
    latents = encode_split(vae, vae_meta, image_set, progress=progress)
    identity: dict[str, Any] = {"vae_id": latents.vae_id}
    embeddings = None
    if backbone is not None:
        embeddings = embed_split(backbone, backbone_meta, image_set, progress=progress).embeddings
        identity["backbone_id"] = backbone_meta["backbone_id"]
    needs_embeddings = cfg.hyper.target_input == "embedding" or cfg.hyper.conditioning_input == "embedding"
    if needs_embeddings and embeddings is None:
        raise ValueError("this configuration reads backbone embeddings, but no backbone was given")
    features = embeddings if cfg.hyper.target_input == "embedding" else latents.distribution
    context = embeddings if cfg.hyper.conditioning_input == "embedding" else latents.distribution
    return TaskData(image_set.name, image_set.split, np.asarray(context, np.float32), np.asarray(features, np.float32),
                    np.asarray(image_set.labels, np.int64), identity)


def load_task_data(cfg: Config, dataset: str, split: str, setting: str, seed: int, *,
                   train: bool = True, progress: bool = True) -> TaskData:
    """Conditioning rows and features of one split in ``setting`` under replicate ``seed``'s models
    (``train=False``: never train a missing model, say which one is missing)."""
    vae, vae_meta = get_vae(cfg, vae_scope(setting, dataset), seed, train=train, progress=progress, verbose=False)
    backbone, backbone_meta = None, None
    if cfg.hyper.target_input == "embedding" or cfg.hyper.conditioning_input == "embedding":
        backbone, backbone_meta = setting_backbone(cfg, dataset, setting, seed, train=train, progress=progress)
    image_set = data.load_split(dataset, split, cfg.data, progress=progress)
    return task_data_from_models(cfg, image_set, vae, vae_meta, backbone, backbone_meta, progress=progress)
