"""Meta-training (the outer loop): random K-class tasks, the inner loop in the graph, label-aligned cross-entropy.

:func:`meta_train` reads the meta-training datasets for a setting and replicate seed (:mod:`hmlib.hyper.inputs`;
and calls :func:`fit_hypernet`,
which works on any :class:`TaskData` (tests use synthetic blobs). A stratified validation part of each dataset
(:func:`hmlib.protocol.train_val_indices`, held back from the backbone too) chooses the weights kept: the best
validation accuracy after adaptation, iteration 0 included. Checkpoints ``models/hypernet_<setting>_seed<s>-<hash>.pt``
are resumable and self-describing, and bundle the VAE and backbone they were trained with (:mod:`hmlib.hyper.bundle`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from hmlib import data, paths
from hmlib.artifacts import (ArtifactError, MissingArtifactError, StaleArtifactError, load_checkpoint, named_path,
                             save_checkpoint, set_aside, settings_diff)
from hmlib.config import SETTINGS, Config, ConfigError, config_from_dict, config_to_dict
from hmlib.hyper.adapt import adapt, predict_task
from hmlib.hyper.hypernet import HyperNet, TaskInputs
from hmlib.hyper.inputs import TaskData, load_task_data
from hmlib.hyper.losses import aligned_cross_entropy, inner_loss, task_accuracy
from hmlib.protocol import train_val_indices
from hmlib.reproducibility import seeded
from hmlib.vae.train import make_command

CHECKPOINT_KIND = "hypernet"
MIN_IMAGES_PER_CLASS = 2  # smallest validation task worth scoring: K * this


class MetaTrainingError(ArtifactError):
    """Meta-training cannot go on (non-finite loss, unusable data)."""


@dataclass
class MetaResult:
    """A meta-trained hypernetwork (best validation weights), its history and checkpoint."""

    hypernet: HyperNet
    history: dict[str, list]
    checkpoint_path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    reused: bool = False  # True when a finished matching checkpoint was loaded instead of training


def training_settings(cfg: Config) -> dict[str, Any]:
    """Every config value that changes what meta-training produces (part of the checkpoint's identity)."""
    full = config_to_dict(cfg)
    return {"data": {k: v for k, v in full["data"].items() if k not in ("data_dir", "use_hub")},
            "task": full["task"], "hyper": full["hyper"], "adapt": full["adapt"],
            "meta": {k: v for k, v in full["meta"].items() if k != "retrain"}}


@dataclass
class EvalTasks:
    """Fixed tasks of one dataset for validation: inputs (T, N, ...) and labels (T, N)."""

    name: str
    inputs: TaskInputs
    labels: torch.Tensor


def fixed_tasks(task_data: TaskData, num_tasks: int, num_classes: int, num_images: int, mode: str,
                seed: int) -> EvalTasks:
    """Seeded tasks of ``task_data`` (task size capped so that its smallest classes can fill them)."""
    size = data.fit_task_size(task_data.labels, num_classes, num_images)
    if size < MIN_IMAGES_PER_CLASS * num_classes:
        raise MetaTrainingError(f"the validation part of {task_data.name} is too small for {num_classes}-class tasks "
                                f"({size} images); raise meta.val_fraction")
    batch = data.TaskSampler(task_data.labels, num_classes, size, mode).sample(num_tasks, np.random.default_rng(seed))
    return EvalTasks(task_data.name, task_data.task_inputs(batch.indices), torch.as_tensor(batch.labels))


@torch.no_grad()
def validation_accuracy(hypernet: HyperNet, tasks: list[EvalTasks], cfg: Config) -> tuple[float, float]:
    """Mean clustering accuracy over the validation tasks before and after the inner steps (task-weighted)."""
    scores = []
    for batch in tasks:
        logits = predict_task(hypernet, batch.inputs, cfg.adapt)  # (S+1, T, N, K)
        scores.append((task_accuracy(logits[0], batch.labels), task_accuracy(logits[-1], batch.labels)))
    before = float(np.concatenate([s[0] for s in scores]).mean())
    after = float(np.concatenate([s[1] for s in scores]).mean())
    return before, after


def _task_size(parts: list[TaskData], cfg: Config) -> int:
    """Images per meta-training task: ``task.num_images``, shrunk (with a note) if a dataset's classes are small."""
    K, N = cfg.task.num_classes, cfg.task.num_images
    size = min(data.fit_task_size(part.labels, K, N) for part in parts)
    if size < 2 * K:
        raise MetaTrainingError(f"the smallest classes of the meta-training datasets allow only {size}-image "
                                f"{K}-class tasks; use more images per dataset or fewer classes")
    if size < N:
        print(f"note: the smallest meta-training classes allow {size} images per task, fewer than {N}")
    return size


def _meta_batch(parts: list[TaskData], samplers: list, batch_size: int, rng: np.random.Generator
                ) -> tuple[TaskInputs, torch.Tensor]:
    """``batch_size`` tasks, each from a meta-training dataset drawn at random: inputs (T, N, ...), labels (T, N)."""
    counts = np.bincount(rng.integers(len(parts), size=batch_size), minlength=len(parts))
    inputs, labels = [], []
    for part, sampler, count in zip(parts, samplers, counts):
        if count:
            batch = sampler.sample(int(count), rng)
            inputs.append(part.task_inputs(batch.indices))
            labels.append(torch.as_tensor(batch.labels))
    return (TaskInputs(torch.cat([i.context for i in inputs]), torch.cat([i.features for i in inputs])),
            torch.cat(labels))


def _outer_loss(hypernet: HyperNet, inputs: TaskInputs, labels: torch.Tensor, cfg: Config
                ) -> tuple[torch.Tensor, float, float]:
    """Aligned cross-entropy on every image of the tasks after adapting on them (transductive, as at test time)."""
    result = adapt(hypernet, inputs, cfg.adapt, num_steps=cfg.adapt.num_inner_steps if cfg.meta.use_inner_loop else 0,
                   create_graph=True)
    with torch.no_grad():
        reference = hypernet.prepare(inputs.features).z
        before = float(inner_loss(result.logits[0], reference, cfg.adapt).mean())
        after = float(inner_loss(result.logits[-1], reference, cfg.adapt).mean())
    return aligned_cross_entropy(result.logits[-1], labels), before, after


def _new_history() -> dict[str, list]:
    keys = ["iteration", "outer_loss", "inner_loss_before", "inner_loss_after", "eval_iteration", "val_acc_before",
            "val_acc_after"]
    return {k: [] for k in keys}


def fit_hypernet(cfg: Config, train_sets: Mapping[str, TaskData], *, seed: int, path: str | Path,
                 upstream: Mapping[str, Any] | None = None, setting: str = "zero_shot", bundle: Mapping[str, Any] | None = None,
                 train: bool = True, progress: bool = True) -> MetaResult:
    """Meta-train on ``train_sets`` (name -> TaskData), or reuse / resume the matching checkpoint at ``path``."""
    path = Path(path)
    if not train_sets:
        raise MetaTrainingError("no meta-training datasets (meta.train_datasets is empty)")
    widths = {name: (s.context.shape[1], s.features.shape[1]) for name, s in train_sets.items()}
    if len(set(widths.values())) != 1:
        raise MetaTrainingError(f"meta-training datasets differ in context/feature widths: {widths}")
    (context_dim, feature_dim), K = next(iter(widths.values())), cfg.task.num_classes
    meta = {"kind": CHECKPOINT_KIND, "setting": setting, "seed": int(seed), "training": training_settings(cfg),
            "upstream": dict(upstream or {}), "context_dim": int(context_dim), "feature_dim": int(feature_dim),
            "num_classes": int(K)}
    with seeded(seed):  # initial weights from the replicate's own seed, whatever ran before in this process
        hypernet = HyperNet(cfg.hyper, context_dim, feature_dim, K)
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=cfg.meta.outer_lr)
    state = _load_existing(path, meta, cfg.meta.retrain)
    if state is not None and state[1].get("complete"):
        hypernet.load_state_dict(state[0]["best_model"])
        print(f"Reusing the finished meta-training checkpoint {path.name} (best validation accuracy "
              f"{state[1]['best']['val_acc_after']:.3f} at iteration {state[1]['best']['iteration']}).")
        return MetaResult(hypernet.eval(), state[1]["history"], path, state[1], reused=True)
    if not train:
        raise MissingArtifactError(f"hypernetwork {path} {'is unfinished' if state else 'not found'}; make it with: "
                                   f"{make_command(cfg, '03')}")

    parts, val_tasks = [], []
    per_dataset = max(1, math.ceil(cfg.meta.eval_tasks / len(train_sets)))
    for i, (name, task_data) in enumerate(train_sets.items()):
        keep, held = train_val_indices(task_data.labels, cfg)
        parts.append(task_data.subset(keep))
        val_tasks.append(fixed_tasks(task_data.subset(held), per_dataset, K, cfg.task.num_images, cfg.task.mode,
                                     seed=1000 + i))
    size = _task_size(parts, cfg)
    samplers = [data.TaskSampler(part.labels, K, size, cfg.task.mode) for part in parts]
    history, start, best = _new_history(), 0, {"iteration": 0, "val_acc_after": -1.0}
    best_state = copy.deepcopy(hypernet.state_dict())
    if state is not None:  # resume an interrupted run
        hypernet.load_state_dict(state[0]["model"])
        optimizer.load_state_dict(state[0]["optimizer"])
        best_state, history, best = state[0]["best_model"], state[1]["history"], state[1]["best"]
        start = int(state[1]["iteration"])
        print(f"Resuming meta-training from {path.name} at iteration {start}/{cfg.meta.iterations}.")

    def save(iteration: int, complete: bool) -> None:
        save_checkpoint(path, {"model": hypernet.state_dict(), "best_model": best_state,
                               "optimizer": optimizer.state_dict(), "bundle": dict(bundle or {})},
                        {**meta, "config": config_to_dict(cfg), "iteration": iteration,
                         "total_iterations": cfg.meta.iterations, "complete": complete, "history": history,
                         "best": best})

    def evaluate(iteration: int) -> None:
        nonlocal best_state, best
        hypernet.eval()
        before, after = validation_accuracy(hypernet, val_tasks, cfg)
        history["eval_iteration"].append(iteration)
        history["val_acc_before"].append(before)
        history["val_acc_after"].append(after)
        if after > best["val_acc_after"]:
            best = {"iteration": iteration, "val_acc_after": after, "val_acc_before": before}
            best_state = copy.deepcopy(hypernet.state_dict())
        hypernet.train()

    if start == 0:
        evaluate(0)
    bar = tqdm(range(start, cfg.meta.iterations), desc=f"meta-train {setting} seed {seed}", disable=not progress,
               initial=start, total=cfg.meta.iterations)
    hypernet.train()
    for iteration in bar:
        rng = np.random.default_rng([seed, iteration])  # per-iteration stream: resuming replays the same tasks
        inputs, labels = _meta_batch(parts, samplers, cfg.meta.meta_batch_size, rng)
        loss, inner_before, inner_after = _outer_loss(hypernet, inputs, labels, cfg)
        optimizer.zero_grad(set_to_none=True)
        grad_norm = torch.tensor(0.0)
        if torch.isfinite(loss):
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(hypernet.parameters(), cfg.meta.grad_clip)
        if not torch.isfinite(loss) or not torch.isfinite(grad_norm):
            save(iteration, complete=False)  # the weights are still those of the last good step
            raise MetaTrainingError(f"non-finite outer loss or gradient at iteration {iteration}; the last good state "
                                    f"is saved in {path}. Lower meta.outer_lr or adapt.inner_lr, or use fewer "
                                    "adapt.num_inner_steps")
        optimizer.step()
        history["iteration"].append(iteration + 1)
        for key, value in (("outer_loss", float(loss.detach())), ("inner_loss_before", inner_before),
                           ("inner_loss_after", inner_after)):
            history[key].append(value)
        done = iteration + 1
        if done % cfg.meta.eval_every == 0 or done == cfg.meta.iterations:
            evaluate(done)
            save(done, complete=done == cfg.meta.iterations)
        bar.set_postfix(outer=f"{history['outer_loss'][-1]:.3f}", val=f"{history['val_acc_after'][-1]:.3f}")
    bar.close()
    if start >= cfg.meta.iterations:  # resumed a run that had finished its iterations but not its last save
        save(cfg.meta.iterations, complete=True)
    hypernet.load_state_dict(best_state)
    _, final_meta = load_checkpoint(path)
    return MetaResult(hypernet.eval(), history, path, final_meta)


