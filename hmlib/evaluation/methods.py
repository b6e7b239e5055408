"""The registry of methods scored on identical tasks: the hypernetwork's rows and every baseline.

A :class:`Method` has a label, a colour and a ``score`` function ``(MethodContext) -> per-task accuracy (T,)``;
tables, figures, the quality table of notebook 02, the ablations and the report index read them from here, and
:func:`score` is the one per-task scoring function they all call. Adding a baseline is one :func:`register` call
(see tests/test_evaluation.py). Unsupervised methods are scored by Hungarian-matched clustering accuracy; the
supervised ceiling (``supervised=True``) sees labels of *other* images of the task's classes (train split) and is
scored by plain accuracy, and is never a candidate for "the strongest label-free baseline".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.linear_model import LogisticRegression
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hmlib.config import Config
from hmlib.evaluation import plain_adaptation as plain
from hmlib.features import normalize_task_np
from hmlib.metrics import clustering_accuracy

Clusterer = Callable[[np.ndarray, int, int, int], np.ndarray]  # (rows, K, seed, kmeans_n_init) -> cluster ids


@dataclass
class MethodContext:
    """What a method reads to score one suite under one replicate: inputs, tasks, seeds, a shared memo."""

    cfg: Config
    inputs: Any  # hmlib.evaluation.inputs.SeedInputs (or any object with .reps, .images, .backbone, ...)
    suite: Any  # data.TaskBatch
    seed: int  # base seed of the clusterers (task t uses seed + t)
    memo: dict = field(default_factory=dict)  # computations shared by several methods (e.g. both adaptation modes)

    @property
    def num_classes(self) -> int:
        return int(np.asarray(self.suite.classes).shape[1])

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.suite.labels)

    def accuracy(self, clusters: np.ndarray) -> np.ndarray:
        """Clustering accuracy (T,) of cluster ids (T, N) against the suite's labels."""
        return np.array([clustering_accuracy(c, y, self.num_classes) for c, y in zip(clusters, self.labels)])


@dataclass(frozen=True)
class Method:
    """One row of the evaluation table."""

    name: str
    label: str
    color: str
    score: Callable[[MethodContext], np.ndarray] | None = None  # None: the hypernetwork (scored by its checkpoint)
    reads: str | None = None  # the representation it needs ("embedding", "latent", "pixels", "images")
    supervised: bool = False  # the ceiling: sees labels of other images of the task's classes
    adapts: bool = False  # a label-free test-time adaptation of the representation (no meta-learning)
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


def score(method: Method, ctx: MethodContext) -> tuple[np.ndarray, float]:
    """(per-task accuracy (T,), seconds per task) of one method on one suite: the one scoring function."""
    start = time.perf_counter()
    acc = np.asarray(method.score(ctx), dtype=np.float64)
    return acc, (time.perf_counter() - start) / max(len(acc), 1)


# ------------------------------------------------------------------------------------------ clusterers

