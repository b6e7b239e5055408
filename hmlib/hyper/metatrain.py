"""Meta-training (the outer loop): shifted tasks of varying K, the inner loop in the graph, a label-using outer loss.

:func:`meta_train` reads the meta-training datasets for a replicate seed and calls :func:`fit_hypernet`, which
works on any list of :class:`TaskData` (tests use synthetic data). Each iteration draws an :class:`Episode`
(:mod:`hmlib.hyper.episodes`), adapts each task's generated network with the inner loop kept in the graph, and
scores the result with the task's labels (the only place labels enter): the class-centroid cross-entropy of the
adapted embedding (``meta.outer_loss = 'centroids'``: each image should be nearest its true class's centroid,
i.e. the representation should cluster by class after adaptation) or the aligned cross-entropy of the cluster
head. A stratified validation part of each dataset (:func:`hmlib.protocol.train_val_indices`, held back from
the backbone too), clean and under training shifts, chooses the weights kept. Checkpoints resume and bundle the
VAE and backbone they read through (:mod:`hmlib.hyper.checkpoints`, :mod:`hmlib.hyper.bundle`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hmlib import data, paths
from hmlib.artifacts import (ArtifactError, MissingArtifactError, load_checkpoint, named_path, read_json,
                             save_checkpoint, write_json)
from hmlib.backbone.model import ConvBackbone
from hmlib.config import Config, config_to_dict, resolve_device
from hmlib.hyper.adapt import AdaptResult, adapt, adapt_candidates, features_of, predict_task
from hmlib.hyper.checkpoints import CHECKPOINT_KIND, load_existing, training_settings
from hmlib.hyper.cluster_ops import class_centroid_logits
from hmlib.hyper.episodes import Episode, EpisodeSampler
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.inputs import TaskData, load_task_data
from hmlib.hyper.losses import aligned_cross_entropy, task_accuracy
from hmlib.hyper.selector import FEATURES, chosen_accuracy, fit_selector, oracle_and_fixed
from hmlib.protocol import train_val_indices
from hmlib.reproducibility import seeded
from hmlib.stats import paired, signed
from hmlib.vae.model import VAE
from hmlib.vae.train import make_command

MIN_IMAGES_PER_CLASS = 2  # smallest validation task worth scoring: K * this
CONTEXT_SAMPLE = 2000  # rows per dataset that fix the normalisation of the conditioning


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


def outer_loss(hypernet: HyperNet, result: AdaptResult, labels: torch.Tensor, num_classes: int, kind: str
               ) -> torch.Tensor:
    """The label-using loss after adaptation (the only loss that reads labels): the class-centroid cross-entropy of
    the adapted embedding ('centroids'), the aligned cross-entropy of the adapted cluster head ('aligned'), or their
    sum ('both')."""
    loss = torch.zeros((), device=result.logits[-1].device)
    if kind in ("centroids", "both"):
        z = hypernet.generator.embedding(result.params, result.state)
        logits = class_centroid_logits(z, labels, num_classes, result.params["log_tau"])
        loss = loss + F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    if kind in ("aligned", "both"):
        loss = loss + aligned_cross_entropy(result.logits[-1], labels)
    return loss


def validation_episodes(parts: Sequence[TaskData], sampler: EpisodeSampler, cfg: Config) -> list[Episode]:
    """Fixed validation meta-batches from the held-back parts: K = task.num_classes, clean and under training
    shifts in the proportion meta-training sees them (seeded: the same every evaluation)."""
    rng = np.random.default_rng(1000)
    episodes = []
    K = min(cfg.task.num_classes, *sampler.class_counts)
    for _ in range(max(1, math.ceil(cfg.meta.eval_tasks / cfg.meta.meta_batch_size))):
        episodes.append(sampler.sample(rng, num_classes=K))
    return episodes


@torch.no_grad()
def validation_accuracy(hypernet: HyperNet, episodes: Sequence[Episode], cfg: Config) -> tuple[float, float]:
    """Mean clustering accuracy over the validation tasks before and after the inner steps."""
    before, after = [], []
    for episode in episodes:
        logits = predict_task(hypernet, episode.inputs, cfg.adapt, cfg.adapt.num_inner_steps,  # as meta-trained
                              num_classes=episode.num_classes)  # (S+1, T, N, K)
        before.append(task_accuracy(logits[0], episode.labels))
        after.append(task_accuracy(logits[-1], episode.labels))
    return float(np.concatenate(before).mean()), float(np.concatenate(after).mean())


def _new_history() -> dict[str, list]:
    keys = ["iteration", "outer_loss", "inner_loss_before", "inner_loss_after", "num_classes", "eval_iteration",
            "val_acc_before", "val_acc_after", "blend"]
    return {k: [] for k in keys}


def _optimizer(hypernet: HyperNet, cfg: Config) -> torch.optim.Optimizer:
    """Adam on the hypernetwork; the meta-learned step sizes move 10x faster; the backbone it modulates (its
    embedding, not its training head) at ``meta.backbone_lr``, or frozen when that is 0."""
    groups: dict[str, list] = {"hyper": [], "lrs": [], "backbone": []}
    for name, p in hypernet.named_parameters():
        if name.startswith("generator.backbone."):
            trainable = cfg.meta.backbone_lr > 0 and ".head." not in name
            p.requires_grad_(trainable)
            if trainable:
                groups["backbone"].append(p)
        else:
            groups["lrs" if "log_lrs" in name else "hyper"].append(p)
    return torch.optim.Adam([{"params": groups["hyper"], "lr": cfg.meta.outer_lr},
                             {"params": groups["lrs"], "lr": 10 * cfg.meta.outer_lr},
                             {"params": groups["backbone"], "lr": cfg.meta.backbone_lr}])


def fit_hypernet(cfg: Config, train_sets: Mapping[str, TaskData], *, vae: VAE, seed: int, path: str | Path,
                 backbone: ConvBackbone | None = None, upstream: Mapping[str, Any] | None = None,
                 bundle: Mapping[str, Any] | None = None, train: bool = True, progress: bool = True,
                 device: torch.device | str | None = None) -> MetaResult:
    """Meta-train on ``train_sets`` (name -> TaskData of train splits) on ``device`` (default ``cfg.device``), or
    reuse / resume the checkpoint at ``path``."""
    path = Path(path)
    if not train_sets:
        raise MetaTrainingError("no meta-training datasets (meta.train_datasets is empty)")
    widths = {name: s.context.shape[1] for name, s in train_sets.items()}
    if len(set(widths.values())) != 1:
        raise MetaTrainingError(f"meta-training datasets differ in context widths: {widths}")
    context_dim = next(iter(widths.values()))
    feature_dim = None if cfg.hyper.generation == "film" else context_dim
    # the K of the generated network when none is asked: 'film' clusters into any K (default task.num_classes);
    # 'full' emits exactly the K it is trained for
    K = cfg.task.num_classes if feature_dim is None else cfg.meta.max_classes
    meta = {"kind": CHECKPOINT_KIND, "seed": int(seed), "training": training_settings(cfg),
            "upstream": dict(upstream or {}), "context_dim": int(context_dim), "feature_dim": feature_dim,
            "num_classes": int(K)}
    with seeded(seed):  # initial weights from the replicate's own seed, whatever ran before in this process
        hypernet = HyperNet(cfg, context_dim, K, backbone=None if backbone is None else copy.deepcopy(backbone),
                            feature_dim=feature_dim)
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    hypernet.to(device)  # initialised on the CPU (the same weights on every device), trained here
    optimizer = _optimizer(hypernet, cfg)
    existing = load_existing(path, meta, cfg.meta.retrain)
    if existing is not None and existing[1].get("complete"):
        state, recorded = existing
        hypernet.load_state_dict(state["best_model"])
        print(f"Reusing the finished meta-training checkpoint {path.name} (best validation accuracy "
              f"{recorded['best']['val_acc_after']:.3f} at iteration {recorded['best']['iteration']}).")
        return MetaResult(hypernet.eval(), recorded["history"], path, recorded, reused=True)
    if not train:
        raise MissingArtifactError(f"hypernetwork {path} {'is unfinished' if existing else 'not found'}; make it "
                                   f"with: {make_command(cfg, '03')}")

    parts, held = [], []
    for name, task_data in train_sets.items():
        keep, val = train_val_indices(task_data.labels, cfg)
        parts.append(task_data.subset(keep))
        held.append(task_data.subset(val))
    _check_parts(parts, held, cfg)
    sampler = EpisodeSampler(parts, cfg, vae)
    val_episodes = [e.to(device) for e in validation_episodes(held, EpisodeSampler(held, cfg, vae), cfg)]
    hypernet.set_context_statistics(torch.as_tensor(np.concatenate([p.context[:CONTEXT_SAMPLE] for p in parts])))
    history, start, best = _new_history(), 0, {"iteration": 0, "val_acc_after": -1.0}
    best_state = copy.deepcopy(hypernet.state_dict())
    if existing is not None:  # resume an interrupted run
        state, recorded = existing
        hypernet.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        best_state, history, best = state["best_model"], recorded["history"], recorded["best"]
        start = int(recorded["iteration"])
        print(f"Resuming meta-training from {path.name} at iteration {start}/{cfg.meta.iterations}.")

    def save(iteration: int, complete: bool) -> None:
        state = {"model": hypernet.state_dict(), "best_model": best_state, "optimizer": optimizer.state_dict(),
                 "bundle": dict(bundle or {})}
        save_checkpoint(path, state, {**meta, "config": config_to_dict(cfg), "iteration": iteration,
                                      "total_iterations": cfg.meta.iterations, "complete": complete,
                                      "history": history, "best": best, "device": str(device)})

    def evaluate(iteration: int) -> None:
        nonlocal best_state, best
        hypernet.eval()
        before, after = validation_accuracy(hypernet, val_episodes, cfg)
        history["eval_iteration"].append(iteration)
        history["val_acc_before"].append(before)
        history["val_acc_after"].append(after)
        if after > best["val_acc_after"]:
            best = {"iteration": iteration, "val_acc_after": after, "val_acc_before": before}
            best_state = copy.deepcopy(hypernet.state_dict())
        hypernet.train()

    if start == 0:
        evaluate(0)
    bar = tqdm(range(start, cfg.meta.iterations), desc=f"meta-train seed {seed}", disable=not progress,
               initial=start, total=cfg.meta.iterations)
    hypernet.train()
    for iteration in bar:
        rng = np.random.default_rng([seed, iteration])  # per-iteration stream: resuming replays the same tasks
        episode = sampler.sample(rng).to(device)  # built on the CPU, copied without blocking
        result = adapt(hypernet, episode.inputs, cfg.adapt, create_graph=True, num_classes=episode.num_classes,
                       num_steps=cfg.adapt.num_inner_steps if cfg.meta.use_inner_loop else 0)
        loss = outer_loss(hypernet, result, episode.labels, episode.num_classes, cfg.meta.outer_loss)
        optimizer.zero_grad(set_to_none=True)
        grad_norm = torch.tensor(0.0)
        if torch.isfinite(loss):
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                       cfg.meta.grad_clip)
        if not torch.isfinite(loss) or not torch.isfinite(grad_norm):
            save(iteration, complete=False)  # the weights are still those of the last good step
            raise MetaTrainingError(f"non-finite outer loss or gradient at iteration {iteration}; the last good state "
                                    f"is saved in {path}. Lower meta.outer_lr or the inner step sizes, or use fewer "
                                    "adapt.num_inner_steps")
        optimizer.step()
        history["iteration"].append(iteration + 1)
        history["outer_loss"].append(float(loss.detach()))
        history["num_classes"].append(episode.num_classes)
        losses = [float(v) for v in result.inner_losses]
        history["inner_loss_before"].append(losses[0] if losses else float("nan"))
        history["inner_loss_after"].append(losses[-1] if losses else float("nan"))
        blends = [k for k in result.params if k.startswith("blend.")]
        history["blend"].append([float(result.params[k].detach().mean()) for k in blends])
        done = iteration + 1
        if done % cfg.meta.eval_every == 0 or done == cfg.meta.iterations:
            evaluate(done)
            save(done, complete=False)  # complete only once the test-time selector is fitted, below
        bar.set_postfix(outer=f"{history['outer_loss'][-1]:.3f}", val=f"{history['val_acc_after'][-1]:.3f}")
    bar.close()
    hypernet.load_state_dict(best_state)
    if hypernet.selector.bias.shape[0] > 1 and cfg.meta.selector_episodes > 0:  # a choice to learn
        history["selector"] = fit_selection(hypernet, sampler, val_episodes, cfg, seed)
        best_state = copy.deepcopy(hypernet.state_dict())
    save(cfg.meta.iterations, complete=True)  # (again) with the selector: complete only now
    _, final_meta = load_checkpoint(path)
    return MetaResult(hypernet.eval(), history, path, final_meta)


@torch.no_grad()
def _candidate_table(hypernet: HyperNet, episodes: Sequence[Episode], cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (C, T, F) and accuracies (C, T) of every test-time candidate on the tasks of ``episodes``."""
    features, accuracy = [], []
    for episode in episodes:
        results, _ = adapt_candidates(hypernet, episode.inputs, cfg.adapt, num_classes=episode.num_classes)
        features.append(torch.stack([features_of(hypernet, r) for r in results]))
        accuracy.append(torch.stack([torch.as_tensor(task_accuracy(r.logits[-1], episode.labels)) for r in results]))
    return torch.cat(features, dim=1), torch.cat(accuracy, dim=1).float()


