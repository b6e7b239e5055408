"""Meta-training (the outer loop): random K-class tasks, the inner loop in the graph, aligned cross-entropy.

:func:`meta_train` loads the meta-training datasets' latents for a setting and calls :func:`fit_hypernet`,
which works on any latent arrays (tests use synthetic blobs). Checkpoints are self-describing and
resumable: ``models/hypernet_<setting>_seed<k>.pt`` holds the current and the best (validation-selected)
weights, the optimizer state, the history and every setting plus the VAE identity of the latents.
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

from hmlib import paths
from hmlib.adapt import adapt, aligned_cross_entropy, inner_loss, predict_task, task_accuracy
from hmlib.artifacts import ArtifactError, StaleArtifactError, load_checkpoint, save_checkpoint
from hmlib.config import Config, config_from_dict, config_to_dict
from hmlib.hypernet import HyperNet, TaskInputs, target_forward
from hmlib.reproducibility import seeded

SETTINGS = ("zero_shot", "transductive")
CHECKPOINT_KIND = "hypernet"
MIN_IMAGES_PER_CLASS = 2  # smallest validation task worth scoring: K * this


class MetaTrainingError(RuntimeError):
    """Meta-training cannot go on (non-finite loss, unusable data)."""


@dataclass
class MetaResult:
    """A meta-trained hypernetwork (best validation weights), its history and checkpoint."""

    hypernet: HyperNet
    history: dict[str, list]
    checkpoint_path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    reused: bool = False  # True when a finished matching checkpoint was loaded instead of training


@dataclass
class LatentArrays:
    """Latents of one dataset split as tensors (what the outer loop samples tasks from)."""

    name: str
    mu: torch.Tensor  # (n, d)
    logvar: torch.Tensor  # (n, d)
    labels: np.ndarray  # (n,)
    pixels: torch.Tensor | None = None  # (n, 784) uint8, only for target_input "latent+pixels"

    @classmethod
    def from_latent_set(cls, latents: Any, index: np.ndarray | None = None) -> "LatentArrays":
        """From a hmlib.latents.LatentSet (optionally only the rows in ``index``); uses ``latents.pixels`` if set."""
        index = np.arange(len(latents.labels)) if index is None else index
        pixels = getattr(latents, "pixels", None)
        if pixels is not None:
            pixels = torch.as_tensor(np.asarray(pixels).reshape(len(latents.labels), -1)[index])
        return cls(latents.name, torch.as_tensor(np.asarray(latents.mu)[index]).float(),
                   torch.as_tensor(np.asarray(latents.logvar)[index]).float(), np.asarray(latents.labels)[index],
                   pixels)

    def task_inputs(self, indices: np.ndarray) -> TaskInputs:
        """TaskInputs for a (T, N) index array (pixels as floats in [0, 1] when present)."""
        idx = torch.as_tensor(indices)
        return TaskInputs(self.mu[idx], self.logvar[idx], None if self.pixels is None else _as_unit(self.pixels[idx]))


def _as_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or float) pixels -> float32 in [0, 1]."""
    return pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()


def checkpoint_path(setting: str, seed: int, name: str | None = None) -> Path:
    """``models/<name>.pt``, by default ``models/hypernet_<setting>_seed<k>.pt``."""
    return paths.models_dir() / f"{name or f'hypernet_{setting}_seed{seed}'}.pt"


def training_settings(cfg: Config) -> dict[str, Any]:
    """Every config value that changes what meta-training produces (the checkpoint's identity)."""
    full = config_to_dict(cfg)
    data = {k: v for k, v in full["data"].items() if k not in ("data_dir", "use_hub")}
    meta = {k: v for k, v in full["meta"].items() if k != "retrain"}
    return {"data": data, "task": full["task"], "vae": full["vae"], "hyper": full["hyper"], "adapt": full["adapt"],
            "meta": meta}


# -------------------------------------------------------------------------------------- task sampling
def _task_sampler(labels: np.ndarray, num_classes: int, num_images: int, mode: str):
    from hmlib.data import TaskSampler

    return TaskSampler(labels, num_classes, num_images, mode=mode)