def kmeans_clusters(x: np.ndarray, num_classes: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster ids (N,) from scikit-learn's k-means (Lloyd, k-means++ init, ``n_init`` restarts)."""
    return KMeans(n_clusters=num_classes, n_init=n_init, random_state=seed).fit_predict(np.asarray(x, np.float64))


def gmm_clusters(x: np.ndarray, num_classes: int, seed: int = 0, covariance: str = "full") -> np.ndarray:
    """Cluster ids (N,) from a Gaussian mixture (k-means initialised, regularised covariances)."""
    x = np.asarray(x, dtype=np.float64)
    return GaussianMixture(n_components=num_classes, covariance_type=covariance, reg_covar=1e-3,
                           random_state=seed).fit(x).predict(x)


def spectral_clusters(x: np.ndarray, num_classes: int, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster ids (N,) from spectral clustering on the task's nearest-neighbour graph (10, or N - 1 if fewer)."""
    model = SpectralClustering(n_clusters=num_classes, affinity="nearest_neighbors",
                               n_neighbors=min(10, len(x) - 1), assign_labels="kmeans", n_init=n_init,
                               random_state=seed)
    return model.fit_predict(np.asarray(x, dtype=np.float64))


def logreg_predict(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Labels (N,) predicted by standardised multinomial logistic regression fitted on (train_x, train_y)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    model.fit(np.asarray(train_x, dtype=np.float64), train_y)
    return model.predict(np.asarray(x, dtype=np.float64))


def cluster_tasks(rows: np.ndarray, ctx: MethodContext, clusterer: Clusterer, *, normalize: bool) -> np.ndarray:
    """Cluster ids (T, N) of every task's rows ((T, N, F), or picked from (n, F) by the suite) with a clusterer."""
    tasks = rows if rows.ndim == 3 else rows[np.asarray(ctx.suite.indices)]
    return np.stack([clusterer(normalize_task_np(x, l2=True) if normalize else np.asarray(x, np.float64),
                               ctx.num_classes, ctx.seed + t, ctx.cfg.eval.kmeans_n_init)
                     for t, x in enumerate(tasks)])


def clusters_on(reads: str, clusterer: Clusterer, *, normalize: bool) -> Callable[[MethodContext], np.ndarray]:
    """A score function: a clusterer on one stored representation of the task's images."""
    return lambda ctx: ctx.accuracy(cluster_tasks(ctx.inputs.reps[reads], ctx, clusterer, normalize=normalize))


# ------------------------------------------------------------------------ adaptation without meta-learning

def _task_images(ctx: MethodContext) -> torch.Tensor:
    return torch.as_tensor(ctx.inputs.images[np.asarray(ctx.suite.indices)])


def adabn_embeddings(ctx: MethodContext) -> np.ndarray:
    """(T, N, D) embeddings with each task's own normalisation statistics (no steps), memoised."""
    if "adabn" not in ctx.memo:
        ctx.memo["adabn"] = plain.adapt_tasks(ctx.inputs.backbone, _task_images(ctx), ctx.num_classes, blend=1.0,
                                              steps=0, lr=ctx.cfg.eval.plain_lr).embeddings
    return ctx.memo["adabn"]


def plain_modes(ctx: MethodContext) -> dict[str, Any]:
    """Both modes of the plain adaptation (task and stored statistics): k-means clusters, accuracy and silhouette
    of each, computed once per suite and replicate (memoised)."""
    if "plain" not in ctx.memo:
        modes = {}
        for mode, blend in (("task", 1.0), ("running", 0.0)):
            z = plain.adapt_tasks(ctx.inputs.backbone, _task_images(ctx), ctx.num_classes, blend=blend,
                                  steps=ctx.cfg.eval.plain_steps, lr=ctx.cfg.eval.plain_lr).embeddings
            clusters = cluster_tasks(z, ctx, kmeans_clusters, normalize=False)
            modes[mode] = {"acc": ctx.accuracy(clusters), "silhouette": plain.silhouettes(z, clusters)}
        ctx.memo["plain"] = modes
    return ctx.memo["plain"]


def plain_choice(ctx: MethodContext) -> np.ndarray:
    """Per task, the plain adaptation mode whose clusters have the higher silhouette (label-free)."""
    modes = plain_modes(ctx)
    return plain.choose_by_silhouette(np.stack([modes[m]["acc"] for m in ("task", "running")]),
                                      np.stack([modes[m]["silhouette"] for m in ("task", "running")]))


# ------------------------------------------------------------------------------------ supervised ceiling

def logreg_ceiling(ctx: MethodContext) -> np.ndarray:
    """Accuracy of logistic regression trained on labelled train-split embeddings of each task's classes."""
    inputs, cfg = ctx.inputs, ctx.cfg
    rows, out = inputs.reps["embedding"], []
    for t, (idx, classes) in enumerate(zip(ctx.suite.indices, ctx.suite.classes)):
        rng = np.random.default_rng(ctx.seed + t)
        take, ys = [], []
        for j, c in enumerate(classes):
            members = np.flatnonzero(inputs.train_labels == c)
            if len(members) == 0:
                raise ValueError(f"class {c} has no images in the train split; the supervised ceiling needs some")
            pick = rng.choice(members, size=min(cfg.eval.logreg_train_per_class, len(members)), replace=False)
            take.append(pick)
            ys.append(np.full(len(pick), j))
        pred = logreg_predict(inputs.train_reps["embedding"][np.concatenate(take)], np.concatenate(ys), rows[idx],
                              seed=ctx.seed + t)
        out.append(float(np.mean(pred == ctx.labels[t])))
    return np.asarray(out)


register(Method("hypernet_adapted", "hypernetwork + test-time adaptation", "#009E73", baseline=False))
register(Method("hypernet", "hypernetwork, no adaptation", "#0072B2", baseline=False))
register(Method("kmeans_embedding", "k-means on the backbone embedding", "#E69F00",
                clusters_on("embedding", kmeans_clusters, normalize=True), "embedding", every_seed=True))
register(Method("adabn_kmeans", "task normalisation statistics, then k-means (AdaBN per task)", "#882255",
                lambda ctx: ctx.accuracy(cluster_tasks(adabn_embeddings(ctx), ctx, kmeans_clusters, normalize=False)),
                "images", adapts=True))
register(Method("plain_task", "plain adaptation, task statistics (TENT-style, SCAN loss)", "#AA4499",
                lambda ctx: plain_modes(ctx)["task"]["acc"], "images", adapts=True))
register(Method("plain_running", "plain adaptation, stored statistics", "#DDCC77",
                lambda ctx: plain_modes(ctx)["running"]["acc"], "images", adapts=True))
register(Method("plain_choice", "plain adaptation, mode chosen by silhouette (label-free)", "#332288",
                plain_choice, "images", adapts=True))
register(Method("gmm_embedding", "Gaussian mixture on the backbone embedding (diagonal)", "#D55E00",
                clusters_on("embedding", lambda x, k, s, n: gmm_clusters(x, k, s, "diag"), normalize=True),
                "embedding"))
register(Method("spectral_embedding", "spectral clustering on the backbone embedding", "#CC79A7",
                clusters_on("embedding", spectral_clusters, normalize=True), "embedding"))
register(Method("kmeans_latent", "k-means on VAE means", "#F0E442",
                clusters_on("latent", kmeans_clusters, normalize=False), "latent"))
register(Method("gmm_latent", "Gaussian mixture on VAE means", "#999933",
                clusters_on("latent", lambda x, k, s, n: gmm_clusters(x, k, s), normalize=False), "latent"))
register(Method("kmeans_pixels", "k-means on raw pixels", "#56B4E9",
                clusters_on("pixels", kmeans_clusters, normalize=False), "pixels"))
register(Method("logreg_embedding", "logistic regression on the embedding (supervised ceiling)", "#555555",
                logreg_ceiling, "embedding", supervised=True))
