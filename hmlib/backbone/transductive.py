"""Transductive: adapt the backbone to a held-out dataset from its unlabeled train split (never its labels).

The recipe is SCAN's first stage (Van Gansbeke et al., ECCV 2020) on top of the meta-training backbone:
nearest neighbours are mined once in the backbone's embedding of up to ``transductive.max_images`` unlabeled
train images; then the backbone and a ``transductive.clusters``-way clustering head are trained so that an
augmented image and one of its neighbours (augmented too) get the same soft assignment, with an entropy term
that keeps every cluster in use. The normalisation statistics are re-estimated on the same images first (AdaBN)
and kept up to date during training. ``transductive.epochs = 0`` is the statistics-only variant.

When not to adapt (:func:`gate`): on data the backbone already knows, SCAN's 20-way over-clustering reorganises an
embedding that was right (default backbone on math_shapes: k-means 77.5% -> 63.0%, K = 4 and 8 averaged). The default
rule (``transductive.gate = "confidence"``) declines the adaptation where the backbone recognises the dataset's
unlabeled train images as its training classes: the mean largest softmax probability of its training head is at
least ``transductive.gate_confidence`` beyond the noise (a t-interval over several subsamples); then the backbone is
used as trained. ``"silhouette"`` (the rule chosen with the cross-entropy backbone) declines it where k-means with
``transductive.gate_clusters`` clusters separates the images less clearly after adaptation; on the contrastive
backbone it also declines adaptations that pay (docs/METHOD.md). ``"off"`` always uses the adaptation.

Checkpoints ``models/backbone_seed<s>_on-<dataset>-<hash>.pt`` are self-describing (settings, the identity of the
backbone they started from, the dataset's fingerprint), reused only when all of them match, written after every
epoch and resumed when interrupted. The test split is never read here; ``curve_tasks`` (a report-only curve of
k-means accuracy on the test split's tasks after every epoch) reads labels for scoring only and changes nothing.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from tqdm.auto import tqdm

from hmlib import data, paths
from hmlib.artifacts import (ArtifactError, MissingArtifactError, StaleArtifactError, load_checkpoint, named_path,
                             save_checkpoint, set_aside, settings_diff, state_fingerprint)
from hmlib.backbone.embeddings import embed_images, training_confidence
from hmlib.backbone.model import ConvBackbone, augment
from hmlib.backbone.train import adapt_batchnorm, backbone_from_state, nt_xent, projection_head
from hmlib.config import Config, config_to_dict, resolve_device
from hmlib.features import images_to_tensor, normalize_task_np, to_device
from hmlib.reproducibility import seeded
from hmlib.stats import mean_ci
from hmlib.vae.train import make_command

EPS = 1e-8
KIND = "transductive_backbone"
GATE_SEED = 0  # the gate's subsamples
_DECISIONS: dict[tuple, dict[str, Any]] = {}  # gate decisions made in this process (deterministic; a few s each)


def transductive_identity(cfg: Config, backbone_meta: dict[str, Any], image_set: Any) -> dict[str, Any]:
    """Everything that makes two adapted backbones different: settings, the starting backbone, the images."""
    settings = config_to_dict(cfg.transductive)
    # what reads an adaptation, not what makes it
    for name in ("retrain", "gate", "gate_clusters", "gate_images", "gate_repeats"):
        settings.pop(name)
    if not settings["contrastive"]:  # SCAN's loss only: the identity of every adaptation made before the option
        settings.pop("contrastive")
    return {"kind": KIND, "settings": settings, "backbone_id": backbone_meta["backbone_id"],
            "dataset": image_set.name, "data_fingerprint": image_set.fingerprint}


def evenly_spaced(count: int, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` of ``count`` items, evenly spaced from the first to the last."""
    return np.linspace(0, count - 1, min(count, limit)).astype(np.int64)


def adaptation_images(cfg: Config, image_set: Any) -> np.ndarray:
    """A deterministic, evenly spaced sample of at most ``transductive.max_images`` unlabeled train images."""
    images = image_set.images
    if len(images) <= cfg.transductive.max_images:
        return images
    return images[evenly_spaced(len(images), cfg.transductive.max_images)]


