"""How well a representation clusters each dataset: k-means on random tasks of its test split (notebook 02).

Scored by the evaluation's one scoring function (:func:`hmlib.evaluation.methods.score`) with the registered
k-means rows, so the numbers mean what the evaluation tables mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from hmlib import data
from hmlib.backbone.embeddings import embed_images
from hmlib.config import Config
from hmlib.evaluation.methods import METHODS, MethodContext, score
from hmlib.stats import summarize


@dataclass
class RowsInputs:
    """Stored representations of one split (what a clustering baseline reads), for scoring outside a checkpoint."""

    reps: dict[str, np.ndarray]
    images: np.ndarray | None = None
    backbone: Any = None
    extra: dict = field(default_factory=dict)


def kmeans_quality(cfg: Config, rows: np.ndarray, labels: np.ndarray, *, num_tasks: int = 100, seed: int = 0,
                   normalize: bool = True) -> np.ndarray:
    """Per-task k-means accuracy (T,) on random K-class tasks of ``rows`` (standardised + L2 per task if asked)."""
    size = data.fit_task_size(labels, cfg.task.num_classes, cfg.task.num_images)
    tasks = data.sample_tasks(labels, num_tasks, cfg.task.num_classes, size, mode="random", seed=seed)
    method = METHODS["kmeans_embedding" if normalize else "kmeans_latent"]
    reads = method.reads
    return score(method, MethodContext(cfg, RowsInputs({reads: rows}), tasks, seed))[0]


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


def kmeans_curve(cfg: Config, dataset: str, *, num_tasks: int = 20, seed: int = 0):
    """A report-only probe for the transductive stage: backbone -> mean k-means accuracy on ``num_tasks`` tasks of
    ``dataset``'s *test* split (labels for scoring only; it never changes what is trained)."""
    test = data.load_split(dataset, "test", cfg.data, progress=False)
    K = min(cfg.task.num_classes, len(np.unique(test.labels)))
    size = data.fit_task_size(test.labels, K, cfg.task.num_images)
    tasks = data.sample_tasks(test.labels, num_tasks, K, size, mode="random", seed=seed)
    images = test.images[np.unique(tasks.indices)]
    remap = np.full(len(test.labels), -1)
    remap[np.unique(tasks.indices)] = np.arange(len(images))
    local = data.TaskBatch(remap[tasks.indices], tasks.labels, tasks.classes)

    def probe(backbone: Any) -> float:
        rows = embed_images(backbone, images)
        return float(score(METHODS["kmeans_embedding"], MethodContext(cfg, RowsInputs({"embedding": rows}), local,
                                                                      seed))[0].mean())

    return probe
