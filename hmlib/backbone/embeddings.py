"""Backbone embeddings of every dataset split, cached like the latents (``data_cache/embeddings/<model>/``),
tied to the model's weights (``backbone_id``) and the images' fingerprint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hmlib import data
from hmlib.backbone.model import ConvBackbone
from hmlib.backbone.train import get_backbone
from hmlib.config import Config
from hmlib.features import cached_features, encode_batches


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


def training_confidence(model: ConvBackbone, images: np.ndarray) -> np.ndarray:
    """Per image (n,), the largest softmax probability of the backbone's training head over its meta-training classes
    (eval mode): how sure the backbone is that an image is one of the classes it was trained on (the maximum softmax
    probability of Hendrycks and Gimpel's out-of-distribution baseline)."""
    rows = torch.as_tensor(embed_images(model, images))
    device = next(model.parameters()).device
    with torch.no_grad():
        probabilities = torch.softmax(model.head(rows.to(device)), dim=1)
    return probabilities.max(dim=1).values.cpu().numpy()


def embed_split(model: ConvBackbone, meta: dict[str, Any], image_set: Any, *, progress: bool = False) -> EmbeddingSet:
    """Embeddings of one ImageSet under ``model``, from the cache when made by this model and these images."""
    arrays = cached_features("embeddings", meta["name"], image_set, {"backbone_id": meta["backbone_id"]},
                             lambda images: {"embeddings": embed_images(model, images, progress=progress)})
    return EmbeddingSet(image_set.name, image_set.split, arrays["embeddings"], np.asarray(image_set.labels, np.int64),
                        meta["backbone_id"])


def get_embeddings(cfg: Config, dataset: str, split: str, seed: int, *, train: bool = True,
                   progress: bool = True) -> EmbeddingSet:
    """Embeddings of a dataset split under replicate ``seed``'s backbone (as trained); cached."""
    model, meta = get_backbone(cfg, seed, train=train, progress=progress, verbose=False)
    return embed_split(model, meta, data.load_split(dataset, split, cfg.data, progress=progress), progress=progress)
