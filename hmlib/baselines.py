"""Baselines on the evaluation suite's identical tasks: clusterers on VAE means or pixels, and a supervised ceiling.

Each baseline takes the full split's features plus a :class:`~hmlib.data.TaskBatch` and returns a
:class:`MethodScores` with one accuracy and one wall-clock time per task. Clusterers are scored with
Hungarian matching (``hmlib.metrics``); the logistic-regression ceiling sees labels (of *other*
images of the task's classes, from the train split) and is scored by plain accuracy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from hmlib.metrics import clustering_accuracy

if TYPE_CHECKING:
    from hmlib.data import TaskBatch

# Human-readable names used in tables and figures.
BASELINE_LABELS = {
    "kmeans_latent": "k-means on VAE means",
    "gmm_latent": "Gaussian mixture on VAE means",
    "kmeans_pixels": "k-means on raw pixels",
    "logreg_ceiling": "logistic regression on VAE means (supervised ceiling)",
}


@dataclass
class MethodScores:
    """Per-task accuracy and wall-clock seconds of one method on one suite."""

    acc: np.ndarray  # (T,) float64 in [0, 1]
    seconds: np.ndarray  # (T,) float64


def kmeans_clusters(x: np.ndarray, num_classes: int, *, n_init: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster ids (N,) from scikit-learn's k-means (Lloyd, k-means++ init, ``n_init`` restarts)."""
    model = KMeans(n_clusters=num_classes, n_init=n_init, random_state=seed)
    return model.fit_predict(np.asarray(x, dtype=np.float64))


GMM_COVARIANCES = ("full", "diag", "spherical", "tied", "bic")


def gmm_clusters(x: np.ndarray, num_classes: int, *, seed: int = 0, covariance_type: str = "full",
                 reg_covar: float = 1e-3) -> np.ndarray:
    """Cluster ids (N,) from a Gaussian mixture (k-means initialised, regularised covariances).

    ``covariance_type="bic"`` fits full, diagonal and spherical mixtures and keeps the one with the
    lowest BIC (a label-free choice per task).
    """
    if covariance_type not in GMM_COVARIANCES:
        raise ValueError(f"covariance_type must be one of {GMM_COVARIANCES}, got {covariance_type!r}")
    x = np.asarray(x, dtype=np.float64)
    candidates = ("full", "diag", "spherical") if covariance_type == "bic" else (covariance_type,)
    best, best_bic = None, np.inf
    for kind in candidates:
        model = GaussianMixture(n_components=num_classes, covariance_type=kind, reg_covar=reg_covar,
                                random_state=seed).fit(x)
        bic = model.bic(x) if len(candidates) > 1 else 0.0
        if bic < best_bic:
            best, best_bic = model, bic
    return best.predict(x)