def fit_selection(hypernet: HyperNet, sampler: EpisodeSampler, val_episodes: Sequence[Episode], cfg: Config,
                  seed: int) -> dict[str, float]:
    """Meta-learn when not to adapt: fit the hypernetwork's selector of test-time candidates on fresh episodes of
    the meta-training parts (labels say which candidate was best), keep it only if its choice beats the silhouette
    rule on the validation episodes with a paired 95% interval above zero; returns the figures (validation accuracy
    of each way of choosing, the paired gain and its lower bound)."""
    hypernet.eval()
    rng = np.random.default_rng([seed, 7919])
    episodes = [sampler.sample(rng) for _ in range(cfg.meta.selector_episodes)]
    features, accuracy = _candidate_table(hypernet, episodes, cfg)
    fit_selector(hypernet.selector, features, accuracy)
    val_features, val_accuracy = _candidate_table(hypernet, val_episodes, cfg)
    learned = chosen_accuracy(hypernet.selector(val_features), val_accuracy)
    rule = chosen_accuracy(val_features[..., FEATURES.index("silhouette")], val_accuracy)
    gain = paired(learned.cpu().numpy(), rule.cpu().numpy())  # per validation task, learned minus rule
    figures = {"train_tasks": int(features.shape[1]), "val_tasks": int(val_features.shape[1]),
               "val_learned": float(learned.mean()), "val_silhouette": float(rule.mean()),
               **{f"val_{k}": v for k, v in oracle_and_fixed(val_accuracy).items()},
               "val_gain": gain["mean"], "val_gain_low": gain["low"]}  # low: None with one validation task
    figures["kept"] = float(gain["excludes_zero"] and gain["mean"] > 0)  # a win beyond the noise, not any margin
    if not figures["kept"]:  # the rule stays: an untrained selector scores by the silhouette
        hypernet.selector.fitted.fill_(False)
    print(f"test-time selector: validation accuracy {100 * figures['val_learned']:.1f}% learned vs "
          f"{100 * figures['val_silhouette']:.1f}% silhouette (paired {signed(gain)}; oracle {100 * figures['val_oracle']:.1f}%); "
          f"{'kept' if figures['kept'] else 'the silhouette rule stays'}")
    return figures


