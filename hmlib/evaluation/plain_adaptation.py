"""Test-time adaptation without meta-learning: the baseline a meta-learned adaptation has to beat.

For each task (batched over tasks): the backbone's normalisation layers take either the task's own statistics
(``blend = 1``, TENT / AdaBN per task) or the stored running statistics (``blend = 0``); then ``eval.plain_steps``
Adam steps (``eval.plain_lr``) on the scale and shift of *every* normalisation layer minimise the neighbour-
agreement loss (SCAN-style: soft assignments to k-means prototypes of the current embedding, refreshed every 5
steps, should agree with those of each image's nearest neighbours in the starting embedding, plus the balance
term); then k-means on the adapted embedding. Run in both modes, the label-free choice keeps, per task, the
mode whose k-means clusters have the higher silhouette on its adapted embedding (METHOD.md: it picked the
better mode on shrunk and on noisy digits, where the wrong mode costs 13-20 points).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import silhouette_score

from hmlib.backbone import modulation as mod
from hmlib.backbone.model import ConvBackbone
from hmlib.features import standardize
from hmlib.hyper.cluster_ops import cosine_logits, kmeans_prototypes, nearest_neighbours
from hmlib.hyper.losses import neighbour_loss

REFRESH_EVERY = 5  # steps between k-means refreshes of the prototypes
TEMPERATURE = 10.0
NEIGHBOURS = 5
CHUNK = 16  # tasks per batched computation (memory)


@dataclass
class PlainAdaptation:
    """Adapted embeddings of a batch of tasks in one normalisation mode: (T, N, D), standardised + L2 per task."""

    embeddings: np.ndarray
    blend: float


def task_embedding(z: torch.Tensor) -> torch.Tensor:
    """Standardise each task's embedding over its images, then L2 per image (how every method reads them)."""
    return F.normalize(standardize(z)[0], dim=-1)


def adapt_tasks(backbone: ConvBackbone, images: torch.Tensor, num_classes: int, *, blend: float, steps: int,
                lr: float, chunk: int = CHUNK) -> PlainAdaptation:
    """Plain adaptation of task images (T, N, 28, 28) uint8 in one mode, on the backbone's device; every task adapts
    its own copy."""
    backbone.eval()
    device = next(backbone.parameters()).device
    weights = [p.requires_grad for p in backbone.parameters()]
    backbone.requires_grad_(False)
    out = []
    try:
        for start in range(0, images.shape[0], chunk):
            x = images[start:start + chunk].to(device).unsqueeze(-3).float().div(255.0)
            out.append(_adapt_chunk(backbone, x, num_classes, blend, steps, lr))
    finally:
        for p, flag in zip(backbone.parameters(), weights):
            p.requires_grad_(flag)
    return PlainAdaptation(torch.cat(out).cpu().numpy(), blend)


def _adapt_chunk(backbone: ConvBackbone, x: torch.Tensor, K: int, blend: float, steps: int, lr: float
                 ) -> torch.Tensor:
    T = x.shape[0]
    modulation = mod.identity(backbone, T, blend)
    pre = mod.trunk(backbone, x, modulation, 0)  # the first convolution does not change: once
    moments = mod.pre_moments(pre, T)  # nor its task statistics
    tensors = modulation.scale + modulation.shift
    for t in tensors:
        t.requires_grad_(True)
    optimizer = torch.optim.Adam(tensors, lr=lr)
    with torch.no_grad():
        reference = task_embedding(mod.top(backbone, pre, modulation, 0, T, moments))
    z = reference
    index = nearest_neighbours(reference, NEIGHBOURS)  # the reference does not change over the steps: mined once
    log_tau = torch.full((T, 1), float(np.log(TEMPERATURE)), device=x.device)
    for step in range(steps):
        with torch.enable_grad():
            z = task_embedding(mod.top(backbone, pre, modulation, 0, T, moments))
            if step % REFRESH_EVERY == 0:
                prototypes = kmeans_prototypes(z.detach(), K, iters=10, inits=5)
            loss = neighbour_loss(cosine_logits(z, prototypes, log_tau), reference, NEIGHBOURS, index=index).sum()
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
    with torch.no_grad():
        return task_embedding(mod.top(backbone, pre, modulation, 0, T, moments))


def silhouettes(embeddings: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Silhouette (T,) of each task's clusters on its embedding (-1 where only one cluster is used)."""
    return np.array([silhouette_score(z, c) if len(np.unique(c)) > 1 else -1.0 for z, c in zip(embeddings, clusters)])


def choose_by_silhouette(scores: np.ndarray, silhouette: np.ndarray) -> np.ndarray:
    """Per task, the score of the mode (rows of ``scores``/``silhouette``, (modes, T)) with the higher silhouette."""
    return np.take_along_axis(np.asarray(scores), np.argmax(silhouette, axis=0)[None], axis=0)[0]
