"""The registry of methods scored on the evaluation suite: the hypernetwork's two rows and every baseline.

A :class:`Method` names what it reads (``embedding``, ``latent`` or ``pixels``), how it clusters a task's
rows, its label and its colour; tables, figures, the ablations and the report index read them from here.
Adding a baseline is one :func:`register` call (see tests/test_evaluation.py). Unsupervised clusterers are
scored by Hungarian-matched clustering accuracy; the supervised ceiling sees labels of *other* images of the
task's classes (from the train split) and is scored by plain accuracy.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hmlib.features import normalize_task_np

Clusterer = Callable[[np.ndarray, int, int, int], np.ndarray]  # (rows, K, seed, kmeans_n_init) -> cluster ids


@dataclass(frozen=True)
class Method:
    """One row of the evaluation table."""

    name: str
    label: str
    color: str
    reads: str | None = None  # "embedding", "latent", "pixels" (None: the hypernetwork's own rows)
    cluster: Clusterer | None = None
    normalize: bool = False  # standardise each task's rows over the task, then L2 per image
    supervised: bool = False  # the ceiling: sees labels of other images of the task's classes
    baseline: bool = True
    every_seed: bool = False  # scored under every replicate's representation (else the first replicate's only)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (replacing one of the same name)."""
    METHODS[method.name] = method
    return method


def baselines(*, unsupervised_only: bool = False) -> list[Method]:
    """Registered baselines in registration order."""
    return [m for m in METHODS.values() if m.baseline and not (unsupervised_only and m.supervised)]


def kmeans_clusters(x: np.ndarray, num_classes: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster ids (N,) from scikit-learn's k-means (Lloyd, k-means++ init, ``n_init`` restarts)."""
    return KMeans(n_clusters=num_classes, n_init=n_init, random_state=seed).fit_predict(np.asarray(x, np.float64))


def gmm_clusters(x: np.ndarray, num_classes: int, seed: int = 0, covariance: str = "full") -> np.ndarray:
    """Cluster ids (N,) from a Gaussian mixture (k-means initialised, regularised covariances)."""
    x = np.asarray(x, dtype=np.float64)
    return GaussianMixture(n_components=num_classes, covariance_type=covariance, reg_covar=1e-3,
                           random_state=seed).fit(x).predict(x)


def spectral_clusters(x: np.ndarray, num_classes: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster ids (N,) from spectral clustering on the task's 10-nearest-neighbour graph."""
    model = SpectralClustering(n_clusters=num_classes, affinity="nearest_neighbors", n_neighbors=10,
                               assign_labels="kmeans", n_init=n_init, random_state=seed)
    return model.fit_predict(np.asarray(x, dtype=np.float64))


def logreg_predict(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Labels (N,) predicted by standardised multinomial logistic regression fitted on (train_x, train_y)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    model.fit(np.asarray(train_x, dtype=np.float64), train_y)
    return model.predict(np.asarray(x, dtype=np.float64))


def run_clusterer(method: Method, rows: np.ndarray, num_classes: int, seed: int, n_init: int
                  ) -> tuple[np.ndarray, float]:
    """(cluster ids, seconds) of one method on one task's rows (normalised first if the method asks)."""
    start = time.perf_counter()
    x = normalize_task_np(rows, l2=True) if method.normalize else np.asarray(rows, np.float64)
    pred = method.cluster(x, num_classes, seed, n_init)
    return pred, time.perf_counter() - start


register(Method("hypernet_adapted", "hypernetwork + test-time adaptation", "#009E73", baseline=False))
register(Method("hypernet", "hypernetwork, no adaptation", "#0072B2", baseline=False))
register(Method("kmeans_embedding", "k-means on the backbone embedding", "#E69F00", "embedding", kmeans_clusters,
                normalize=True, every_seed=True))  # the comparison every claim is paired with
register(Method("gmm_embedding", "Gaussian mixture on the backbone embedding (diagonal)", "#D55E00", "embedding",
                lambda x, k, s, n: gmm_clusters(x, k, s, "diag"), normalize=True))
register(Method("spectral_embedding", "spectral clustering on the backbone embedding", "#CC79A7", "embedding",
                spectral_clusters, normalize=True))
register(Method("kmeans_latent", "k-means on VAE means", "#F0E442", "latent", kmeans_clusters))
register(Method("gmm_latent", "Gaussian mixture on VAE means", "#999933", "latent",
                lambda x, k, s, n: gmm_clusters(x, k, s)))
register(Method("kmeans_pixels", "k-means on raw pixels", "#56B4E9", "pixels", kmeans_clusters))
register(Method("logreg_embedding", "logistic regression on the embedding (supervised ceiling)", "#555555",
                "embedding", supervised=True))
