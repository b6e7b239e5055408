"""The evaluation suite: a fixed, seeded set of random K-class tasks from a held-out dataset's test split."""
from __future__ import annotations

import numpy as np

from hmlib import data
from hmlib.artifacts import fingerprint
from hmlib.config import Config


def suite_seed(base_seed: int, dataset: str, num_images: int) -> int:
    """Deterministic seed of one suite: ``eval.seed`` with the dataset and task size folded in."""
    return int(fingerprint("eval-suite", int(base_seed), dataset, int(num_images)), 16) % (2**31 - 1)


def suite_from_labels(labels: np.ndarray, cfg: Config, dataset: str, num_images: int,
                      num_tasks: int | None = None) -> data.TaskBatch:
    """The suite's tasks for a test split with these labels (the first ``num_tasks`` of the full suite)."""
    suite = data.sample_tasks(np.asarray(labels), cfg.eval.num_tasks, cfg.task.num_classes, int(num_images),
                              mode="random", seed=suite_seed(cfg.eval.seed, dataset, num_images))
    return suite if num_tasks is None else suite[:num_tasks]


def build_suite(cfg: Config, dataset: str, num_images: int, num_tasks: int | None = None) -> data.TaskBatch:
    """Fixed, seeded suite of ``eval.num_tasks`` tasks of ``num_images`` images from ``dataset``'s test split."""
    labels = data.load_split(dataset, "test", cfg.data, progress=False).labels
    return suite_from_labels(labels, cfg, dataset, num_images, num_tasks)


def fitted_size(cfg: Config, labels: np.ndarray, num_images: int) -> int:
    """``num_images``, lowered to what the split's smallest class allows (e.g. hebrew_chars' small classes)."""
    return data.fit_task_size(labels, cfg.task.num_classes, int(num_images))


def suite_fingerprint(suite: data.TaskBatch) -> str:
    """Short hash of a suite's indices and classes (identical suites, identical fingerprints)."""
    return fingerprint(np.asarray(suite.indices).tolist(), np.asarray(suite.classes).tolist())
