"""Tasks (METHOD.md): K classes, N images balanced across them, labels remapped to 0..K-1.

Sampling is vectorised over tasks: images are drawn without replacement inside each class by drawing
positions at random and redrawing only duplicates (or, for small classes, by sorting random keys).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmlib.data.registry import DatasetError

MODES = ("random", "consecutive")


@dataclass
class TaskBatch:
    """T tasks of N images: ``labels[t, i] = j`` means image ``indices[t, i]`` is of class ``classes[t, j]``."""

    indices: np.ndarray  # int64 (T, N), into the labels the sampler was built on
    labels: np.ndarray  # int64 (T, N), in 0..K-1
    classes: np.ndarray  # int64 (T, K), original class ids

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, item: int | slice | np.ndarray) -> "TaskBatch":
        """A sub-batch (an int keeps the task axis: shape (1, N))."""
        if isinstance(item, (int, np.integer)):
            item = slice(int(item), int(item) + 1) if item != -1 else slice(-1, None)
        return TaskBatch(self.indices[item], self.labels[item], self.classes[item])


class TaskSampler:
    """Draws tasks of ``num_images`` images from ``num_classes`` classes of one labelled split.

    ``where`` names the split in error messages (e.g. "dataset 'mnist' split 'test'").
    """

    def __init__(self, labels: np.ndarray, num_classes: int, num_images: int, mode: str = "random", *,
                 where: str = "the labels") -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_classes < 1 or num_images < num_classes:
            raise ValueError(f"need 1 <= num_classes <= num_images, got num_classes={num_classes}, "
                             f"num_images={num_images}")
        self.num_classes, self.num_images, self.mode = num_classes, num_images, mode
        self.class_ids, counts = np.unique(labels, return_counts=True)
        if num_classes > self.class_ids.size:
            raise DatasetError(too_few_classes(self.class_ids.size, num_classes, where))
        self.order = np.argsort(labels, kind="stable")  # image indices grouped by class
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.counts = counts
        # consecutive mode: classes 0..K-1, K..2K-1, ... of the sorted class ids; the remainder is dropped
        num_groups = self.class_ids.size // num_classes
        self.groups = np.arange(num_groups * num_classes).reshape(num_groups, num_classes)  # positions in class_ids
        used = self.groups.ravel() if mode == "consecutive" else np.arange(self.class_ids.size)
        self.per_class = -(-num_images // num_classes)  # ceil(N / K): the most a task takes from one class
        short = used[counts[used] < self.per_class]
        if short.size:
            worst = short[np.argmin(counts[short])]
            raise DatasetError(f"a task of {num_images} images over {num_classes} classes takes up to {self.per_class} "
                               f"images per class, but class {self.class_ids[worst]} holds only {counts[worst]} "
                               f"in {where} ({short.size} classes hold too few); lower task.num_images or use a "
                               "larger split")

    def sample(self, num_tasks: int, rng: np.random.Generator) -> TaskBatch:
        """Draw ``num_tasks`` tasks; images within a task are in random order."""
        T, K, N, Q = num_tasks, self.num_classes, self.num_images, self.per_class
        if self.mode == "random":  # K distinct classes per task, sorted
            chosen = np.sort(np.argsort(rng.random((T, self.class_ids.size)), axis=1)[:, :K], axis=1)
        else:  # groups in turn: task t uses group t mod G
            chosen = self.groups[np.arange(T) % self.groups.shape[0]]
        positions = self._draw_positions(chosen.ravel(), Q, rng).reshape(T, K, Q)
        picked = self.order[self.starts[chosen][..., None] + positions]  # (T, K, Q) image indices, class-major
        shuffle = np.argsort(rng.random((T, N)), axis=1)  # images of a task in random order
        if N == K * Q:  # every class gives Q images: the label of unshuffled position p is p // Q
            indices = np.take_along_axis(picked.reshape(T, N), shuffle, axis=1)
            labels = shuffle // Q
        else:  # N = K * (Q - 1) + r, 0 < r < K: r random classes of each task give Q images, the others Q - 1
            quota = np.where(np.argsort(rng.random((T, K)), axis=1) < N - K * (Q - 1), Q, Q - 1)
            keep = np.arange(Q)[None, None, :] < quota[..., None]  # exactly N True per task
            indices = np.take_along_axis(picked[keep].reshape(T, N), shuffle, axis=1)
            labels = np.take_along_axis(np.nonzero(keep)[1].reshape(T, N), shuffle, axis=1)
        return TaskBatch(indices=indices.astype(np.int64, copy=False), labels=labels.astype(np.int64, copy=False),
                         classes=self.class_ids[chosen].astype(np.int64, copy=False))

    def _draw_positions(self, class_pos: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        """(R, size) distinct positions inside each row's class, in random order (uniform without replacement)."""
        counts = self.counts[class_pos]
        out = np.empty((class_pos.size, size), dtype=np.int64)
        dense = counts < 4 * size  # small classes: sort random keys; large ones: redraw duplicates
        for rows, fill in ((np.flatnonzero(dense), self._by_keys), (np.flatnonzero(~dense), self._by_rejection)):
            if rows.size:
                out[rows] = fill(counts[rows], size, rng)
        return out

    @staticmethod
    def _by_keys(counts: np.ndarray, size: int, rng: np.random.Generator, max_keys: int = 1 << 22) -> np.ndarray:
        width = int(counts.max())
        out = np.empty((counts.size, size), dtype=np.int64)
        step = max(1, max_keys // width)  # rows per chunk, to bound memory for many tasks
        for start in range(0, counts.size, step):
            chunk = counts[start:start + step]
            keys = rng.random((chunk.size, width))
            keys[np.arange(width)[None, :] >= chunk[:, None]] = np.inf  # beyond a class's end: never picked
            out[start:start + step] = np.argsort(keys, axis=1)[:, :size]
        return out

    @staticmethod
    def _by_rejection(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
        draws = rng.integers(0, counts[:, None], size=(counts.size, size))
        rows = np.arange(counts.size)
        while rows.size:
            ranked = np.sort(draws[rows], axis=1)
            rows = rows[(ranked[:, 1:] == ranked[:, :-1]).any(axis=1)]  # rows holding a duplicate
            if not rows.size:
                break
            sub = draws[rows]
            order = np.argsort(sub, axis=1, kind="stable")
            ranked = np.take_along_axis(sub, order, axis=1)
            dup = np.zeros(sub.shape, dtype=bool)  # every repeat after a value's first occurrence
            np.put_along_axis(dup, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
            r, c = np.nonzero(dup)
            sub[r, c] = rng.integers(0, counts[rows][r])
            draws[rows] = sub
        return draws


def too_few_classes(available: int, num_classes: int, where: str) -> str:
    """The error message for a split with fewer classes than a task's K."""
    return (f"a task needs {num_classes} classes (task.num_classes) but only {available} are in {where} (fewer than "
            f"the {num_classes} required); lower task.num_classes to at most {available}, or use a dataset with at "
            f"least {num_classes} classes")


def sample_tasks(labels: np.ndarray, num_tasks: int, num_classes: int, num_images: int, mode: str = "random",
                 seed: int = 0, *, where: str = "the labels") -> TaskBatch:
    """``num_tasks`` tasks from ``labels`` (deterministic for ``seed``)."""
    return TaskSampler(labels, num_classes, num_images, mode, where=where).sample(num_tasks,
                                                                               np.random.default_rng(seed))


def fit_task_size(labels: np.ndarray, num_classes: int, num_images: int, *, where: str = "the labels") -> int:
    """Largest task size <= ``num_images`` whose balanced K-class tasks every class of ``labels`` can fill."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    counts = counts[counts > 0]
    if len(counts) < num_classes:
        raise DatasetError(too_few_classes(len(counts), num_classes, where))
    return int(min(num_images, num_classes * counts.min()))
