"""Clustering operations on batches of tasks: nearest neighbours, differentiable k-means, cluster scores.

Every function works on a leading task dimension T (rows (T, N, F)), so a meta-batch or an evaluation
suite is one batched computation. None of them sees a label.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nearest_neighbours(z: Tensor, k: int) -> Tensor:
    """Indices (T, N, k) of each row's k most cosine-similar other rows (z: (T, N, F), any scale)."""
    with torch.no_grad():
        unit = F.normalize(z, dim=-1)
        sim = unit @ unit.transpose(-1, -2)
        sim.diagonal(dim1=-2, dim2=-1).fill_(-float("inf"))
        return sim.topk(min(k, z.shape[-2] - 1), dim=-1).indices


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values[t, index[t, i, j]]``: (T, N, k, ...) rows of (T, N, ...) values picked by (T, N, k) indices."""
    T, N, k = index.shape
    flat = index.reshape(T, N * k)
    picked = torch.gather(values, 1, flat.view(T, N * k, *([1] * (values.dim() - 2))).expand(
        T, N * k, *values.shape[2:]))
    return picked.view(T, N, k, *values.shape[2:])


def _sq_dist(h: Tensor, centers: Tensor, rows: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Squared distances (..., M, K) between rows h (..., M, E) and centers (..., K, E) (one matrix product).
    ``rows``: ``(h * h).sum(-1, keepdim=True)`` and ``2 * h`` where computed once for many calls (same result)."""
    norms, doubled = ((h * h).sum(-1, keepdim=True), 2 * h) if rows is None else rows
    dist = norms - doubled @ centers.transpose(-1, -2) + (centers * centers).sum(-1).unsqueeze(-2)
    return dist.clamp_min(0.0)


def kmeans_prototypes(h: Tensor, num_clusters: int, iters: int = 10, inits: int = 10, seed: int = 0) -> Tensor:
    """K-means centroids of each task's rows, h (T, M, E) -> (T, K, E).

    Deterministic k-means++ seeding (``inits`` seedings from a fixed generator, the same for every task, so a
    batch of tasks gives the same result as one at a time), ``iters`` Lloyd iterations and the choice of the
    seeding with the lowest inertia run without gradients; the returned centroids are the means of the rows
    of each final cluster, so gradients flow through h (an empty cluster keeps its seed centre).
    """
    T, M, E = h.shape
    K, R = num_clusters, max(1, inits)
    with torch.no_grad():
        hd = h.detach().unsqueeze(1).expand(T, R, M, E).contiguous()  # once, not copied again by every product
        rows = (hd * hd).sum(-1, keepdim=True), 2 * hd  # what every distance reads of the rows, once
        u = torch.rand(R, K, generator=torch.Generator().manual_seed(seed)).to(h.device, h.dtype)
        first = (u[:, 0] * M).long().clamp(max=M - 1)  # (R,)
        centers = hd.gather(2, first.view(1, R, 1, 1).expand(T, R, 1, E))
        d2 = _sq_dist(hd, centers, rows).squeeze(-1)  # (T, R, M)
        for k in range(1, K):  # k-means++: inverse-CDF draw proportional to the squared distance
            cdf = d2.cumsum(-1)
            target = u[:, k].view(1, R, 1) * cdf[..., -1:]
            idx = torch.searchsorted(cdf.contiguous(), target.contiguous()).clamp(max=M - 1)  # (T, R, 1)
            new = hd.gather(2, idx.unsqueeze(-1).expand(T, R, 1, E))
            centers = torch.cat([centers, new], dim=2)
            d2 = torch.minimum(d2, _sq_dist(hd, new, rows).squeeze(-1))
        for _ in range(iters):
            onehot = F.one_hot(_sq_dist(hd, centers, rows).argmin(-1), K).to(h.dtype)  # (T, R, M, K)
            counts = onehot.sum(2).unsqueeze(-1)  # (T, R, K, 1)
            centers = torch.where(counts > 0, onehot.transpose(-1, -2) @ hd / counts.clamp_min(1), centers)
        dist = _sq_dist(hd, centers, rows)
        best = dist.min(-1).values.sum(-1).argmin(-1)  # (T,): the seeding with the lowest inertia
        arange = torch.arange(T, device=h.device)
        onehot = F.one_hot(dist.argmin(-1)[arange, best], K).to(h.dtype)  # (T, M, K)
        fallback = centers[arange, best]  # (T, K, E)
        counts = onehot.sum(1).unsqueeze(-1)  # (T, K, 1)
    return torch.where(counts > 0, onehot.transpose(-1, -2) @ h / counts.clamp_min(1), fallback)


def cosine_logits(z: Tensor, prototypes: Tensor, log_tau: Tensor) -> Tensor:
    """exp(log_tau) x cosine similarity of rows z (T, N, E) to prototypes (T, K, E): logits (T, N, K)."""
    return log_tau.exp().view(-1, 1, 1) * (F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(-1, -2))


def class_centroid_logits(z: Tensor, labels: Tensor, num_classes: int, log_tau: Tensor) -> Tensor:
    """Logits (T, N, K) of rows against the centroids of their tasks' true classes (the outer loss's view)."""
    onehot = F.one_hot(labels, num_classes).to(z.dtype)  # (T, N, K)
    centroids = onehot.transpose(-1, -2) @ z / onehot.sum(1).unsqueeze(-1).clamp_min(1)
    return cosine_logits(z, centroids, log_tau)
