"""How well a representation clusters each dataset: k-means on random tasks of its test split (notebook 02)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from hmlib import data
from hmlib.config import Config
from hmlib.evaluation.methods import METHODS, run_clusterer
from hmlib.metrics import clustering_accuracy
from hmlib.stats import summarize


def kmeans_quality(cfg: Config, rows: np.ndarray, labels: np.ndarray, *, num_tasks: int = 100, seed: int = 0,
                   normalize: bool = True) -> np.ndarray:
    """Per-task k-means accuracy (T,) on random K-class tasks of ``rows`` (standardised + L2 per task if asked)."""
    size = data.fit_task_size(labels, cfg.task.num_classes, cfg.task.num_images)
    tasks = data.sample_tasks(labels, num_tasks, cfg.task.num_classes, size, mode="random", seed=seed)
    method = METHODS["kmeans_embedding" if normalize else "kmeans_latent"]
    K = cfg.task.num_classes
    return np.array([clustering_accuracy(run_clusterer(method, rows[idx], K, seed + t, cfg.eval.kmeans_n_init)[0],
                                         lab, K) for t, (idx, lab) in enumerate(zip(tasks.indices, tasks.labels))])


def quality_table(cfg: Config, representations: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]], *,
                  num_tasks: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """Rows (representation, dataset, role, tasks, images/task, accuracy %, 95% CI ±) for each (name, dataset)."""
    out = []
    for (name, dataset), (rows, labels) in representations.items():
        stats = summarize(kmeans_quality(cfg, rows, labels, num_tasks=num_tasks, seed=seed,
                                         normalize=not name.startswith("VAE")))
        out.append({"representation": name, "dataset": dataset,
                    "role": "held out" if dataset in cfg.meta.test_datasets else "meta-train",
                    "tasks": num_tasks, "images/task": data.fit_task_size(labels, cfg.task.num_classes,
                                                                         cfg.task.num_images),
                    "accuracy %": round(100 * stats["mean"], 1),
                    "95% CI ±": None if stats["ci"] is None else round(100 * stats["ci"], 1)})
    return out