def _shuffled(indices: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle each task's images (so support and query are random halves whatever the sampler's order)."""
    order = np.argsort(rng.random(indices.shape), axis=1)
    return np.take_along_axis(indices, order, 1), np.take_along_axis(labels, order, 1)


@dataclass
class EvalTasks:
    """Fixed tasks of one dataset for validation/monitoring: inputs (T, N, d) and labels (T, N)."""

    name: str
    inputs: TaskInputs
    labels: torch.Tensor


def fixed_tasks(data: LatentArrays, num_tasks: int, num_classes: int, num_images: int, mode: str,
                seed: int) -> EvalTasks:
    """Seeded tasks of ``data`` (task size capped so that the smallest classes can fill them)."""
    from hmlib.data import fit_task_size

    size = fit_task_size(data.labels, num_classes, num_images)
    if size < MIN_IMAGES_PER_CLASS * num_classes:
        raise MetaTrainingError(f"validation part of {data.name} is too small for {num_classes}-class tasks "
                                f"({size} images); raise meta.val_fraction")
    batch = _task_sampler(data.labels, num_classes, size, mode).sample(num_tasks, np.random.default_rng(seed))
    return EvalTasks(data.name, data.task_inputs(np.asarray(batch.indices)), torch.as_tensor(batch.labels))


@torch.no_grad()
def _accuracy_before_after(hypernet: HyperNet, tasks: EvalTasks, cfg: Config) -> tuple[float, float]:
    """Mean clustering accuracy of the fixed tasks before and after the inner steps."""
    logits = predict_task(hypernet, tasks.inputs, cfg.adapt)  # (S+1, T, N, K)
    return float(task_accuracy(logits[0], tasks.labels).mean()), float(task_accuracy(logits[-1], tasks.labels).mean())


# --------------------------------------------------------------------------------------- the outer loop
def _new_history() -> dict[str, list]:
    keys = ["iteration", "outer_loss", "inner_loss_before", "inner_loss_after", "eval_iteration",
            "val_acc_before", "val_acc_after", "monitor_acc_before", "monitor_acc_after"]
    return {k: [] for k in keys}


def _support_query_sizes(parts: list[LatentArrays], cfg: Config) -> tuple[int, int]:
    """Support and query sizes per task: the configured ones, shrunk (with a note) if a dataset's classes are small."""
    from hmlib.data import fit_task_size

    N, Q, K = cfg.task.num_images, cfg.meta.query_size, cfg.task.num_classes
    capacity = min(fit_task_size(part.labels, K, N + Q) for part in parts)
    if capacity >= N + Q:
        return N, Q
    if capacity < 2 * K:
        raise MetaTrainingError(f"the smallest classes of the meta-training datasets allow only {capacity}-image "
                                f"{K}-class tasks; use more images per dataset or fewer classes")
    num_query = max(K, round(capacity * Q / (N + Q)))
    print(f"note: the smallest meta-training classes allow {capacity} images per task, fewer than "
          f"{N} support + {Q} query; training with {capacity - num_query} support + {num_query} query images")
    return capacity - num_query, num_query


def _meta_batch(datasets: list[LatentArrays], samplers: list, meta_cfg: Any, num_support: int,
                rng: np.random.Generator) -> tuple[TaskInputs, TaskInputs, torch.Tensor, torch.Tensor]:
    """Sample meta_batch_size tasks: support (T, N, d), query (T, Q, d) inputs, query (T, Q) and support labels."""
    T, N = meta_cfg.meta_batch_size, num_support
    if meta_cfg.task_mixing == "single":
        counts = np.zeros(len(datasets), dtype=np.int64)
        counts[rng.integers(len(datasets))] = T
    else:
        counts = np.bincount(rng.integers(len(datasets), size=T), minlength=len(datasets))
    parts, labels = [], []
    for data, sampler, count in zip(datasets, samplers, counts):
        if count == 0:
            continue
        batch = sampler.sample(int(count), rng)
        indices, task_labels = _shuffled(np.asarray(batch.indices), np.asarray(batch.labels), rng)
        parts.append(data.task_inputs(indices))
        labels.append(torch.as_tensor(task_labels))
    mu, logvar, label = torch.cat([p.mu for p in parts]), torch.cat([p.logvar for p in parts]), torch.cat(labels)
    pixels = None if parts[0].pixels is None else torch.cat([p.pixels for p in parts])
    support = TaskInputs(mu[:, :N], logvar[:, :N], None if pixels is None else pixels[:, :N])
    query = TaskInputs(mu[:, N:], logvar[:, N:], None if pixels is None else pixels[:, N:])
    return support, query, label[:, N:], label[:, :N]


