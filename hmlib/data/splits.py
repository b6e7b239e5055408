"""Deterministic stratified splits and subsamples (vectorised: one sort, no loop over images)."""
from __future__ import annotations

import numpy as np


def _ranks_within_class(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random rank of each image inside its class, plus the class ids and their counts."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keys = rng.random(labels.shape[0])
    order = np.lexsort((keys, labels))  # by class, random inside a class
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ranks = np.empty(labels.shape[0], dtype=np.int64)
    ranks[order] = np.arange(labels.shape[0]) - np.repeat(starts, counts)
    return ranks, inverse, counts


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(keep_idx, held_idx)``, holding out ``fraction`` of every class (sorted, seeded).

    Each class with at least two images keeps at least one and holds out at least one.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    ranks, inverse, counts = _ranks_within_class(labels, seed)
    held_per_class = np.floor(counts * fraction + 0.5).astype(np.int64)
    held_per_class = np.where(counts >= 2, np.clip(held_per_class, 1, counts - 1), 0)
    held = ranks < held_per_class[inverse]
    return np.flatnonzero(~held), np.flatnonzero(held)


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample of ``size`` images keeping the class proportions."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    if size >= n:
        return np.arange(n)
    if size <= 0:
        raise ValueError(f"subsample size must be positive, got {size}")
    ranks, inverse, counts = _ranks_within_class(labels, seed)
    exact = counts * size / n
    quota = np.floor(exact).astype(np.int64)
    remainder = size - quota.sum()
    # Largest remainders get the leftover images (ties: the smaller class id first).
    extra = np.argsort(-(exact - quota), kind="stable")[:remainder]
    quota[extra] += 1
    return np.flatnonzero(ranks < quota[inverse])