def logreg_predict(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Labels (N,) predicted by standardised multinomial logistic regression fitted on (train_x, train_y)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    model.fit(np.asarray(train_x, dtype=np.float64), train_y)
    return model.predict(np.asarray(x, dtype=np.float64))


def _check_suite(features: np.ndarray, indices: np.ndarray, what: str) -> None:
    if features.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (n, features), got shape {features.shape}")
    if indices.size and (indices.min() < 0 or indices.max() >= len(features)):
        raise ValueError(f"{what}: task indices reach {indices.max()} but the split has {len(features)} rows; "
                         "the suite was built for another split or dataset")


def _score_clusterer(features: np.ndarray, suite: TaskBatch, cluster: Callable[[np.ndarray, int, int], np.ndarray],
                     *, seed: int, desc: str, progress: bool) -> MethodScores:
    """Run ``cluster(x, K, seed)`` on every task of ``suite``; Hungarian-matched accuracy and time per task."""
    features = np.asarray(features)
    indices = np.asarray(suite.indices)
    _check_suite(features, indices, desc)
    num_tasks, num_classes = indices.shape[0], np.asarray(suite.classes).shape[1]
    acc = np.empty(num_tasks)
    seconds = np.empty(num_tasks)
    for t in tqdm(range(num_tasks), desc=desc, disable=not progress, leave=False):
        x = features[indices[t]]
        start = time.perf_counter()
        pred = cluster(x, num_classes, seed + t)
        seconds[t] = time.perf_counter() - start
        acc[t] = clustering_accuracy(pred, suite.labels[t], num_classes)
    return MethodScores(acc, seconds)


def kmeans_latent(mu: np.ndarray, suite: TaskBatch, *, n_init: int = 10, seed: int = 0,
                  progress: bool = True) -> MethodScores:
    """k-means on each task's VAE means."""
    return _score_clusterer(mu, suite, lambda x, k, s: kmeans_clusters(x, k, n_init=n_init, seed=s),
                            seed=seed, desc="k-means (VAE means)", progress=progress)


def gmm_latent(mu: np.ndarray, suite: TaskBatch, *, covariance_type: str = "full", seed: int = 0,
               progress: bool = True) -> MethodScores:
    """Gaussian mixture on each task's VAE means."""
    return _score_clusterer(mu, suite, lambda x, k, s: gmm_clusters(x, k, seed=s, covariance_type=covariance_type),
                            seed=seed, desc="GMM (VAE means)", progress=progress)


def kmeans_pixels(pixels: np.ndarray, suite: TaskBatch, *, n_init: int = 10, seed: int = 0,
                  progress: bool = True) -> MethodScores:
    """k-means on each task's raw pixels (flattened, in [0, 1])."""
    pixels = np.asarray(pixels)
    pixels = pixels.reshape(len(pixels), -1)
    return _score_clusterer(pixels, suite, lambda x, k, s: kmeans_clusters(x, k, n_init=n_init, seed=s),
                            seed=seed, desc="k-means (pixels)", progress=progress)


def logreg_ceiling(train_mu: np.ndarray, train_labels: np.ndarray, mu: np.ndarray, suite: TaskBatch, *,
                   train_per_class: int = 500, seed: int = 0, progress: bool = True) -> MethodScores:
    """Supervised ceiling: logistic regression on VAE means of other labeled images of the task's classes.

    For task t it draws up to ``train_per_class`` images of each of the task's classes from the
    *train* split (seeded by ``seed + t``), fits, and scores plain accuracy on the task's images.
    """
    train_mu = np.asarray(train_mu)
    train_labels = np.asarray(train_labels)
    mu = np.asarray(mu)
    indices = np.asarray(suite.indices)
    classes = np.asarray(suite.classes)
    _check_suite(mu, indices, "logistic regression ceiling")
    if train_mu.ndim != 2 or train_mu.shape[1] != mu.shape[1] or len(train_mu) != len(train_labels):
        raise ValueError(f"train features {train_mu.shape} / labels {train_labels.shape} do not match "
                         f"test features {mu.shape}")
    # Rows of each class in the train split, computed once (no per-image Python loop).
    order = np.argsort(train_labels, kind="stable")
    bounds = np.searchsorted(train_labels[order], np.arange(int(train_labels.max()) + 2))
    num_tasks, num_classes = classes.shape
    acc = np.empty(num_tasks)
    seconds = np.empty(num_tasks)
    for t in tqdm(range(num_tasks), desc="logreg ceiling", disable=not progress, leave=False):
        rng = np.random.default_rng(seed + t)
        rows, ys = [], []
        for j, c in enumerate(classes[t]):
            members = order[bounds[c]:bounds[c + 1]] if c + 1 < len(bounds) else order[:0]
            if len(members) == 0:
                raise ValueError(f"class {c} has no images in the train split; the supervised ceiling needs some")
            take = rng.choice(members, size=min(train_per_class, len(members)), replace=False)
            rows.append(take)
            ys.append(np.full(len(take), j))
        rows, ys = np.concatenate(rows), np.concatenate(ys)
        start = time.perf_counter()
        pred = logreg_predict(train_mu[rows], ys, mu[indices[t]], seed=seed + t)
        seconds[t] = time.perf_counter() - start
        acc[t] = float(np.mean(pred == suite.labels[t]))
    return MethodScores(acc, seconds)
