"""Meta-training episodes: random tasks of the meta-training datasets, of varying K, under random training shifts.

Every meta-batch draws one K (``meta.min_classes`` .. ``meta.max_classes``, capped by the dataset's classes)
and one meta-training dataset per task; each task is put under a random corruption of the *train* family
(``meta.shifts``, never a held-out benchmark corruption) with probability ``meta.shift_prob``, at a random
strength, so that the meta-learner meets the situations in which adapting to a task helps and those in which
it harms. The task's conditioning rows are its images' VAE distribution, computed after the shift. Episodes are
built on the CPU (sampling, corruptions); :meth:`Episode.to` copies one to the training device without blocking.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hmlib import data
from hmlib.config import Config
from hmlib.data.corruptions import CORRUPTIONS, train_corruptions
from hmlib.features import to_device
from hmlib.hyper.generators import TaskInputs
from hmlib.hyper.inputs import TaskData, reads_images
from hmlib.vae.model import VAE
from hmlib.vae.train import encode_images


@dataclass
class Episode:
    """A meta-batch: inputs (T, N, ...), labels (T, N), K, and the shift of every task ('none' if clean)."""

    inputs: TaskInputs
    labels: torch.Tensor
    num_classes: int
    shifts: list[str]

    def to(self, device: torch.device | str) -> "Episode":
        """The same meta-batch on ``device`` (pinned, non-blocking copies to a GPU)."""
        return Episode(self.inputs.to(device), to_device(self.labels, device), self.num_classes, self.shifts)


class EpisodeSampler:
    """Draws meta-batches from the meta-training parts (each a TaskData with images and labels)."""

    def __init__(self, parts: list[TaskData], cfg: Config, vae: VAE) -> None:
        self.parts, self.cfg, self.vae = parts, cfg, vae
        self.shifts = list(cfg.meta.shifts) if cfg.meta.shifts is not None else train_corruptions()
        self.class_counts = [len(np.unique(p.labels)) for p in parts]
        self.samplers: dict[tuple[int, int], data.TaskSampler] = {}

    def _sampler(self, part: int, num_classes: int) -> data.TaskSampler:
        """Tasks of ``num_classes`` classes of one part, all parts with one N (the smallest their classes allow)."""
        key = (part, num_classes)
        if key not in self.samplers:
            size = min(data.fit_task_size(p.labels, num_classes, self.cfg.meta.task_images) for p in self.parts)
            self.samplers[key] = data.TaskSampler(self.parts[part].labels, num_classes, size, self.cfg.task.mode,
                                                  where=f"the meta-training part of {self.parts[part].name}")
        return self.samplers[key]

    def sample(self, rng: np.random.Generator, num_classes: int | None = None) -> Episode:
        """One meta-batch of ``meta.meta_batch_size`` tasks (deterministic given ``rng``); K drawn unless given."""
        meta = self.cfg.meta
        if num_classes is None:
            num_classes = int(rng.integers(meta.min_classes, meta.max_classes + 1))
        num_classes = min(num_classes, *self.class_counts)
        images, labels, shifts = [], [], []
        for part in rng.integers(len(self.parts), size=meta.meta_batch_size):
            batch = self._sampler(int(part), num_classes).sample(1, rng)
            task_images = self.parts[int(part)].images[batch.indices[0]]
            shift = "none"
            if self.shifts and rng.random() < meta.shift_prob:
                shift = self.shifts[int(rng.integers(len(self.shifts)))]
                task_images = CORRUPTIONS[shift](task_images, rng, float(rng.uniform(0.25, 1.0)))
            images.append(task_images)
            labels.append(batch.labels[0])
            shifts.append(shift)
        images = np.stack(images)  # (T, N, 28, 28) uint8
        mu, logvar = encode_images(self.vae, images.reshape(-1, *images.shape[2:]))
        context = np.concatenate([mu, logvar], axis=1).reshape(*images.shape[:2], -1)
        context = torch.as_tensor(context)
        inputs = (TaskInputs(context, torch.as_tensor(images)) if reads_images(self.cfg)
                  else TaskInputs(context, features=context))
        return Episode(inputs, torch.as_tensor(np.stack(labels)), num_classes, shifts)