def _outer_step(hypernet: HyperNet, support: TaskInputs, query: TaskInputs, query_labels: torch.Tensor,
                cfg: Config, support_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, float, float]:
    """Outer loss on the query (and the support if meta.outer_batch says so) after adapting on the support."""
    num_steps = cfg.adapt.num_inner_steps if cfg.meta.use_inner_loop else 0
    result = adapt(hypernet, support, cfg.adapt, num_steps=num_steps, create_graph=True)
    query_logits = target_forward(result.target_params, hypernet.target_features(query))
    with torch.no_grad():
        reference = hypernet.target_features(support)[..., : hypernet.latent_dim]
        before = float(inner_loss(result.logits[0], reference, cfg.adapt).mean())
        after = float(inner_loss(result.logits[-1], reference, cfg.adapt).mean())
    if cfg.meta.outer_batch == "support+query":
        query_logits = torch.cat([result.logits[-1], query_logits], dim=1)
        query_labels = torch.cat([support_labels, query_labels], dim=1)
    return aligned_cross_entropy(query_logits, query_labels), before, after


def fit_hypernet(cfg: Config, train_sets: Mapping[str, Any], *, seed: int, path: str | Path,
                 upstream: Mapping[str, Any] | None = None, monitor_set: Any | None = None,
                 setting: str = "zero_shot", progress: bool = True) -> MetaResult:
    """Meta-train on LatentSet-like ``train_sets`` (name -> object with mu, logvar, labels); resumable.

    A stratified ``meta.val_fraction`` of each set is held back for model selection (accuracy after
    adaptation on ``meta.eval_tasks`` fixed tasks). ``monitor_set`` (the held-out dataset's train
    split) is only logged. ``upstream`` (e.g. VAE ids) goes into the checkpoint's identity.
    """
    from hmlib.data import stratified_split

    path = Path(path)
    if not train_sets:
        raise MetaTrainingError("no meta-training datasets (meta.train_datasets is empty)")
    latent_dims = {name: np.asarray(s.mu).shape[1] for name, s in train_sets.items()}
    if len(set(latent_dims.values())) != 1:
        raise MetaTrainingError(f"meta-training latents differ in dimension: {latent_dims}")
    latent_dim, K = next(iter(latent_dims.values())), cfg.task.num_classes
    meta = {"kind": CHECKPOINT_KIND, "setting": setting, "seed": int(seed), "training": training_settings(cfg),
            "upstream": dict(upstream or {}), "latent_dim": int(latent_dim), "num_classes": int(K)}

    hypernet = HyperNet(cfg.hyper, latent_dim, K)
    state = _load_existing(path, meta, cfg.meta.retrain)
    if state is not None and state[1].get("complete"):
        hypernet.load_state_dict(state[0]["best_model"])
        hypernet.eval()
        print(f"Reusing the finished meta-training checkpoint {path} (iteration {state[1]['iteration']}, "
              f"best validation accuracy {state[1]['best']['val_acc_after']:.3f}).")
        return MetaResult(hypernet, state[1]["history"], path, state[1], reused=True)

    with seeded(seed):  # initial weights from the run's own seed, whatever ran before in this process
        hypernet = HyperNet(cfg.hyper, latent_dim, K)
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=cfg.meta.outer_lr)
    train_parts, val_tasks = [], []
    for i, (name, latents) in enumerate(train_sets.items()):
        keep, held = stratified_split(np.asarray(latents.labels), cfg.meta.val_fraction, cfg.meta.seed)
        train_parts.append(LatentArrays.from_latent_set(latents, keep))
        per_dataset = max(1, math.ceil(cfg.meta.eval_tasks / len(train_sets)))
        val_tasks.append(fixed_tasks(LatentArrays.from_latent_set(latents, held), per_dataset, K, cfg.task.num_images,
                                     cfg.task.mode, seed=cfg.meta.seed + i))
    num_support, num_query = _support_query_sizes(train_parts, cfg)
    samplers = [_task_sampler(part.labels, K, num_support + num_query, cfg.task.mode) for part in train_parts]
    monitor = None if monitor_set is None else fixed_tasks(
        LatentArrays.from_latent_set(monitor_set), cfg.meta.eval_tasks, K, cfg.task.num_images, cfg.task.mode,
        seed=cfg.meta.seed + 1000)

    history, start, best = _new_history(), 0, {"iteration": 0, "val_acc_after": -1.0}
    best_state = copy.deepcopy(hypernet.state_dict())
    if state is not None:  # resume an interrupted run
        hypernet.load_state_dict(state[0]["model"])
        optimizer.load_state_dict(state[0]["optimizer"])
        best_state, history, best = state[0]["best_model"], state[1]["history"], state[1]["best"]
        start = int(state[1]["iteration"])
        print(f"Resuming meta-training from {path} at iteration {start}/{cfg.meta.iterations}.")

    def save(iteration: int, complete: bool) -> None:
        save_checkpoint(path, {"model": hypernet.state_dict(), "best_model": best_state,
                               "optimizer": optimizer.state_dict()},
                        {**meta, "config": config_to_dict(cfg), "iteration": iteration,
                         "total_iterations": cfg.meta.iterations, "complete": complete, "history": history,
                         "best": best, "vae_id": _single_vae_id(upstream)})

    def evaluate(iteration: int) -> None:
        nonlocal best_state, best
        hypernet.eval()
        scores = [_accuracy_before_after(hypernet, tasks, cfg) for tasks in val_tasks]
        weights = [len(t.labels) for t in val_tasks]
        before = float(np.average([s[0] for s in scores], weights=weights))
        after = float(np.average([s[1] for s in scores], weights=weights))
        history["eval_iteration"].append(iteration)
        history["val_acc_before"].append(before)
        history["val_acc_after"].append(after)
        mon = _accuracy_before_after(hypernet, monitor, cfg) if monitor is not None else (float("nan"),) * 2
        history["monitor_acc_before"].append(mon[0])
        history["monitor_acc_after"].append(mon[1])
        if after > best["val_acc_after"]:
            best = {"iteration": iteration, "val_acc_after": after, "val_acc_before": before}
            best_state = copy.deepcopy(hypernet.state_dict())
        hypernet.train()

    if start == 0:
        evaluate(0)
    bar = tqdm(range(start, cfg.meta.iterations), desc=f"meta-train {setting} seed {seed}", disable=not progress,
               initial=start, total=cfg.meta.iterations)
    running: dict[str, float] = {}
    hypernet.train()
    for iteration in bar:
        rng = np.random.default_rng([seed, iteration])  # per-iteration stream: resuming replays the same tasks
        support, query, query_labels, support_labels = _meta_batch(train_parts, samplers, cfg.meta, num_support, rng)
        loss, inner_before, inner_after = _outer_step(hypernet, support, query, query_labels, cfg, support_labels)
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(hypernet.parameters(), cfg.meta.grad_clip)
        if not torch.isfinite(loss) or not torch.isfinite(grad_norm):
            save(iteration, complete=False)  # the weights are still those of the last good step
            raise MetaTrainingError(
                f"non-finite outer loss or gradient at iteration {iteration} (loss {float(loss.detach()):.4g}); the last good "
                f"state is saved in {path} (iteration {iteration}). Lower meta.outer_lr or adapt.inner_lr, "
                "or use fewer adapt.num_inner_steps")
        optimizer.step()
        for key, value in (("outer_loss", float(loss.detach())), ("inner_loss_before", inner_before),
                           ("inner_loss_after", inner_after)):
            history[key].append(value)
            running[key] = value if key not in running else 0.95 * running[key] + 0.05 * value
        history["iteration"].append(iteration + 1)
        done = iteration + 1
        if done % cfg.meta.eval_every == 0 or done == cfg.meta.iterations:
            evaluate(done)
            save(done, complete=done == cfg.meta.iterations)
            bar.set_postfix(outer=f"{running['outer_loss']:.3f}", inner=f"{running['inner_loss_after']:.3f}",
                            val=f"{history['val_acc_after'][-1]:.3f}")
        elif done % 10 == 0:
            bar.set_postfix(outer=f"{running['outer_loss']:.3f}", inner=f"{running['inner_loss_after']:.3f}",
                            val=f"{history['val_acc_after'][-1]:.3f}")
    bar.close()
    if start >= cfg.meta.iterations:  # resumed a run that had finished its iterations but not its last save
        save(cfg.meta.iterations, complete=True)
    hypernet.load_state_dict(best_state)
    hypernet.eval()
    _, final_meta = load_checkpoint(path)
    return MetaResult(hypernet, history, path, final_meta)


