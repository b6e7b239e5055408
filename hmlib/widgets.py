"""Interactive exploration of test-time adaptation (notebook 04).

:class:`AdaptationExplorer` holds the logic and is tested without a browser: set the dataset, the
task, the number of inner steps, the step-size scale or the inner loss, and read the new
:class:`ExplorerState` (accuracy after every step, confusion matrix, predicted clusters, and the task's
*adapted representation* after that step, projected to 2-D on axes fixed by the starting embedding, so the
points move as the representation adapts). :func:`explorer_widget` wraps it in ipywidgets controls that
redraw :func:`hmlib.plots.ablations.plot_explorer_state` on every change, with the accuracy as text too.

What is shown is the candidate the method keeps for the task: every test-time candidate is adapted for
``adapt.test_steps`` steps and the label-free choice made there, as :func:`~hmlib.hyper.adapt.predict_task` makes it,
so at the test-time step count the explorer shows exactly the method's clusters; the kept candidate alone is then
followed to ``max_steps``. That runs once per (dataset, task, scale, loss) and is cached, so moving the steps slider
only re-plots; a new scale, loss or task re-runs the inner loop (``benchmarks/bench_widgets.py`` times it).
"""
from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import ipywidgets as w
import numpy as np
import torch

from hmlib.ablations.run import ablation_grid
from hmlib.config import AdaptConfig, Config
from hmlib.evaluation.conditions import suite_for
from hmlib.hyper.adapt import CANDIDATES, adapt, adapt_candidates, candidate_names, prepare, representation
from hmlib.hyper.generators import TaskInputs
from hmlib.hyper.inputs import TaskData, load_task_data
from hmlib.hyper.losses import INNER_LOSSES, task_accuracy
from hmlib.hyper.metatrain import meta_train
from hmlib.metrics import best_matching, confusion
from hmlib.plots.ablations import ExplorerFigure  # the widget's view

LR_RANGE = (0.05, 20.0)  # step-size scales (adapt.lr_scale) the explorer accepts
CANDIDATE_LABELS = {"generated": "generated normalisation", "stored": "the backbone's stored statistics",
                    "task": "the task's own statistics"}  # the readout's words for adapt.CANDIDATES


@dataclass
class TaskSource:
    """One dataset's fixed task suite and what the hypernetwork reads of its split."""

    task_data: TaskData  # conditioning rows and features of the split
    suite: Any  # hmlib.data.TaskBatch with indices into the rows above

    def __post_init__(self) -> None:
        indices = np.asarray(self.suite.indices)
        if indices.size and indices.max() >= len(self.task_data):
            raise ValueError(f"task indices reach {indices.max()} but only {len(self.task_data)} rows were given")


@dataclass
class ExplorerState:
    """What the explorer shows for its current settings."""

    dataset: str
    task: int
    num_steps: int
    inner_lr: float  # the step-size scale (adapt.lr_scale)
    inner_loss: str
    accuracy: np.ndarray  # (max_steps+1,) clustering accuracy after 0..max_steps inner steps
    labels: np.ndarray  # (N,) true classes 0..K-1 (used for scoring and display only)
    classes: np.ndarray  # (K,) original class ids of the task
    pred: np.ndarray  # (N,) predicted clusters after num_steps, relabelled by the best matching to classes
    confusion: np.ndarray  # (K, K) rows matched predicted cluster, columns true class
    embedding: np.ndarray  # (N, 2) the task's representation after num_steps, on the starting embedding's PCA axes
    seconds: float  # time of the adaptation run behind this state (0 when served from the cache)
    candidate: str = "generated"  # the test-time candidate shown: the one the method keeps (adapt.CANDIDATES)

    @property
    def current_accuracy(self) -> float:
        """Accuracy after ``num_steps`` inner steps."""
        return float(self.accuracy[self.num_steps])


