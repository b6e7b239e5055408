"""Latents: every dataset split encoded once to (mu, logvar) under a VAE, cached beside a manifest.

Cache layout: ``data_cache/latents/<vae name>/<dataset>_<split>.npz`` (see :mod:`hmlib.features`),
tied to the VAE's weights (``vae_id``) and the images' fingerprint; a mismatch re-encodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hmlib import data
from hmlib.config import Config
from hmlib.features import cached_features
from hmlib.vae.train import VAE, encode_images, get_vae


@dataclass
class LatentSet:
    """Posterior parameters of one dataset split under one VAE."""

    name: str
    split: str
    mu: np.ndarray  # (n, d) float32
    logvar: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64
    vae_id: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def distribution(self) -> np.ndarray:
        """The VAE distribution: rows [mu, logvar], (n, 2d)."""
        return np.concatenate([self.mu, self.logvar], axis=1)


def encode_split(vae: VAE, vae_meta: dict[str, Any], image_set: Any, *, progress: bool = False) -> LatentSet:
    """Latents of one ImageSet under ``vae``, from the cache when it was made by this VAE and these images."""

    def compute(images: np.ndarray) -> dict[str, np.ndarray]:
        mu, logvar = encode_images(vae, images, progress=progress)
        return {"mu": mu, "logvar": logvar}

    arrays = cached_features("latents", vae_meta["name"], image_set, {"vae_id": vae_meta["vae_id"]}, compute)
    return LatentSet(image_set.name, image_set.split, arrays["mu"], arrays["logvar"],
                     np.asarray(image_set.labels, np.int64), vae_meta["vae_id"])


def get_latents(cfg: Config, dataset: str, split: str, seed: int, *, train: bool = True,
                progress: bool = True) -> LatentSet:
    """Latents of a dataset split under the shared VAE of replicate ``seed``."""
    vae, vae_meta = get_vae(cfg, "shared", seed, train=train, progress=progress, verbose=False)
    return encode_split(vae, vae_meta, data.load_split(dataset, split, cfg.data, progress=progress),
                        progress=progress)