def _check_parts(parts: Sequence[TaskData], held: Sequence[TaskData], cfg: Config) -> None:
    """Refuse meta-training data whose classes cannot fill the smallest tasks (one line naming the dataset)."""
    for part, val in zip(parts, held):
        classes = len(np.unique(part.labels))
        if classes < cfg.meta.min_classes:
            raise MetaTrainingError(f"{part.name} has {classes} classes, fewer than meta.min_classes = "
                                    f"{cfg.meta.min_classes}")
        K = min(cfg.task.num_classes, classes)
        size = data.fit_task_size(val.labels, K, cfg.meta.task_images)
        if size < MIN_IMAGES_PER_CLASS * K:
            raise MetaTrainingError(f"the validation part of {part.name} is too small for {K}-class tasks ({size} "
                                    "images); raise meta.val_fraction")


PIPELINE_MANIFEST = "pipeline.json"  # models/pipeline.json: the pipeline's own checkpoint of every replicate seed


def record_pipeline_checkpoint(path: Path, seed: int) -> None:
    """Note a pipeline checkpoint (not an ablation variant) in ``models/pipeline.json``, newest per seed."""
    manifest = paths.models_dir() / PIPELINE_MANIFEST
    try:
        entries = read_json(manifest) if manifest.is_file() else {}
    except ArtifactError:
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    entries[str(int(seed))] = path.name
    write_json(manifest, dict(sorted(entries.items(), key=lambda kv: int(kv[0]))))


