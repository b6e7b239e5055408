"""Clustering accuracy with Hungarian matching (intervals and paired differences: hmlib.stats)."""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: rows predicted cluster, columns true class."""
    pred = np.asarray(pred, dtype=np.int64)
    true = np.asarray(true, dtype=np.int64)
    return np.bincount(pred * num_classes + true, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def best_matching(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """Permutation ``perm`` (cluster -> class) maximising agreement (scipy's linear_sum_assignment)."""
    cm = confusion(pred, true, num_classes)
    rows, cols = linear_sum_assignment(cm, maximize=True)
    perm = np.empty(num_classes, dtype=np.int64)
    perm[rows] = cols
    return perm


def clustering_accuracy(pred: np.ndarray, true: np.ndarray, num_classes: int | None = None) -> float:
    """Share of items right after the best one-to-one matching of clusters to classes."""
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred and true differ in shape: {pred.shape} vs {true.shape}")
    if num_classes is None:
        num_classes = int(max(pred.max(), true.max())) + 1
    cm = confusion(pred, true, num_classes)
    rows, cols = linear_sum_assignment(cm, maximize=True)
    return float(cm[rows, cols].sum() / max(len(true), 1))


def batched_clustering_accuracy(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """Clustering accuracy of many tasks at once: pred and true (B, N) -> (B,); one bincount for all confusions."""
    pred = np.asarray(pred, dtype=np.int64)
    true = np.broadcast_to(np.asarray(true, dtype=np.int64), pred.shape)
    if pred.ndim != 2:
        raise ValueError(f"expected (tasks, images) arrays, got shape {pred.shape}")
    num_tasks, num_images = pred.shape
    offsets = np.arange(num_tasks)[:, None] * num_classes ** 2
    counts = np.bincount((offsets + pred * num_classes + true).ravel(), minlength=num_tasks * num_classes ** 2)
    cms = counts.reshape(num_tasks, num_classes, num_classes)  # rows predicted cluster, columns true class
    matched = np.array([cm[linear_sum_assignment(cm, maximize=True)].sum() for cm in cms], dtype=np.float64)
    return matched / max(num_images, 1)