class AdaptationExplorer:
    """Re-runs the test-time update of one hypernetwork on one suite task whenever a setting changes."""

    def __init__(self, hypernet: torch.nn.Module, sources: Mapping[str, TaskSource], adapt: AdaptConfig, *,
                 max_steps: int = 32, cache_size: int = 64) -> None:
        if not sources:
            raise ValueError("the explorer needs at least one dataset (a TaskSource)")
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        self.hypernet = hypernet.eval()
        self.sources = dict(sources)
        self.max_steps = int(max_steps)
        self.base_adapt = adapt
        self.dataset = next(iter(self.sources))
        self.task = 0
        self.num_steps = min(adapt.steps_at_test, self.max_steps)
        self.inner_lr = float(adapt.lr_scale)
        self.inner_loss = adapt.inner_loss
        self._cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray, float, str]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def datasets(self) -> list[str]:
        """Datasets the picker offers."""
        return list(self.sources)

    def num_tasks(self, dataset: str | None = None) -> int:
        """Number of suite tasks of a dataset (the current one by default)."""
        return len(np.asarray(self.sources[dataset or self.dataset].suite.indices))

    def set(self, *, dataset: str | None = None, task: int | None = None, num_steps: int | None = None,
            inner_lr: float | None = None, inner_loss: str | None = None) -> ExplorerState:
        """Change any settings (validated; nothing changes if one is invalid) and return the new state."""
        new_dataset = self.dataset if dataset is None else dataset
        if new_dataset not in self.sources:
            raise ValueError(f"unknown dataset {new_dataset!r}; the explorer has: {', '.join(self.sources)}")
        new_task = (0 if dataset not in (None, self.dataset) else self.task) if task is None else int(task)
        if not 0 <= new_task < self.num_tasks(new_dataset):
            raise ValueError(f"task {new_task} is out of range: {new_dataset} has tasks "
                             f"0..{self.num_tasks(new_dataset) - 1}")
        new_steps = self.num_steps if num_steps is None else int(num_steps)
        if not 0 <= new_steps <= self.max_steps:
            raise ValueError(f"num_steps must be in 0..{self.max_steps}, got {new_steps}")
        new_lr = self.inner_lr if inner_lr is None else float(inner_lr)
        if not LR_RANGE[0] <= new_lr <= LR_RANGE[1]:
            raise ValueError(f"the step-size scale must be in [{LR_RANGE[0]:g}, {LR_RANGE[1]:g}], got {new_lr:g}")
        new_loss = self.inner_loss if inner_loss is None else inner_loss
        if new_loss not in INNER_LOSSES:
            raise ValueError(f"inner_loss must be one of {', '.join(INNER_LOSSES)}, got {new_loss!r}")
        self.dataset, self.task, self.num_steps = new_dataset, new_task, new_steps
        self.inner_lr, self.inner_loss = new_lr, new_loss
        return self.state

    @property
    def adapt_config(self) -> AdaptConfig:
        """The AdaptConfig of the current settings (run to max_steps)."""
        return dataclasses.replace(self.base_adapt, lr_scale=self.inner_lr, inner_loss=self.inner_loss,
                                   num_inner_steps=self.max_steps)

    def _task_inputs(self, dataset: str, task: int) -> TaskInputs:
        source = self.sources[dataset]
        return source.task_data.task_inputs(np.asarray(source.suite.indices)[task:task + 1])

    def _run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, str]:
        """(predictions (S+1, N), accuracy (S+1,), 2-D representation (S+1, N, 2), seconds, candidate) for the
        current dataset/task/scale/loss; cached."""
        key = (self.dataset, self.task, self.inner_lr, self.inner_loss)
        if key in self._cache:
            self._cache.move_to_end(key)
            pred, acc, points, _, name = self._cache[key]
            return pred, acc, points, 0.0, name
        source = self.sources[self.dataset]
        labels = np.asarray(source.suite.labels)[self.task]
        num_classes = len(np.asarray(source.suite.classes)[self.task])
        cfg = self.adapt_config
        start = time.perf_counter()
        with torch.no_grad():
            inputs = self.hypernet.check(self._task_inputs(self.dataset, self.task))
            prepared = prepare(self.hypernet, inputs, cfg, self.max_steps)  # shared by every run below
            names = candidate_names(self.hypernet, cfg)
            name = names[0]
            if len(names) > 1:  # the method's choice, where it makes it: after the test-time steps
                _, pick = adapt_candidates(self.hypernet, inputs, cfg, num_classes=num_classes, prepared=prepared,
                                           num_steps=min(self.base_adapt.steps_at_test, self.max_steps))
                name = names[int(pick[0])]
            result = adapt(self.hypernet, inputs, cfg, num_steps=self.max_steps, num_classes=num_classes,
                           fixed=CANDIDATES[name] or None, trajectory=True, prepared=prepared)
            # step s's representation: its parameters and (the full generator's view) its logits
            views = [representation(self.hypernet, dataclasses.replace(result, params=params,
                                                                       logits=result.logits[:s + 1]))[0].cpu().numpy()
                     for s, params in enumerate(result.trajectory)]
        seconds = time.perf_counter() - start
        logits = torch.stack(result.logits)  # (S+1, 1, N, K)
        pred = logits[:, 0].argmax(-1).cpu().numpy()  # (S+1, N)
        acc = np.array([task_accuracy(step, labels[None])[0] for step in logits])
        points = project_along(views)
        self._cache[key] = (pred, acc, points, seconds, name)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return pred, acc, points, seconds, name

    def state_at(self, num_steps: int) -> ExplorerState:
        """The state of the current task after ``num_steps`` inner steps (the other settings unchanged)."""
        if not 0 <= num_steps <= self.max_steps:
            raise ValueError(f"num_steps must be in 0..{self.max_steps}, got {num_steps}")
        source = self.sources[self.dataset]
        labels = np.asarray(source.suite.labels)[self.task]
        classes = np.asarray(source.suite.classes)[self.task]
        num_classes = len(classes)
        pred_all, acc, points, seconds, name = self._run()
        raw = pred_all[num_steps]
        matched = best_matching(raw, labels, num_classes)[raw]  # cluster -> the class it is matched to
        return ExplorerState(dataset=self.dataset, task=self.task, num_steps=num_steps, inner_lr=self.inner_lr,
                             inner_loss=self.inner_loss, accuracy=acc, labels=labels, classes=classes,
                             pred=matched, confusion=confusion(matched, labels, num_classes),
                             embedding=points[num_steps], seconds=seconds, candidate=name)

    @property
    def state(self) -> ExplorerState:
        """The state for the current settings."""
        return self.state_at(self.num_steps)

    def step_grid(self, steps: Sequence[int]) -> list[ExplorerState]:
        """States of the current task at each step count (the static small multiples)."""
        return [self.state_at(s) for s in steps if s <= self.max_steps]

    def curves(self, *, inner_lrs: Sequence[float] = (), inner_losses: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Accuracy-vs-steps curves of the current task for several lrs or losses (settings restored after)."""
        saved = (self.inner_lr, self.inner_loss)
        out = {}
        try:
            for lr in inner_lrs:
                self.set(inner_lr=lr)
                out[f"step sizes x {lr:g}"] = self._run()[1]
            self.set(inner_lr=saved[0])
            for loss in inner_losses:
                self.set(inner_loss=loss)
                out[loss] = self._run()[1]
        finally:
            self.inner_lr, self.inner_loss = saved
        return out

    @classmethod
    def from_config(cls, cfg: Config, *, datasets: Sequence[str] | None = None, seed: int | None = None,
                    progress: bool = False) -> "AdaptationExplorer":
        """Explorer over the protocol's hypernetwork (notebook 03, replicate ``seed``) and the ablation suite of
        each dataset (its first ablation shape); loads only, never trains."""
        seed = cfg.seeds[0] if seed is None else seed
        hypernet = meta_train(cfg, seed, train=False, progress=progress).hypernet
        conditions = {c.dataset: c for c in reversed(ablation_grid(cfg))}  # the first shape of each dataset
        sources = {}
        for dataset in datasets or cfg.meta.test_datasets:
            task_data = load_task_data(cfg, dataset, "test", seed, train=False, progress=progress)
            condition = conditions.get(dataset) or next(iter(conditions.values()))
            condition = dataclasses.replace(condition, dataset=dataset)
            sources[dataset] = TaskSource(task_data, suite_for(cfg, condition, task_data.labels,
                                                               cfg.ablation.num_tasks))
        return cls(hypernet, sources, cfg.adapt, max_steps=max(cfg.ablation.step_grid))


def project_along(views: Sequence[np.ndarray]) -> np.ndarray:
    """2-D projections (S, N, 2) of a sequence of representations of the same points, all on the principal axes
    of the first one (fixed axes: movement between steps is the representation adapting, not the projection)."""
    first = np.asarray(views[0], dtype=np.float64)
    mean = first.mean(0)
    _, _, vh = np.linalg.svd(first - mean, full_matrices=False)
    axes = vh[:2].T
    axes = axes * np.sign(axes[np.abs(axes).argmax(0), range(axes.shape[1])])  # a fixed orientation
    return np.stack([(np.asarray(v, dtype=np.float64) - mean) @ axes for v in views])


def explorer_widget(explorer: AdaptationExplorer, *, figsize: tuple[float, float] = (12.0, 3.6)) -> Any:
    """ipywidgets controls (dataset, task, steps, inner lr, inner loss) that redraw the explorer's figure."""
    style = {"description_width": "initial"}
    dataset = w.Dropdown(options=explorer.datasets, value=explorer.dataset, description="dataset", style=style)
    task = w.IntSlider(value=explorer.task, min=0, max=explorer.num_tasks() - 1, description="task",
                       continuous_update=False, style=style)
    steps = w.IntSlider(value=explorer.num_steps, min=0, max=explorer.max_steps, description="inner steps",
                        continuous_update=False, style=style)
    lr = w.FloatLogSlider(value=explorer.inner_lr, base=10, min=np.log10(LR_RANGE[0]), max=np.log10(LR_RANGE[1]),
                          step=0.1, description="step sizes x", continuous_update=False, readout_format=".3g",
                          style=style)
    loss = w.Dropdown(options=list(INNER_LOSSES), value=explorer.inner_loss, description="inner loss", style=style)
    view = w.Image(format="png")  # the figure as a PNG: works in JupyterLab and is inspectable in tests
    readout = w.Label()  # the accuracy as text, beside the figure (screen readers, tests)
    canvas: list[ExplorerFigure] = []  # built on the first draw, then updated in place

    def redraw(change: Any = None) -> None:
        if change is not None and change["owner"] is dataset:
            task.max = explorer.num_tasks(dataset.value) - 1
        state = explorer.set(dataset=dataset.value, task=min(task.value, explorer.num_tasks(dataset.value) - 1),
                             num_steps=steps.value, inner_lr=lr.value, inner_loss=loss.value)
        if not canvas or canvas[0].num_classes != len(state.classes):
            canvas[:] = [ExplorerFigure(state, figsize=figsize)]
        canvas[0].update(state)
        view.value = canvas[0].png()
        readout.value = (f"accuracy {100 * state.current_accuracy:.1f}% after {state.num_steps} inner steps "
                         f"({CANDIDATE_LABELS.get(state.candidate, state.candidate)})")

    for control in (dataset, task, steps, lr, loss):
        control.observe(redraw, names="value")
    redraw()
    return w.VBox([w.HBox([dataset, task, loss]), w.HBox([steps, lr]), readout, view])