def _load_existing(path: Path, meta: Mapping[str, Any], retrain: str) -> tuple[dict, dict] | None:
    """A matching checkpoint's (state, meta) to reuse or resume; None to train from scratch (nothing is deleted)."""
    if not path.exists():
        return None
    if retrain == "always":
        moved = set_aside(path, "previous")
        print(f"Retraining on request (meta.retrain='always'); the previous checkpoint is kept as {moved.name}.")
        return None
    expected = {k: meta[k] for k in ("kind", "setting", "seed", "training", "upstream", "context_dim", "feature_dim",
                                     "num_classes")}
    try:
        state, recorded = load_checkpoint(path)
        diffs = settings_diff(recorded, expected)
        if diffs:
            raise StaleArtifactError(f"{path} was made with other settings or inputs:\n  " + "\n  ".join(diffs))
        return state, recorded
    except ArtifactError as err:
        if retrain == "never":
            raise
        moved = set_aside(path, "stale" if isinstance(err, StaleArtifactError) else "corrupt")
        print(f"{path.name} cannot be reused ({str(err).splitlines()[0]}); kept it as {moved.name}, training anew.")
    return None


def meta_train(cfg: Config, setting: str, seed: int, *, train: bool = True, progress: bool = True) -> MetaResult:
    """Meta-train (or reuse / resume) the hypernetwork of a setting and replicate seed on the protocol's datasets."""
    from hmlib.hyper.bundle import bundle_for  # the bundle reads the VAE and backbone checkpoints

    if setting not in SETTINGS:
        raise ConfigError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    train_sets = {d: load_task_data(cfg, d, "train", setting, seed, train=train, progress=progress)
                  for d in cfg.meta.train_datasets}
    upstream = {"ids": {d: s.identity for d, s in train_sets.items()}}
    bundle = bundle_for(cfg, setting, seed, train=train, progress=progress)
    stem = f"hypernet_{setting}_seed{seed}"
    path = named_path(paths.models_dir(), stem, {"training": training_settings(cfg), "upstream": upstream,
                                                  "setting": setting, "seed": seed})
    return fit_hypernet(cfg, train_sets, seed=seed, path=path, upstream=upstream, setting=setting, bundle=bundle,
                        train=train, progress=progress)


def load_hypernet(path: str | Path) -> tuple[HyperNet, dict[str, Any]]:
    """Rebuild a meta-trained hypernetwork (its best validation weights) from a checkpoint, in eval mode."""
    state, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND or "config" not in meta:
        raise ArtifactError(f"{path} is not a hypernetwork checkpoint (kind={meta.get('kind')!r})")
    cfg = config_from_dict(meta["config"])
    hypernet = HyperNet(cfg.hyper, int(meta["context_dim"]), int(meta["feature_dim"]), int(meta["num_classes"]))
    try:
        hypernet.load_state_dict(state["best_model"])
    except (RuntimeError, KeyError) as err:
        raise ArtifactError(f"{path} does not fit this hmlib's HyperNet ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); retrain it") from err
    return hypernet.eval(), meta
