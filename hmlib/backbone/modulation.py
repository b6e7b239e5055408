"""The backbone under a per-task modulation of its normalisation layers, batched over tasks.

A :class:`Modulation` changes, for every task and every BatchNorm layer of a :class:`ConvBackbone`, which
statistics normalise the layer (``blend``: 0 = the stored running statistics, 1 = the task's own, in between a
TaskNorm-style mixture of the two) and the layer's affine transform (FiLM: the stored scale times ``1 + scale``,
the stored shift plus ``shift``). The identity modulation with ``blend = 0`` reproduces the backbone in eval
mode; with ``blend = 1`` it is per-task BatchNorm statistics (AdaBN per task).

The forward is split at a block (:func:`trunk` then :func:`top`) so that an inner loop that only changes the
modulation of the blocks from ``split`` on re-runs only those blocks: the activations below are computed once.
Images are (T, N, 1, 28, 28) floats in [0, 1]; embeddings are (T, N, D).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from hmlib.backbone.model import ConvBackbone, blocks


@dataclass
class Modulation:
    """Per-task changes to every normalisation layer: lists over layers of (T, C) scale and shift, (T,) blend."""

    scale: list[Tensor]
    shift: list[Tensor]
    blend: list[Tensor]

    @property
    def num_tasks(self) -> int:
        return int(self.blend[0].shape[0])

    def tensors(self) -> dict[str, Tensor]:
        """Flat ``{'scale.0': ..., 'shift.0': ..., 'blend.0': ...}``."""
        return {f"{kind}.{l}": t for kind in ("scale", "shift", "blend") for l, t in enumerate(getattr(self, kind))}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], num_layers: int) -> "Modulation":
        """Inverse of :meth:`tensors`."""
        return cls(*([tensors[f"{kind}.{l}"] for l in range(num_layers)] for kind in ("scale", "shift", "blend")))

    def with_blend(self, value: float) -> "Modulation":
        """The same modulation with every layer's blend set to ``value`` (0: stored statistics, 1: the task's)."""
        return replace(self, blend=[torch.full_like(b, float(value)) for b in self.blend])

    def detached(self) -> "Modulation":
        return Modulation(*([t.detach() for t in getattr(self, k)] for k in ("scale", "shift", "blend")))


def identity(backbone: ConvBackbone, num_tasks: int, blend: float = 0.0) -> Modulation:
    """No FiLM change; every layer normalised with ``blend`` (0: stored statistics, 1: each task's own); on the
    backbone's device."""
    widths = [bn.num_features for _, bn in blocks(backbone)]
    device = blocks(backbone)[0][1].weight.device
    return Modulation([torch.zeros(num_tasks, c, device=device) for c in widths],
                      [torch.zeros(num_tasks, c, device=device) for c in widths],
                      [torch.full((num_tasks,), float(blend), device=device) for _ in widths])


Moments = tuple[Tensor, Tensor]


def task_moments(grouped: Tensor) -> Moments:
    """Each task's per-channel mean and variance (T, C) of activations (T, N, C, H, W), in one pass (about as fast
    as BatchNorm's kernel)."""
    flat = grouped.flatten(3)  # (T, N, C, H*W)
    mean = flat.mean(dim=(1, 3))
    return mean, ((flat * flat).mean(dim=(1, 3)) - mean * mean).clamp_min(0.0)


def affine(grouped: Tensor, bn: torch.nn.BatchNorm2d, blend: Tensor, scale: Tensor, shift: Tensor,
           moments: Moments | None = None) -> tuple[Tensor, Tensor]:
    """Per-task gain and bias (T, C) that normalise activations (T, N, C, H, W) with blended statistics and FiLM.

    ``moments``: the task's moments of ``grouped`` where they were computed before (:func:`task_moments`; an input
    that does not change over an inner loop). On the CPU, where every blend is a constant 0 (the stored statistics)
    the task's moments are not read, and not computed: the result is the same to the last bit (elsewhere the check
    would wait for the device, so the mixture weighted 0 is computed).
    """
    C = grouped.shape[2]
    run_mean, run_var = bn.running_mean.view(1, C), bn.running_var.view(1, C)
    if blend.device.type == "cpu" and not blend.requires_grad and not bool(blend.any()):
        mean, var = run_mean, run_var
    else:
        task_mean, task_var = task_moments(grouped) if moments is None else moments
        w = blend.view(-1, 1)
        mean = w * task_mean + (1 - w) * run_mean
        var = w * task_var + (1 - w) * run_var + w * (1 - w) * (task_mean - run_mean) ** 2  # TaskNorm's mixture
    gain = bn.weight.view(1, C) * (1 + scale) / torch.sqrt(var + bn.eps)
    return gain, bn.bias.view(1, C) + shift - mean * gain


def _apply(grouped: Tensor, gain: Tensor, bias: Tensor) -> Tensor:
    """ReLU(gain * x + bias) per task and channel, (T, N, C, H, W) -> (T*N, C, H, W)."""
    out = torch.addcmul(bias[:, None, :, None], grouped.flatten(3), gain[:, None, :, None])
    return torch.relu(out).view_as(grouped).flatten(0, 1)


def normalise(h: Tensor, bn: torch.nn.BatchNorm2d, blend: Tensor, scale: Tensor, shift: Tensor, num_tasks: int,
              moments: Moments | None = None) -> Tensor:
    """BatchNorm + ReLU of activations (T*N, C, H, W) with blended statistics and FiLM, per task (``moments``: see
    :func:`affine`)."""
    grouped = h.view(num_tasks, -1, *h.shape[1:])
    return _apply(grouped, *affine(grouped, bn, blend, scale, shift, moments))


def pre_moments(pre: Tensor, num_tasks: int) -> Moments:
    """The task moments of :func:`trunk`'s output, for :func:`top`'s ``moments`` when ``pre`` stays fixed over an
    inner loop (computed once instead of at every step)."""
    return task_moments(pre.view(num_tasks, -1, *pre.shape[1:]))


def first_conv(backbone: ConvBackbone, images: Tensor) -> Tensor:
    """The first block's convolution of task images (T, N, 1, 28, 28): (T*N, C, H, W). No modulation acts before
    it, so every modulation of the same images shares it (:func:`trunk`'s ``first``)."""
    return blocks(backbone)[0][0](images.flatten(0, 1))


def trunk(backbone: ConvBackbone, images: Tensor, modulation: Modulation, split: int, first: Tensor | None = None
          ) -> Tensor:
    """Activations (T*N, C, H, W) entering the normalisation of block ``split`` (its convolution applied);
    ``first``: :func:`first_conv` of the same images where computed before."""
    num_tasks = images.shape[0]
    for l, (conv, bn) in enumerate(blocks(backbone)):
        h = (first_conv(backbone, images) if first is None else first) if l == 0 else conv(h)
        if l == split:
            return h
        h = normalise(h, bn, modulation.blend[l], modulation.scale[l], modulation.shift[l], num_tasks)
    raise ValueError(f"split = {split} but the backbone has {l + 1} blocks")


def top(backbone: ConvBackbone, pre: Tensor, modulation: Modulation, split: int, num_tasks: int,
        moments: Moments | None = None) -> Tensor:
    """Embeddings (T, N, D) from the activations that :func:`trunk` returned for the same ``split`` (``moments``:
    their task moments, :func:`pre_moments`, where computed once)."""
    h = pre
    for l, (conv, bn) in enumerate(blocks(backbone)):
        if l < split:
            continue
        if l > split:
            h = conv(h)
        h = normalise(h, bn, modulation.blend[l], modulation.scale[l], modulation.shift[l], num_tasks,
                      moments if l == split else None)
    return backbone.embedding(h.flatten(1)).view(num_tasks, -1, backbone.embed_dim)


def embed(backbone: ConvBackbone, images: Tensor, modulation: Modulation) -> Tensor:
    """Embeddings (T, N, D) of task images (T, N, 1, 28, 28) under a modulation."""
    return top(backbone, trunk(backbone, images, modulation, 0), modulation, 0, images.shape[0])


def embed_beside(backbone: ConvBackbone, task_images: Tensor, other_images: Tensor, modulation: Modulation
                 ) -> Tensor:
    """Embeddings (T, M, D) of other images (T, M, 1, 28, 28) normalised with the statistics of each task's own
    images (T, N, 1, 28, 28): how a task's adapted network reads images outside the task."""
    T, N = task_images.shape[:2]
    h = torch.cat([task_images, other_images], dim=1).flatten(0, 1)
    for l, (conv, bn) in enumerate(blocks(backbone)):
        out = conv(h)
        grouped = out.view(T, -1, *out.shape[1:])
        gain, bias = affine(grouped[:, :N], bn, modulation.blend[l], modulation.scale[l], modulation.shift[l])
        h = _apply(grouped, gain, bias)
    return backbone.embedding(h.flatten(1)).view(T, -1, backbone.embed_dim)[:, N:]
