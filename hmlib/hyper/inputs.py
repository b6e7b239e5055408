"""What the hypernetwork reads of a dataset split: conditioning rows, the images (or latent rows) and labels.

:func:`load_task_data` is the one place that decides, for a replicate seed, which VAE gives the conditioning
rows (the shared VAE of the meta-training datasets) and what the target network reads: the images themselves
(generator ``film``, which runs them through the backbone) or the [mu, logvar] rows (generator ``full``).
Meta-training, evaluation, ablations, the explorer and ``hmlib cluster`` all read tasks through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from hmlib import data
from hmlib.config import Config
from hmlib.hyper.generators import TaskInputs
from hmlib.vae.latents import encode_split
from hmlib.vae.train import get_vae


@dataclass
class TaskData:
    """One dataset split as the hypernetwork reads it; rows of ``context``, ``images``/``features`` and ``labels``
    align."""

    name: str
    split: str
    context: np.ndarray  # (n, C) float32 conditioning rows (the VAE distribution)
    labels: np.ndarray  # (n,) int64 (scoring and the outer loss only)
    images: np.ndarray | None = None  # (n, 28, 28) uint8 (what 'film' reads; episodes re-encode them for both)
    features: np.ndarray | None = None  # (n, F) float32 ('full': [mu, logvar])
    identity: dict[str, Any] = field(default_factory=dict)  # ids of the models and images that made the rows

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "TaskData":
        """The rows in ``index``."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(self, context=self.context[index], labels=self.labels[index], images=pick(self.images),
                       features=pick(self.features))

    def task_inputs(self, indices: np.ndarray) -> TaskInputs:
        """TaskInputs of tasks given by a (T, N) index array."""
        indices = np.asarray(indices)
        return TaskInputs(torch.as_tensor(self.context[indices]),
                          None if self.images is None or self.features is not None  # 'full' reads the rows only
                          else torch.as_tensor(self.images[indices]),
                          None if self.features is None else torch.as_tensor(self.features[indices]))


def reads_images(cfg: Config) -> bool:
    """Whether the configured generator reads images through the backbone (else the VAE rows)."""
    return cfg.hyper.generation != "full"


def task_data_from_models(cfg: Config, image_set: Any, vae: Any, vae_meta: dict[str, Any], *,
                          progress: bool = False) -> TaskData:
    """TaskData of an ImageSet under a VAE (its rows cached by the VAE's identity): what every loader ends in."""
    latents = encode_split(vae, vae_meta, image_set, progress=progress)
    context = np.asarray(latents.distribution, np.float32)
    images = np.asarray(image_set.images)  # kept for 'full' too: meta-training episodes shift and re-encode them
    return TaskData(image_set.name, image_set.split, context, np.asarray(image_set.labels, np.int64), images=images,
                    features=None if reads_images(cfg) else context,
                    identity={"vae_id": latents.vae_id, "images": image_set.fingerprint})


def load_task_data(cfg: Config, dataset: str, split: str, seed: int, *, train: bool = True,
                   progress: bool = True) -> TaskData:
    """Conditioning rows and images (or rows) of one split under replicate ``seed``'s VAE (``train=False``: never
    train a missing VAE, say which one is missing)."""
    vae, vae_meta = get_vae(cfg, "shared", seed, train=train, progress=progress, verbose=False)
    image_set = data.load_split(dataset, split, cfg.data, progress=progress)
    return task_data_from_models(cfg, image_set, vae, vae_meta, progress=progress)