def gate_samples(cfg: Config, count: int) -> list[np.ndarray]:
    """``transductive.gate_repeats`` random subsamples (indices, each of at most ``transductive.gate_images``) of
    ``count`` unlabeled images for :func:`gate`, drawn among those outside the adaptation sample (among all of them
    when the sample is the whole set); deterministic."""
    tc = cfg.transductive
    pool = np.arange(count)
    if count > tc.max_images:
        pool = np.setdiff1d(pool, evenly_spaced(count, tc.max_images))
    rng = np.random.default_rng(GATE_SEED)
    return [np.sort(rng.choice(pool, min(len(pool), tc.gate_images), replace=False)) for _ in range(tc.gate_repeats)]


def coarse_silhouette(embedding: np.ndarray, clusters: int, seed: int = 0) -> float:
    """Silhouette of k-means (``clusters`` clusters, 3 restarts) on the standardised, L2-normalised rows of an
    embedding (-1 where k-means finds fewer than two clusters)."""
    z = normalize_task_np(embedding, l2=True)
    found = KMeans(n_clusters=min(clusters, len(z) - 1), n_init=3, random_state=seed).fit_predict(z)
    return float(silhouette_score(z, found)) if len(np.unique(found)) > 1 else -1.0


def recognised(confidences: np.ndarray, threshold: float) -> tuple[float, float | None, bool]:
    """The confidence rule's verdict from the mean confidence of each subsample: ``(mean, half-width of its 95%
    t-interval, declined)``, declined where the whole interval lies at or above ``threshold`` (never on one
    subsample: no interval)."""
    mean, half = mean_ci(np.asarray(confidences, dtype=np.float64))
    return mean, half, half is not None and mean - half >= threshold


def decides_before_adapting(cfg: Config) -> bool:
    """Whether :func:`gate` reads only the starting backbone (``"confidence"``, ``"off"``): then it can be asked
    before the adaptation is trained, and a declined one need not be trained at all."""
    return cfg.transductive.gate != "silhouette"


def gate(cfg: Config, start: ConvBackbone, adapted: ConvBackbone | None, images: np.ndarray) -> dict[str, Any]:
    """Whether to use ``adapted`` rather than ``start`` on this unlabeled set (label-free): ``{"rule", "kept":
    "adapted" | "start", ...}``, measured on each of :func:`gate_samples` and declined only beyond the noise (a 95%
    t-interval over the subsamples, the standard the meta-learned selector is held to). ``transductive.gate``:

    - ``"confidence"``: declined where the starting backbone already recognises the images as its training classes:
      the mean of :func:`~hmlib.backbone.embeddings.training_confidence` is at least ``transductive.gate_confidence``
      (:func:`recognised`; ``adapted`` is not read and may be None, :func:`decides_before_adapting`);
    - ``"silhouette"``: declined where k-means with ``transductive.gate_clusters`` clusters separates the images less
      clearly after adaptation: the change of :func:`coarse_silhouette` (each subsample with its own k-means
      restarts) is below zero.
    """
    tc = cfg.transductive
    if tc.gate == "off":
        return {"rule": "off", "kept": "adapted"}
    samples = gate_samples(cfg, len(images))
    used = np.unique(np.concatenate(samples))  # each image embedded once; samples index into these rows
    positions = [np.searchsorted(used, sample) for sample in samples]
    if tc.gate == "confidence":
        confidence = training_confidence(start, images[used])
        mean, half, declined = recognised(np.array([confidence[p].mean() for p in positions]), tc.gate_confidence)
        return {"rule": "confidence", "threshold": tc.gate_confidence, "images": int(len(samples[0])),
                "repeats": len(samples), "confidence": float(mean),
                "confidence_ci": [None if half is None else mean - half, None if half is None else mean + half],
                "kept": "start" if declined else "adapted"}
    scores = {}
    for name, model in (("before", start), ("after", adapted)):
        rows = embed_images(model, images[used])
        scores[name] = np.array([coarse_silhouette(rows[p], tc.gate_clusters, seed=r) for r, p in enumerate(positions)])
    mean, half = mean_ci(scores["after"] - scores["before"])
    declined = half is not None and mean + half < 0
    return {"rule": "silhouette", "clusters": tc.gate_clusters, "images": int(len(samples[0])),
            "repeats": len(samples), "before": float(scores["before"].mean()), "after": float(scores["after"].mean()),
            "change_ci": [None if half is None else mean - half, None if half is None else mean + half],
            "kept": "start" if declined else "adapted"}