def pipeline_checkpoints() -> list[Path]:
    """The pipeline's checkpoints recorded in ``models/pipeline.json``, by seed (none if it is missing or corrupt)."""
    manifest = paths.models_dir() / PIPELINE_MANIFEST
    try:
        entries = read_json(manifest) if manifest.is_file() else {}
        return [paths.models_dir() / Path(entries[k]).name for k in sorted(entries, key=int)]
    except (ArtifactError, AttributeError, KeyError, TypeError, ValueError):
        return []


def recorded_checkpoints(otherwise: str = "") -> list[Path]:
    """The pipeline's checkpoints (:func:`pipeline_checkpoints`) that exist; one recorded but missing while others
    exist is a MissingArtifactError naming it (going on without it would silently drop a replicate seed;
    ``otherwise``: what else the user may do)."""
    recorded = pipeline_checkpoints()
    manifest = paths.models_dir() / PIPELINE_MANIFEST
    if not recorded and manifest.is_file():
        raise MissingArtifactError(f"{manifest} cannot be read as the manifest meta-training writes; re-make it with "
                                   f"`hmlib run --only 03` and the profile of the run{otherwise}")
    missing = [p.name for p in recorded if not p.is_file()]
    if missing and len(missing) < len(recorded):
        raise MissingArtifactError(
            f"models/pipeline.json names {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} missing; "
            f"re-make {'it' if len(missing) == 1 else 'them'} with `hmlib run --only 03` and the profile that made "
            f"the others{otherwise}")
    return [p for p in recorded if p.is_file()]


