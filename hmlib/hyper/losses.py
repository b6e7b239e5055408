"""The unsupervised inner losses and the label-aligned outer losses.

``INNER_LOSSES`` is the one registry of inner losses: config validation, the adaptation loop, the
ablations and the interactive explorer all read it. An inner loss maps an :class:`InnerView` (the task's
logits (T, N, K), the reference features (T, N, F) it started from and, for losses that ask for them,
the logits of augmented copies of the same images) and the AdaptConfig to one value per task (T,);
adding one is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from hmlib.config import AdaptConfig
from hmlib.hyper.cluster_ops import gather_rows, nearest_neighbours
from hmlib.metrics import batched_clustering_accuracy

EPS = 1e-8


@dataclass
class InnerView:
    """What an inner loss sees of a batch of tasks (never a label)."""

    logits: Tensor  # (T, N, K) under the current (adapted) parameters
    reference: Tensor  # (T, N, F) the task's features before any inner step (neighbours are mined there)
    augmented: Tensor | None = None  # (T, N, K) logits of augmented copies of the same images, if asked for
    # (T, N, k) each image's nearest neighbours in ``reference``, mined once per batch of tasks (the reference does
    # not change over the inner steps); None: the loss mines them itself
    neighbour_index: Tensor | None = None


def entropy_loss(logits: Tensor) -> Tensor:
    """TENT: mean per-image prediction entropy, per task (...,)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def marginal_entropy(logits: Tensor) -> Tensor:
    """Entropy of the task's mean prediction, per task (high: every cluster in use)."""
    mean_probs = torch.softmax(logits, dim=-1).mean(dim=-2)
    return -(mean_probs * torch.log(mean_probs + EPS)).sum(-1)


def infomax_loss(logits: Tensor, balance_weight: float = 1.0) -> Tensor:
    """SHOT/IIC: mean per-image entropy minus balance_weight * entropy of the mean prediction, per task."""
    return entropy_loss(logits) - balance_weight * marginal_entropy(logits)


def agreement_loss(probs: Tensor, partner_probs: Tensor) -> Tensor:
    """-log <p_i, q_i> averaged over the task's images (and partners): probs (T, N, K), partners (T, N, [k,] K)."""
    if partner_probs.dim() == probs.dim() + 1:
        probs = probs.unsqueeze(-2)
    return -torch.log((probs * partner_probs).sum(-1) + EPS).flatten(1).mean(-1)


def neighbour_loss(logits: Tensor, reference: Tensor, neighbours: int = 5, balance_weight: float = 1.0,
                   index: Tensor | None = None) -> Tensor:
    """SCAN: each image's soft assignment should agree with those of its nearest neighbours in the reference
    features, minus balance_weight * the entropy of the mean assignment (every cluster in use), per task.
    ``index``: those neighbours, ``nearest_neighbours(reference, neighbours)``, where the caller mined them once."""
    probs = torch.softmax(logits, dim=-1)
    index = nearest_neighbours(reference, neighbours) if index is None else index
    partners = gather_rows(probs, index)  # (T, N, k, K)
    return agreement_loss(probs, partners) - balance_weight * marginal_entropy(logits)


def augmentation_loss(logits: Tensor, augmented: Tensor, balance_weight: float = 1.0) -> Tensor:
    """IIC / MT3-style consistency: an image and its augmented copy should get the same soft assignment, minus
    balance_weight * the entropy of the mean assignment, per task."""
    if augmented is None:
        raise ValueError("the augmentation loss needs the logits of augmented copies (the generator did not make them)")
    return (agreement_loss(torch.softmax(logits, -1), torch.softmax(augmented, -1))
            - balance_weight * marginal_entropy(logits))


def geometry_loss(logits: Tensor, reference: Tensor, weight: float = 3.0) -> Tensor:
    """Prototype: MSE between pairwise cosine-distance matrices of outputs and reference features, per task."""
    out, ref = F.normalize(logits, dim=-1), F.normalize(reference, dim=-1)
    dist_out = 1.0 - out @ out.transpose(-1, -2)
    dist_ref = 1.0 - ref @ ref.transpose(-1, -2)
    return weight * ((dist_out - dist_ref) ** 2).mean(dim=(-1, -2))


@dataclass(frozen=True)
class InnerLoss:
    """A registered inner loss: the function (InnerView, AdaptConfig) -> (T,), a label, whether it reads the
    logits of augmented copies of the task's images (the generator then makes them, once per task), and whether it
    reads the reference's nearest neighbours (the inner loop then mines them once, not at every step)."""

    fn: Callable[[InnerView, AdaptConfig], Tensor]
    label: str
    augmented: bool = False
    neighbours: bool = False


INNER_LOSSES: dict[str, InnerLoss] = {
    "neighbours": InnerLoss(lambda view, cfg: neighbour_loss(view.logits, view.reference, cfg.neighbours,
                                                             cfg.balance_weight, view.neighbour_index),
                            "neighbour agreement (SCAN)", neighbours=True),
    "augmentation": InnerLoss(lambda view, cfg: augmentation_loss(view.logits, view.augmented, cfg.balance_weight),
                              "augmentation consistency (IIC / MT3)", augmented=True),
    "infomax": InnerLoss(lambda view, cfg: infomax_loss(view.logits, cfg.balance_weight),
                         "information maximisation (SHOT)"),
    "entropy": InnerLoss(lambda view, cfg: entropy_loss(view.logits), "entropy minimisation (TENT)"),
    "geometry": InnerLoss(lambda view, cfg: geometry_loss(view.logits, view.reference, cfg.geometry_weight),
                          "geometry consistency (the prototype's)"),
}


def inner_loss(view: InnerView, cfg: AdaptConfig) -> Tensor:
    """The configured unsupervised loss per task (T,)."""
    return INNER_LOSSES[cfg.inner_loss].fn(view, cfg)


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
