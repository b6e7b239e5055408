"""The hypernetwork: reads a task's conditioning rows (its VAE distribution) and emits the task's classifier.

Shapes: a task has N images; its *context* is the matrix of conditioning rows (M, C) (by default the VAE
distribution [mu, logvar], C = 2d) and its *features* (N, F) are what the generated classifier acts on (the
backbone embeddings, F = D, or the [mu, logvar] rows themselves). Everything carries a leading task
dimension T, so a meta-batch of tasks is one batched computation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from hmlib.config import HyperConfig
from hmlib.features import normalize_task
from hmlib.hyper.encoders import ENCODERS
from hmlib.hyper.generators import GENERATORS, Params, TaskState


@dataclass
class TaskInputs:
    """One task, or a batch of tasks with a leading T: conditioning rows and the target network's features."""

    context: Tensor  # (N, C) or (T, M, C)
    features: Tensor  # (N, F) or (T, N, F)

    def __post_init__(self) -> None:
        if self.context.dim() != self.features.dim() or self.features.dim() not in (2, 3):
            raise ValueError(f"context {tuple(self.context.shape)} and features {tuple(self.features.shape)} must both "
                             "be (N, ...) or both (T, N, ...)")
        if self.context.dim() == 3 and self.context.shape[0] != self.features.shape[0]:
            raise ValueError(f"context and features hold different numbers of tasks: {self.context.shape[0]} vs "
                             f"{self.features.shape[0]}")

    @property
    def batched(self) -> bool:
        return self.features.dim() == 3

    def as_batch(self) -> "TaskInputs":
        """The same task(s) with a leading task dimension."""
        return self if self.batched else TaskInputs(self.context.unsqueeze(0), self.features.unsqueeze(0))

    @classmethod
    def from_arrays(cls, context: np.ndarray, features: np.ndarray) -> "TaskInputs":
        """float32 tensors from numpy arrays."""
        return cls(torch.as_tensor(np.asarray(context, dtype=np.float32)),
                   torch.as_tensor(np.asarray(features, dtype=np.float32)))


class HyperNet(nn.Module):
    """Set encoder over the task's conditioning rows + the generator of its classifier."""

    def __init__(self, cfg: HyperConfig, context_dim: int, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cfg, self.context_dim, self.feature_dim, self.num_classes = cfg, context_dim, feature_dim, num_classes
        self.encoder = ENCODERS[cfg.conditioning](context_dim, cfg)
        self.generator = GENERATORS[cfg.generation](cfg, feature_dim, num_classes)

    def check(self, inputs: TaskInputs) -> TaskInputs:
        """``inputs`` as a batch, with a clear error if their widths are not this hypernetwork's."""
        inputs = inputs.as_batch()
        if inputs.context.shape[-1] != self.context_dim or inputs.features.shape[-1] != self.feature_dim:
            raise ValueError(f"this hypernetwork reads context rows of width {self.context_dim} and features of width "
                             f"{self.feature_dim}, got {inputs.context.shape[-1]} and {inputs.features.shape[-1]}; "
                             "use the VAE and backbone it was meta-trained with")
        return inputs

    def encode(self, context: Tensor) -> Tensor:
        """Task codes (T, E) from context rows (T, M, C), at most ``num_context`` rows, normalised per task."""
        return self.encoder(normalize_task(context[:, : self.cfg.num_context]))

    def prepare(self, features: Tensor) -> TaskState:
        """The generator's per-task view of the features (T, N, F)."""
        return self.generator.prepare(features)

    def forward(self, context: Tensor, state: TaskState, num_classes: int | None = None) -> Params:
        """Generated parameters of each task's classifier (``num_classes`` other than K where the generator allows)."""
        return self.generator(self.encode(context), state, num_classes)

    def logits(self, params: Params, state: TaskState) -> Tensor:
        """(T, N, K) logits of the generated classifiers."""
        return self.generator.logits(params, state)

    def extend(self, params: Params, state: TaskState, features: Tensor) -> Tensor:
        """(T, M, K) logits of rows outside the task under the task's (adapted) classifier."""
        return self.generator.extend(params, state, features)

    def adaptable(self, params: Params) -> list[str]:
        """Names of the generated parameters the inner loop updates."""
        return self.generator.adaptable(params)