def _single_vae_id(upstream: Mapping[str, Any] | None) -> Any:
    """One VAE id if every meta-training dataset was encoded by the same VAE (zero-shot), else the mapping."""
    ids = dict((upstream or {}).get("vae_ids", {}))
    values = set(ids.values())
    return values.pop() if len(values) == 1 else ids


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a.b.c': leaf}."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def settings_diff(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """'key.sub: recorded X, expected Y' for every leaf setting that differs (JSON-normalised)."""
    import json

    have = _flatten({k: recorded.get(k, "<absent>") for k in expected})
    want = _flatten(dict(expected))
    norm = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
    return [f"{key}: recorded {norm(have.get(key, '<absent>'))}, expected {norm(want.get(key, '<absent>'))}"
            for key in sorted(set(have) | set(want)) if norm(have.get(key, "<absent>")) != norm(want.get(key, "<absent>"))]


def _load_existing(path: Path, meta: Mapping[str, Any], retrain: str) -> tuple[dict, dict] | None:
    """A matching checkpoint's (state, meta) to reuse or resume; None to train from scratch."""
    if retrain == "always" or not path.exists():
        return None
    expected = {k: meta[k] for k in ("kind", "setting", "seed", "training", "upstream", "latent_dim", "num_classes")}
    try:
        state, recorded = load_checkpoint(path)
        diffs = settings_diff(recorded, expected)
        if diffs:
            raise StaleArtifactError(f"{path} was made with other settings or inputs:\n  " + "\n  ".join(diffs))
        return state, recorded
    except StaleArtifactError as err:
        if retrain == "never":
            raise StaleArtifactError(f"{err}\nmeta.retrain='never': delete the checkpoint, pass another name, "
                                     "or set meta.retrain='auto' to retrain") from err
        print(f"Retraining: the existing checkpoint does not match these settings.\n{err}")
    except ArtifactError as err:
        if retrain == "never":
            raise
        print(f"Retraining: {err}")
    return None


