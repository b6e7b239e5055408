"""The unsupervised inner losses and the label-aligned outer loss.

``INNER_LOSSES`` is the one registry of inner losses: config validation, the adaptation loop, the
ablations and the interactive explorer all read it. An inner loss maps (logits (..., N, K), reference
features (..., N, F), AdaptConfig) to one value per task (...,); adding one is one entry here.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from hmlib.config import AdaptConfig
from hmlib.metrics import batched_clustering_accuracy

EPS = 1e-8


def entropy_loss(logits: Tensor) -> Tensor:
    """TENT: mean per-image prediction entropy, per task (...,)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def infomax_loss(logits: Tensor, balance_weight: float = 1.0) -> Tensor:
    """SHOT/IIC: mean per-image entropy minus balance_weight * entropy of the mean prediction, per task."""
    mean_probs = torch.softmax(logits, dim=-1).mean(dim=-2)
    marginal_entropy = -(mean_probs * torch.log(mean_probs + EPS)).sum(-1)
    return entropy_loss(logits) - balance_weight * marginal_entropy


def geometry_loss(logits: Tensor, reference: Tensor, weight: float = 3.0) -> Tensor:
    """Prototype: MSE between pairwise cosine-distance matrices of outputs and reference features, per task."""
    out, ref = F.normalize(logits, dim=-1), F.normalize(reference, dim=-1)
    dist_out = 1.0 - out @ out.transpose(-1, -2)
    dist_ref = 1.0 - ref @ ref.transpose(-1, -2)
    return weight * ((dist_out - dist_ref) ** 2).mean(dim=(-1, -2))


InnerLoss = Callable[[Tensor, Tensor, AdaptConfig], Tensor]

INNER_LOSSES: dict[str, InnerLoss] = {
    "infomax": lambda logits, reference, cfg: infomax_loss(logits, cfg.balance_weight),
    "entropy": lambda logits, reference, cfg: entropy_loss(logits),
    "geometry": lambda logits, reference, cfg: geometry_loss(logits, reference, cfg.geometry_weight),
}


def inner_loss(logits: Tensor, reference: Tensor, cfg: AdaptConfig) -> Tensor:
    """The configured unsupervised loss per task (...,); ``reference`` = the task's normalised features."""
    return INNER_LOSSES[cfg.inner_loss](logits, reference, cfg)


# ------------------------------------------------------------------------ Hungarian-aligned outer loss

def _batched(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    return logits, labels.long()


def best_alignment(logits: Tensor, labels: Tensor) -> Tensor:
    """Permutation (T, K) mapping each class c to its output unit, maximising the labels' likelihood."""
    logits, labels = _batched(logits, labels)
    logp = F.log_softmax(logits.detach(), dim=-1)  # (T, N, K)
    onehot = F.one_hot(labels, logits.shape[-1]).to(logp.dtype)
    scores = (logp.transpose(-1, -2) @ onehot).cpu().numpy()  # (T, unit, class): summed log-probabilities
    scores = np.nan_to_num(scores, nan=-1e30, neginf=-1e30, posinf=1e30)  # non-finite logits: any order
    perms = np.empty(scores.shape[:2], dtype=np.int64)
    for t, score in enumerate(scores):  # K x K assignment per task
        units, classes = linear_sum_assignment(score, maximize=True)
        perms[t, classes] = units
    return torch.from_numpy(perms).to(logits.device)


def aligned_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy after the best one-to-one alignment of output units to the task's classes."""
    logits, labels = _batched(logits, labels)
    target_units = best_alignment(logits, labels).gather(1, labels)  # (T, N): the unit each image should fire
    return F.cross_entropy(logits.flatten(0, 1), target_units.flatten())


def task_accuracy(logits: Tensor, labels: Tensor | np.ndarray) -> np.ndarray:
    """Clustering accuracy (Hungarian matching of argmax clusters) per task, shape (T,)."""
    logits, labels = _batched(logits, torch.as_tensor(labels))
    return batched_clustering_accuracy(logits.argmax(-1).cpu().numpy(), labels.cpu().numpy(), logits.shape[-1])
