"""The hypernetwork: reads a task's conditioning rows (its VAE distribution) and emits the task-specific network.

Shapes: a task has N images; its *context* is the matrix of conditioning rows (M, C) (the VAE distribution
[mu, logvar], C = 2d). The set encoder pools the rows into a task code (E,); the generator turns the code into
the task's parameters (:mod:`hmlib.hyper.generators`). Rows are normalised with fixed statistics of the
meta-training data (``context_mean``, ``context_std``, set once before meta-training), not per task: where a
task's distribution sits (noisier, blurrier, smaller digits than usual) is part of what the code must see.
Everything carries a leading task dimension T, so a meta-batch of tasks is one batched computation.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from hmlib.backbone.model import ConvBackbone
from hmlib.config import Config
from hmlib.hyper.encoders import ENCODERS
from hmlib.hyper.generators import GENERATORS, FilmGenerator, FullGenerator, Generator, Params, TaskInputs, TaskState
from hmlib.hyper.selector import Selector

CONTEXT_EPS = 1e-3


def build_generator(cfg: Config, num_classes: int, *, backbone: ConvBackbone | None = None,
                    feature_dim: int | None = None) -> Generator:
    """The configured generator (``hyper.generation``) with its own config section."""
    kind = GENERATORS[cfg.hyper.generation]
    if kind is FilmGenerator:
        if backbone is None:
            raise ValueError("the 'film' generator modulates a backbone: pass backbone=")
        return FilmGenerator(cfg.hyper, cfg.film, backbone, num_classes)
    if kind is FullGenerator:
        if feature_dim is None:
            raise ValueError("the 'full' generator needs the width of its input rows: pass feature_dim=")
        return FullGenerator(cfg.hyper, cfg.full, feature_dim, num_classes)
    return kind(cfg, num_classes, backbone=backbone, feature_dim=feature_dim)  # a registered extension


class HyperNet(nn.Module):
    """Set encoder over the task's conditioning rows + the generator of its network."""

    def __init__(self, cfg: Config, context_dim: int, num_classes: int, *, backbone: ConvBackbone | None = None,
                 feature_dim: int | None = None) -> None:
        super().__init__()
        self.cfg, self.full_cfg, self.context_dim, self.num_classes = cfg.hyper, cfg, context_dim, num_classes
        self.feature_dim = feature_dim
        self.encoder = ENCODERS[cfg.hyper.conditioning](context_dim, cfg.hyper)
        self.generator = build_generator(cfg, num_classes, backbone=backbone, feature_dim=feature_dim)
        # one score per configured candidate the generator supports (what adapt_candidates adapts); fitted after
        # meta-training (when not to adapt)
        self.selector = Selector(len([n for n in cfg.adapt.candidates if n in self.generator.candidates]) or 1)
        self.register_buffer("context_mean", torch.zeros(context_dim))
        self.register_buffer("context_std", torch.ones(context_dim))

    @torch.no_grad()
    def set_context_statistics(self, rows: Tensor) -> None:
        """Fix the normalisation of conditioning rows from a sample (n, C) of the meta-training data."""
        self.context_mean.copy_(rows.mean(0))
        self.context_std.copy_(rows.std(0) + CONTEXT_EPS)

    @property
    def device(self) -> torch.device:
        """The device this hypernetwork (and the backbone it modulates) is on: where its tasks are computed."""
        return self.context_mean.device

    def check(self, inputs: TaskInputs) -> TaskInputs:
        """``inputs`` as a batch on this hypernetwork's device (tasks are built on the CPU, copied without blocking),
        with a clear error if their widths are not this hypernetwork's."""
        inputs = inputs.as_batch().to(self.device)
        if inputs.context.shape[-1] != self.context_dim:
            raise ValueError(f"this hypernetwork reads context rows of width {self.context_dim}, got "
                             f"{inputs.context.shape[-1]}; use the VAE it was meta-trained with")
        if inputs.features is not None and self.feature_dim is not None and inputs.features.shape[-1] != self.feature_dim:
            raise ValueError(f"this hypernetwork reads features of width {self.feature_dim}, got "
                             f"{inputs.features.shape[-1]}")
        return inputs

    def encode(self, context: Tensor) -> Tensor:
        """Task codes (T, E) from context rows (T, M, C), at most ``num_context`` rows."""
        rows = context[:, : self.cfg.num_context]
        return self.encoder((rows - self.context_mean) / self.context_std)

    def prepare(self, inputs: TaskInputs, *, augmented: bool = False) -> TaskState:
        """The generator's per-task view of the inputs."""
        return self.generator.prepare(inputs, augmented=augmented)

    def forward(self, context: Tensor, state: TaskState, num_classes: int | None = None,
                fixed: Mapping[str, float] | None = None) -> Params:
        """Generated parameters of each task's network (``num_classes`` other than K where the generator allows;
        ``fixed``: generated tensors replaced by constants, for ablations)."""
        return self.generator(self.encode(context), state, num_classes or self.num_classes, fixed)

    def logits(self, params: Params, state: TaskState, *, augmented: bool = False) -> Tensor:
        """(T, N, K) logits of the generated networks."""
        return self.generator.logits(params, state, augmented=augmented)

    def extend(self, params: Params, state: TaskState, inputs: TaskInputs) -> Tensor:
        """(T, M, K) logits of inputs outside the task under the task's (adapted) network."""
        return self.generator.extend(params, state, inputs.to(self.device))

    def adaptable(self, params: Params) -> list[str]:
        """Names of the generated parameters the inner loop updates."""
        return self.generator.adaptable(params)

    def inner_lrs(self, names: list[str], default: float) -> dict[str, Tensor | float]:
        """The step size of each adaptable parameter (meta-learned where the generator learns them)."""
        return self.generator.inner_lrs(names, default)