def meta_train(cfg: Config, setting: str, seed: int, *, name: str | None = None, progress: bool = True) -> MetaResult:
    """Meta-train (or reuse / resume) the hypernetwork for a setting and seed on the protocol's datasets."""
    from hmlib.latents import get_latents

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    train_sets = {ds: get_latents(cfg, ds, "train", setting, progress=progress) for ds in cfg.meta.train_datasets}
    monitor_set = None
    if cfg.meta.test_datasets:  # the held-out dataset's TRAIN split: monitoring only, never its test split
        monitor_set = get_latents(cfg, cfg.meta.test_datasets[0], "train", setting, progress=progress)
    if cfg.hyper.target_input == "latent+pixels":
        train_sets = {ds: with_pixels(cfg, latents) for ds, latents in train_sets.items()}
        monitor_set = None if monitor_set is None else with_pixels(cfg, monitor_set)
    upstream = {"vae_ids": {ds: s.vae_id for ds, s in train_sets.items()}}
    return fit_hypernet(cfg, train_sets, seed=seed, path=checkpoint_path(setting, seed, name), upstream=upstream,
                        monitor_set=monitor_set, setting=setting, progress=progress)


def with_pixels(cfg: Config, latents: Any) -> Any:
    """The latents plus their split's images as ``pixels`` (n, 784) uint8 (target_input 'latent+pixels')."""
    import dataclasses

    from hmlib.data import load_split

    images = load_split(latents.name, latents.split, cfg.data, progress=False)
    if not np.array_equal(np.asarray(images.labels), np.asarray(latents.labels)):
        raise StaleArtifactError(f"the latents of {latents.name}/{latents.split} do not line up with its images; "
                                 "delete the latent cache to re-encode")
    pixels = images.images.reshape(len(images.images), -1)
    if dataclasses.is_dataclass(latents):
        latents = dataclasses.replace(latents)
    latents.pixels = pixels
    return latents


def load_hypernet(path: str | Path) -> tuple[HyperNet, dict[str, Any]]:
    """Rebuild a meta-trained hypernetwork (its best validation weights) from a checkpoint, in eval mode."""
    state, meta = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND or "config" not in meta:
        raise ArtifactError(f"{path} is not a hypernetwork checkpoint (kind={meta.get('kind')!r})")
    cfg = config_from_dict(meta["config"])
    hypernet = HyperNet(cfg.hyper, int(meta["latent_dim"]), int(meta["num_classes"]))
    try:
        hypernet.load_state_dict(state["best_model"])
    except (RuntimeError, KeyError) as err:
        raise ArtifactError(f"{path} does not fit this hmlib's HyperNet ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); retrain it") from err
    hypernet.eval()
    return hypernet, meta


def headline_rows(results: Mapping[str, Mapping[str, Any]], num_images: int | None = None) -> list[dict[str, Any]]:
    """Flat headline rows (percent, rounded) from evaluate_setting results per setting, at one task size."""
    rows = []
    for result in results.values():
        sizes = [int(n) for n in result["sizes"]]
        size = max(sizes) if num_images is None else int(num_images)
        for row in result["sizes"][str(size)]["summary"]:
            flat = {"setting": row["setting"], "dataset": row["dataset"], "N": row["num_images"],
                    "tasks": row["num_tasks"], "method": row["label"],
                    "accuracy %": round(100 * row["accuracy"], 1), "95% CI": round(100 * row["ci"], 1),
                    "ms / task": None if row.get("ms_per_task") is None else round(row["ms_per_task"], 1)}
            if "gain" in row:
                flat["gain, points"] = round(100 * row["gain"], 1)
                flat["gain 95% CI"] = round(100 * row["gain_ci"], 1)
                flat["seeds"] = row.get("num_seeds")
            rows.append(flat)
    return rows
