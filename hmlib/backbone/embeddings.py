"""Backbone embeddings of every dataset split, cached like the latents (``data_cache/embeddings/<model>/``).

Zero-shot, a dataset is embedded by the backbone as trained. Transductive, the backbone's normalisation
statistics are first re-estimated on the dataset's own unlabeled train split (AdaBN; never its labels).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hmlib import data
from hmlib.artifacts import fingerprint
from hmlib.backbone.model import ConvBackbone, batch_statistics
from hmlib.backbone.train import adapt_batchnorm, bn_sample, get_backbone
from hmlib.config import SETTINGS, Config, ConfigError
from hmlib.features import cached_features, encode_batches, images_to_tensor


@dataclass
class EmbeddingSet:
    """Backbone embeddings of one dataset split."""

    name: str
    split: str
    embeddings: np.ndarray  # (n, D) float32
    labels: np.ndarray  # (n,) int64
    backbone_id: str

    def __len__(self) -> int:
        return len(self.labels)


def embed_images(model: ConvBackbone, images: np.ndarray, *, progress: bool = False) -> np.ndarray:
    """Embeddings (n, D) float32 of uint8 images (n, 28, 28), eval mode."""
    device = next(model.parameters()).device
    model.eval()
    return encode_batches(lambda x: model.embed(x.to(device)), images, progress=progress, desc="embed")[0]


def setting_backbone(cfg: Config, dataset: str, setting: str, seed: int, *,
                     train: bool = True, progress: bool = True) -> tuple[ConvBackbone, dict[str, Any]]:
    """The backbone that reads ``dataset`` in ``setting``: as trained (zero-shot) or with the dataset's own
    normalisation statistics (transductive); meta has its 'name' and identity 'backbone_id'."""
    if setting not in SETTINGS:
        raise ConfigError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    model, meta = get_backbone(cfg, seed, train=train, progress=progress, verbose=False)
    return (model, meta) if setting == "zero_shot" else with_dataset_statistics(cfg, model, meta, dataset)


def with_dataset_statistics(cfg: Config, model: ConvBackbone, meta: dict[str, Any], dataset: str
                            ) -> tuple[ConvBackbone, dict[str, Any]]:
    """The backbone with normalisation statistics from ``dataset``'s unlabeled train split (transductive)."""
    train_images = data.load_split(dataset, "train", cfg.data, progress=False)
    adapted = adapt_batchnorm(model, bn_sample(train_images.images))
    return adapted, {**meta, "name": f"{meta['name']}_bn-{dataset}",
                     "backbone_id": fingerprint(meta["backbone_id"], "adabn", train_images.fingerprint)}


def embed_split(model: ConvBackbone, meta: dict[str, Any], image_set: Any, *, progress: bool = False) -> EmbeddingSet:
    """Embeddings of one ImageSet under ``model``, from the cache when made by this model and these images."""
    arrays = cached_features("embeddings", meta["name"], image_set, {"backbone_id": meta["backbone_id"]},
                             lambda images: {"embeddings": embed_images(model, images, progress=progress)})
    return EmbeddingSet(image_set.name, image_set.split, arrays["embeddings"], np.asarray(image_set.labels, np.int64),
                        meta["backbone_id"])


def get_embeddings(cfg: Config, dataset: str, split: str, setting: str, seed: int, *,
                   train: bool = True, progress: bool = True) -> EmbeddingSet:
    """Embeddings of a dataset split in ``setting`` under replicate ``seed``'s backbone; cached."""
    model, meta = setting_backbone(cfg, dataset, setting, seed, train=train, progress=progress)
    return embed_split(model, meta, data.load_split(dataset, split, cfg.data, progress=progress), progress=progress)


@torch.no_grad()
def embed_tasks_with_task_statistics(model: ConvBackbone, images: np.ndarray) -> np.ndarray:
    """Embeddings (T, N, D) of task images (T, N, 28, 28), each task normalised with its own batch statistics."""
    device = next(model.parameters()).device
    out = []
    with batch_statistics(model):
        for task in images:
            out.append(model.embed(images_to_tensor(task).to(device)).cpu().numpy())
    return np.stack(out).astype(np.float32)