def gate_message(name: str, decision: dict[str, Any]) -> str:
    """One line saying that an adaptation was declined, and why."""
    if decision["rule"] == "confidence":
        return (f"{name}: not using the adaptation: the backbone already recognises these images as its training "
                f"classes (mean confidence {decision['confidence']:.3f} >= transductive.gate_confidence "
                f"{decision['threshold']:.3f}, beyond the noise); the backbone is used as trained")
    return (f"{name}: not using the adaptation: k-means separates the unlabeled images less clearly after it "
            f"(silhouette {decision['before']:.3f} -> {decision['after']:.3f}, beyond the noise); the backbone is "
            "used as trained")


def mine_neighbours(backbone: ConvBackbone, images: np.ndarray, k: int, batch: int = 2048) -> np.ndarray:
    """Indices (n, k) of every image's k nearest neighbours (cosine, in the backbone's standardised embedding)."""
    z = torch.as_tensor(embed_images(backbone, images)).to(next(backbone.parameters()).device)
    z = F.normalize((z - z.mean(0)) / (z.std(0) + 1e-5), dim=-1)
    out = []
    for start in range(0, len(z), batch):
        sim = z[start:start + batch] @ z.T
        rows = torch.arange(sim.shape[0], device=z.device)
        sim[rows, rows + start] = -float("inf")
        out.append(sim.topk(k, dim=-1).indices)
    return torch.cat(out).cpu().numpy()


