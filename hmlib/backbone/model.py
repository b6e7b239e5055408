"""The backbone: a small stride-2 conv net whose embedding the hypernetwork's classifier acts on.

Blocks conv3x3 (stride 2) -> BatchNorm -> ReLU with ``channels`` widths (28 -> 14 -> 7 -> 4 for three
blocks), flattened, then a linear layer to ``embed_dim``; a linear head over the meta-training classes
is used for training only. Strided convolutions instead of max-pooling keep the per-task latency of the
whole method within that of k-means on raw pixels (``benchmarks/bench_eval.py``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlib.config import IMAGE_SIZE


class ConvBackbone(nn.Module):
    """Images (B, 1, 28, 28) in [0, 1] -> embeddings (B, embed_dim); ``forward`` adds the training head's logits."""

    def __init__(self, channels: Sequence[int], embed_dim: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width, size = 1, IMAGE_SIZE
        for out in channels:
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            width, size = out, (size + 1) // 2
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.embedding = nn.Linear(width * size * size, embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.channels, self.embed_dim, self.num_classes = tuple(channels), embed_dim, num_classes

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings (B, embed_dim) of images (B, 1, 28, 28)."""
        return self.embedding(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes) of the training head."""
        return self.head(self.embed(x))


def augment(x: Tensor, generator: torch.Generator, strength: float = 1.0) -> Tensor:
    """Random affine per image: rotation +-15 deg, scale +-15%, shift +-12% of the size, times ``strength`` (the
    random numbers come from ``generator``, a CPU one, whatever device ``x`` is on: the same draws everywhere)."""
    if strength <= 0:
        return x
    batch = x.shape[0]
    uniform = lambda *shape: torch.rand(*shape, generator=generator) * 2 - 1  # noqa: E731
    angle = uniform(batch) * math.radians(15) * strength
    scale = 1 + uniform(batch) * 0.15 * strength
    shift = uniform(batch, 2) * 0.12 * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def blocks(model: ConvBackbone) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The (convolution, normalisation) pair of every block, in order (each followed by a ReLU)."""
    layers = list(model.features)
    return [(layers[i], layers[i + 1]) for i in range(0, len(layers) - 1, 3)]


def batchnorm_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The model's BatchNorm layers."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Inside the block every BatchNorm layer normalises with the statistics of the batch it sees (one task's
    images), leaving the stored running statistics untouched (label-free per-task normalisation)."""
    layers = batchnorm_layers(model)
    saved = [(m.training, m.momentum) for m in layers]
    for m in layers:
        m.train()
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: nothing stored
    try:
        yield
    finally:
        for m, (training, momentum) in zip(layers, saved):
            m.train(training)
            m.momentum = momentum
