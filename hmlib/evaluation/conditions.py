"""The evaluation grid: conditions (held-out dataset x task shape) and their fixed, seeded suites of tasks.

A :class:`Condition` is one held-out dataset (clean, or shifted: ``mnist+rotate``) at one task shape (K classes,
N images). Its suite is ``num_tasks`` random K-class tasks of the dataset's *test* split, seeded from the eval
seed, the base dataset and the shape, so every method (and every later run) scores identical tasks, and every
shift of a dataset holds the same images. N is lowered to
what the split's smallest class allows (stated in the condition's label); a shape with more classes than the
dataset has is skipped, with a note.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hmlib import data
from hmlib.artifacts import fingerprint
from hmlib.config import Config
from hmlib.data.registry import parse_shifted


@dataclass(frozen=True)
class Condition:
    """One cell of the grid: a held-out dataset at a task shape (N as asked; ``fitted`` as the split allows)."""

    dataset: str
    num_classes: int
    num_images: int
    fitted: int | None = None

    @property
    def key(self) -> str:
        """File-safe identifier, e.g. ``mnist+rotate_K4_N256``."""
        return f"{self.dataset}_K{self.num_classes}_N{self.num_images}"

    @property
    def size(self) -> int:
        return self.fitted or self.num_images

    @property
    def base(self) -> str:
        return parse_shifted(self.dataset)[0]

    @property
    def shift(self) -> str:
        """The corruption's name, or 'clean'."""
        return parse_shifted(self.dataset)[1] or "clean"

    @property
    def label(self) -> str:
        note = f" (N = {self.fitted}: the smallest class)" if self.fitted and self.fitted != self.num_images else ""
        return f"{self.dataset}, K = {self.num_classes}, N = {self.size}{note}"


def grid(cfg: Config, datasets: Sequence[str] | None = None, shapes: Sequence[Sequence[int]] | None = None, *,
         verbose: bool = True) -> list[Condition]:
    """Every (dataset, K, N) of ``datasets`` (default ``meta.test_datasets``) x ``shapes`` (default ``eval.shapes``,
    and ``eval.shifted_shapes`` for shifted datasets when set) that the dataset's test split can fill, in
    dataset-major order."""
    datasets = list(cfg.meta.test_datasets if datasets is None else datasets)
    out = []
    for dataset in datasets:
        if shapes is not None:
            wanted = shapes
        else:
            shifted = parse_shifted(dataset)[1] is not None and cfg.eval.shifted_shapes is not None
            wanted = cfg.eval.shifted_shapes if shifted else cfg.eval.shapes
        labels = data.load_split(dataset, "test", cfg.data, progress=False).labels
        classes = len(np.unique(labels))
        for K, N in (tuple(int(v) for v in s) for s in wanted):
            if K > classes:
                if verbose:
                    print(f"note: {dataset} has {classes} classes; the K = {K} condition is skipped")
                continue
            fitted = data.fit_task_size(labels, K, N)
            out.append(Condition(dataset, K, N, fitted))
    return out


def suite_seed(base_seed: int, condition: Condition) -> int:
    """Deterministic seed of one condition's suite: ``eval.seed`` with the *base* dataset and the shape folded in,
    so every shift of a dataset draws the same images (a shift's effect is paired too)."""
    return int(fingerprint("eval-suite", int(base_seed), condition.base, condition.num_classes,
                           condition.num_images), 16) % (2**31 - 1)


def suite_for(cfg: Config, condition: Condition, labels: np.ndarray, num_tasks: int | None = None) -> data.TaskBatch:
    """The condition's suite (the first ``num_tasks`` of ``eval.num_tasks``) for a test split with these labels."""
    suite = data.sample_tasks(np.asarray(labels), cfg.eval.num_tasks, condition.num_classes, condition.size,
                              mode="random", seed=suite_seed(cfg.eval.seed, condition))
    return suite if num_tasks is None else suite[:num_tasks]


def build_suite(cfg: Config, condition: Condition, num_tasks: int | None = None) -> data.TaskBatch:
    """The condition's suite, reading the labels of its dataset's test split."""
    labels = data.load_split(condition.dataset, "test", cfg.data, progress=False).labels
    return suite_for(cfg, condition, labels, num_tasks)


def suite_fingerprint(suite: data.TaskBatch) -> str:
    """Short hash of a suite's indices and classes (identical suites, identical fingerprints)."""
    return fingerprint(np.asarray(suite.indices).tolist(), np.asarray(suite.classes).tolist())