def scan_loss(logits: torch.Tensor, partner_logits: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """SCAN: -log <p(x), p(neighbour)> averaged over the batch, minus entropy_weight * entropy of the mean p."""
    p, q = torch.softmax(logits, -1), torch.softmax(partner_logits, -1)
    consistency = -torch.log((p * q).sum(-1) + EPS).mean()
    mean = p.mean(0)
    return consistency + entropy_weight * (mean * torch.log(mean + EPS)).sum()


def train_transductive(backbone: ConvBackbone, images: np.ndarray, cfg: Config, *, seed: int, start: dict | None = None,
                       on_epoch: Callable[[int, ConvBackbone, nn.Module, dict], None] | None = None,
                       device: torch.device | str | None = None, progress: bool = True,
                       desc: str = "transductive") -> tuple[ConvBackbone, dict[str, Any]]:
    """Adapt a copy of ``backbone`` to unlabeled ``images`` on ``device`` (default: the backbone's; batches are
    augmented on the CPU, then copied there); ``start`` resumes from a saved epoch."""
    tc = cfg.transductive
    device = next(backbone.parameters()).device if device is None else torch.device(device)
    model = adapt_batchnorm(backbone, images).to(device)
    with seeded(seed):
        head = nn.Linear(model.embed_dim, tc.clusters).to(device)
        project = projection_head(model.embed_dim, cfg.backbone.contrastive_head).to(device) if tc.contrastive else None
    neighbours = mine_neighbours(model, images, tc.neighbours)
    history: list[dict[str, float]] = []
    first_epoch = 0
    heads = [*head.parameters(), *(project.parameters() if project is not None else ())]
    optimizer = torch.optim.Adam([{"params": [p for n, p in model.named_parameters() if not n.startswith("head.")],
                                   "lr": tc.lr}, {"params": heads, "lr": tc.head_lr}])
    if start is not None:
        model.load_state_dict(start["model"])
        head.load_state_dict(start["head"])
        optimizer.load_state_dict(start["optimizer"])
        history, first_epoch = list(start["history"]), int(start["epoch"])
    generator = torch.Generator().manual_seed(seed)
    x_all = torch.as_tensor(images)
    steps = math.ceil(len(images) / tc.batch_size)
    started = time.perf_counter()
    for epoch in range(first_epoch, tc.epochs):
        generator.manual_seed(seed * 1000 + epoch)  # the same batches when an epoch is replayed after a resume
        model.train()
        total = 0.0
        order = torch.randperm(len(images), generator=generator)
        pick = torch.randint(tc.neighbours, (len(images),), generator=generator)
        for batch in tqdm(order.split(tc.batch_size), total=steps, desc=f"{desc} epoch {epoch + 1}/{tc.epochs}",
                          disable=not progress, leave=False):
            partner = torch.as_tensor(neighbours[batch.numpy(), pick[batch].numpy()])
            x = augment(images_to_tensor(x_all[batch]), generator, tc.augment)
            y = augment(images_to_tensor(x_all[partner]), generator, tc.augment)
            if project is None:
                logits = head(model.embed(to_device(torch.cat([x, y]), device)))
                loss = scan_loss(logits[: len(batch)], logits[len(batch):], tc.entropy_weight)
            else:  # a second view of the batch's own images, for the contrastive term
                view = augment(images_to_tensor(x_all[batch]), generator, tc.augment)
                embedded = model.embed(to_device(torch.cat([x, y, view]), device))
                logits = head(embedded[: 2 * len(batch)])
                views = project(torch.cat([embedded[: len(batch)], embedded[2 * len(batch):]]))
                loss = scan_loss(logits[: len(batch)], logits[len(batch):], tc.entropy_weight) + \
                    tc.contrastive * nt_xent(views, cfg.backbone.contrastive_temperature)
            if not torch.isfinite(loss):
                raise ArtifactError(f"{desc}: the loss became {loss.item()} in epoch {epoch}; lower transductive.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        model.eval()
        record = {"epoch": epoch + 1, "loss": total / len(images), "seconds": time.perf_counter() - started}
        history.append(record)
        if on_epoch is not None:
            on_epoch(epoch + 1, model, head, {"optimizer": optimizer.state_dict(), "history": history})
    return model.eval(), {"history": history, "seconds": time.perf_counter() - started,
                          "images": int(len(images)), "head": head}


def get_transductive_backbone(cfg: Config, backbone: ConvBackbone, backbone_meta: dict[str, Any], dataset: str, *,
                              train: bool = True, progress: bool = True,
                              curve: Callable[[ConvBackbone], float] | None = None
                              ) -> tuple[ConvBackbone, dict[str, Any]]:
    """The backbone adapted to ``dataset``'s unlabeled train split: reused when everything matches, resumed when
    interrupted, else trained (``train=False`` never trains: one line naming the file and the command); then
    :func:`gate` decides whether to use it (else the starting backbone is returned, with its ``backbone_id``;
    the meta's ``gate`` says which and why).

    ``curve`` (report only) maps an adapted backbone to a number (e.g. k-means accuracy on test tasks) recorded in
    the history after every epoch; it never changes training.
    """
    image_set = data.load_split(dataset, "train", cfg.data, progress=progress)
    model, meta = _adapted_backbone(cfg, backbone, backbone_meta, dataset, image_set, train=train,
                                    progress=progress, curve=curve)
    tc = cfg.transductive
    # what the decision reads: the confidence rule the starting backbone only, the silhouette rule the adaptation too
    read = (tc.gate_confidence,) if decides_before_adapting(cfg) else (meta["adapted_id"], tc.gate_clusters)
    key = (backbone_meta["backbone_id"], image_set.fingerprint, tc.gate, tc.gate_images, tc.gate_repeats, *read)
    if tc.gate == "off":
        decision = gate(cfg, backbone, model, image_set.images)
    elif key not in _DECISIONS:  # a few seconds; every reader of one adapted backbone in a process asks the same
        decision = _DECISIONS[key] = gate(cfg, backbone, model, image_set.images)
    else:
        decision = _DECISIONS[key]
    if decision["kept"] == "adapted":
        return model, {**meta, "gate": decision}
    print(gate_message(meta["name"], decision))
    return copy.deepcopy(backbone).to(device=next(model.parameters()).device).eval(), {
        **meta, "backbone_id": backbone_meta["backbone_id"], "gate": decision}


def require_adapted(cfg: Config, backbone: ConvBackbone, backbone_meta: dict[str, Any], dataset: str) -> None:
    """Raise (one line naming the file and the command that makes it) unless the backbone adapted to ``dataset``
    exists, finished and matching: what an evaluation checks for every dataset before it scores the first one."""
    image_set = data.load_split(dataset, "train", cfg.data, progress=False)
    _adapted_backbone(cfg, backbone, backbone_meta, dataset, image_set, train=False, progress=False, curve=None)


def _adapted_backbone(cfg: Config, backbone: ConvBackbone, backbone_meta: dict[str, Any], dataset: str,
                      image_set: Any, *, train: bool, progress: bool, curve: Callable[[ConvBackbone], float] | None
                      ) -> tuple[ConvBackbone, dict[str, Any]]:
    """The adapted backbone of :func:`get_transductive_backbone` before the gate: reused, resumed or trained."""
    device = resolve_device(cfg.device)
    identity = transductive_identity(cfg, backbone_meta, image_set)
    seed = int(backbone_meta.get("seed", 0))
    stem = f"{backbone_meta['name'].split('-')[0]}_on-{dataset}"
    path = named_path(paths.models_dir(), stem, identity)
    resume = None
    if path.exists() and cfg.transductive.retrain == "always" and train:
        moved = set_aside(path, "previous")
        print(f"Retraining on request (transductive.retrain='always'); the previous one is kept as {moved.name}.")
    if path.exists():
        try:
            state, meta = load_checkpoint(path)
            diffs = settings_diff(meta, identity)
            if diffs:
                raise StaleArtifactError(f"{path} was made with other settings or inputs: {diffs[0]}")
            if meta.get("complete") and cfg.transductive.retrain != "always":
                model = backbone_from_state(state["model"], backbone_meta).to(device)
                return model, {**backbone_meta, **meta, "path": str(path), "name": path.stem,
                               "backbone_id": meta["adapted_id"], "reused": True}
            resume = state if meta.get("complete") is False else None
        except ArtifactError as err:
            if not train or cfg.transductive.retrain == "never":
                raise
            moved = set_aside(path, "stale" if isinstance(err, StaleArtifactError) else "corrupt")
            print(f"{path.name} cannot be reused ({str(err).splitlines()[0]}); kept it as {moved.name}.")
    if not train or cfg.transductive.retrain == "never":
        how = f"make it with: {make_command(cfg, '03')}"
        if dataset not in cfg.transductive.datasets:  # notebook 03 adapts to transductive.datasets only
            how = (f"notebook 03 adapts only to transductive.datasets ({', '.join(cfg.transductive.datasets)}); "
                   f"`hmlib benchmark --setting transductive` adapts to every benchmark dataset, or list {dataset} in "
                   f"transductive.datasets of a --config for `{make_command(cfg, '03')}`")
        raise MissingArtifactError(f"transductive backbone {path} {'is unfinished' if resume else 'not found'}; {how}")
    images = adaptation_images(cfg, image_set)
    curve_points: list[float] = list((resume or {}).get("curve", []))
    if resume is None and curve is not None:
        curve_points = [float(curve(adapt_batchnorm(backbone, images)))]

    def save(epoch: int, model: ConvBackbone, head: nn.Module, extra: dict) -> None:
        if curve is not None:
            curve_points.append(float(curve(model)))
        state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                 "head": head.state_dict(), "optimizer": extra["optimizer"], "epoch": epoch,
                 "history": extra["history"], "curve": curve_points}
        save_checkpoint(path, state, {**identity, "complete": epoch >= cfg.transductive.epochs, "epoch": epoch,
                                      "history": extra["history"], "curve": curve_points,
                                      "adapted_id": state_fingerprint(state["model"]), "seed": int(seed),
                                      "device": str(device)})

    if resume is not None:
        print(f"Resuming the transductive backbone {path.name} at epoch {resume['epoch']}/{cfg.transductive.epochs}.")
    else:
        print(f"Adapting {backbone_meta['name']} to {dataset}'s unlabeled train split ({len(images)} images, "
              f"{cfg.transductive.epochs} epochs).")
    model, record = train_transductive(copy.deepcopy(backbone), images, cfg, seed=seed, start=resume, on_epoch=save,
                                       device=device, progress=progress, desc=stem)
    if cfg.transductive.epochs == 0 or (resume is not None and int(resume["epoch"]) >= cfg.transductive.epochs):
        save(cfg.transductive.epochs, model, record["head"], {"optimizer": {}, "history": record["history"]})
    state, meta = load_checkpoint(path)
    return model, {**backbone_meta, **meta, "path": str(path), "name": path.stem, "backbone_id": meta["adapted_id"],
                   "reused": False}