def meta_train(cfg: Config, seed: int, *, train: bool = True, progress: bool = True,
               folder: str | None = None) -> MetaResult:
    """Meta-train (or reuse / resume) the hypernetwork of a replicate seed on the protocol's datasets (the VAE and
    backbone must exist: notebook 02 makes them; this never trains them); ``folder``
    puts the checkpoint in a subfolder of ``models/`` (notebook 04's re-trained variants: ``ablations``), apart from
    the pipeline's own."""
    from hmlib.hyper.bundle import bundle_for  # the bundle reads the VAE and backbone checkpoints

    # the VAE and backbone are notebook 02's: never trained here (a missing one is a one-line error naming it)
    bundle, models = bundle_for(cfg, seed, train=False, progress=progress)
    train_sets = {d: load_task_data(cfg, d, "train", seed, train=False, progress=progress)
                  for d in cfg.meta.train_datasets}
    upstream = {"ids": {d: s.identity for d, s in train_sets.items()},
                "backbone_id": bundle.get("backbone", {}).get("meta", {}).get("backbone_id")}
    where = paths.models_dir() / folder if folder else paths.models_dir()
    stem = f"{'variant' if folder else 'hypernet'}_seed{seed}"
    path = named_path(where, stem, {"training": training_settings(cfg), "upstream": upstream, "seed": seed})
    result = fit_hypernet(cfg, train_sets, vae=models["vae"], backbone=models.get("backbone"), seed=seed, path=path,
                          upstream=upstream, bundle=bundle, train=train, progress=progress,
                          device=resolve_device(cfg.device))
    if not folder and train:
        record_pipeline_checkpoint(path, seed)
    return result
