"""Training the backbone and finding it again: ``get_backbone`` loads a matching checkpoint or trains one.

The backbone learns with labels from the meta-training datasets only (their train splits minus the
validation part), cross-entropy over the union of their classes with label smoothing, random affine
augmentation and, for a share ``backbone.shift_prob`` of the images, a random corruption of the *train* family
(noise, blur, elastic, contrast, occlusion, ...; never a held-out benchmark corruption), AdamW with a one-cycle
schedule. Beside the cross-entropy, a contrastive term (``backbone.contrastive``: SimCLR's NT-Xent on a projection
head) asks two independently shifted and augmented views of each image to find each other among the batch's
views: an objective that does not specialise to the training classes, chosen on the leave-one-dataset-out folds.

Checkpoints: ``models/backbone_seed<s>-<hash>.pt`` with settings, data fingerprints,
metrics and per-epoch history; the identity ``backbone_id`` is a hash of the weights.
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hmlib import data, paths
from hmlib.artifacts import ArtifactError, load_named_kind, load_or_build, named_path, save_checkpoint, state_fingerprint
from hmlib.backbone.model import ConvBackbone, augment, batchnorm_layers
from hmlib.config import Config, ConfigError, config_to_dict, resolve_device
from hmlib.data.corruptions import CORRUPTIONS, train_corruptions
from hmlib.features import images_to_tensor, to_device
from hmlib.protocol import train_val_indices
from hmlib.reproducibility import seeded
from hmlib.vae.train import make_command



class BackboneTrainingError(ArtifactError):
    """Backbone training diverged (non-finite loss); no checkpoint was written."""


def backbone_datasets(cfg: Config) -> tuple[str, ...]:
    """The meta-training datasets the backbone learns from (``backbone.datasets``, else all of them)."""
    return tuple(cfg.backbone.datasets or cfg.meta.train_datasets)


def backbone_identity(cfg: Config, seed: int, fingerprints: dict[str, str]) -> dict[str, Any]:
    """Everything that makes two backbones different: settings, seed, training data and its validation part."""
    settings = config_to_dict(cfg.backbone)
    settings.pop("retrain")
    settings.pop("datasets")  # which datasets it learns from is in the data fingerprints
    if not settings["contrastive"]:  # cross-entropy only: the identity of every backbone made before the option
        settings.pop("contrastive")
        settings.pop("contrastive_temperature")
        settings.pop("contrastive_head")
    return {"kind": "backbone", "seed": int(seed), "settings": settings,
            "val_fraction": cfg.meta.val_fraction, "data_fingerprints": fingerprints}


def shifted(images: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """A batch where a random ``share`` of the images is put under one random train-family corruption at a random
    strength (never a held-out benchmark corruption): the representation learns to see through such shifts."""
    if share <= 0:
        return images
    names = train_corruptions()
    pick = rng.random(len(images)) < share
    if not pick.any():
        return images
    out = images.copy()
    out[pick] = CORRUPTIONS[names[int(rng.integers(len(names)))]](images[pick], rng, float(rng.uniform(0.25, 1.0)))
    return out


def train_backbone(image_sets: Sequence[Any], cfg: Config, seed: int, *, device: torch.device | str = "cpu",
                   progress: bool = True, desc: str = "backbone") -> tuple[ConvBackbone, dict[str, Any]]:
    """Train a backbone on the training part of each ImageSet on ``device`` (batches are drawn, shifted and
    augmented on the CPU, then copied there); return it (eval mode) and its history/metrics."""
    bb = cfg.backbone
    images, labels, offset = [], [], 0
    for image_set in image_sets:
        keep, _ = train_val_indices(image_set.labels, cfg)
        images.append(torch.as_tensor(image_set.images[keep]))
        labels.append(torch.as_tensor(np.asarray(image_set.labels)[keep] + offset))
        offset += int(np.max(image_set.labels)) + 1
    with seeded(seed):
        model = ConvBackbone(bb.channels, bb.embed_dim, offset)
        project = projection_head(bb.embed_dim, bb.contrastive_head if bb.contrastive else 0)
    model.to(device)
    project.to(device)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(bb.images_per_dataset * len(images) / bb.batch_size)
    optimizer = torch.optim.AdamW([*model.parameters(), *project.parameters()], lr=bb.lr,
                                  weight_decay=bb.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=bb.lr, total_steps=bb.epochs * steps_per_epoch)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(total=bb.epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    for epoch in range(bb.epochs):
        draws = [torch.randint(len(x), (bb.images_per_dataset,), generator=generator) for x in images]
        x_epoch = torch.cat([x[i] for x, i in zip(images, draws)])
        y_epoch = torch.cat([y[i] for y, i in zip(labels, draws)])
        model.train()
        total, correct, seen = 0.0, 0, 0
        shift_rng = np.random.default_rng([seed, epoch])

        def view(batch: torch.Tensor) -> torch.Tensor:  # one shifted, augmented view of the batch's images
            return augment(images_to_tensor(shifted(x_epoch[batch].numpy(), shift_rng, bb.shift_prob)), generator,
                           bb.augment)

        for batch in torch.randperm(len(x_epoch), generator=generator).split(bb.batch_size):
            x, y = to_device(view(batch), device), to_device(y_epoch[batch], device)
            if bb.contrastive > 0:  # a second view for the contrastive term
                embedded = model.embed(torch.cat([x, to_device(view(batch), device)]))
                logits = model.head(embedded[:len(batch)])
                loss = F.cross_entropy(logits, y, label_smoothing=bb.label_smoothing) + bb.contrastive * nt_xent(
                    project(embedded), bb.contrastive_temperature)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=bb.label_smoothing)
            if not torch.isfinite(loss):
                raise BackboneTrainingError(f"{desc}: loss became {loss.item()} in epoch {epoch}; no checkpoint "
                                            f"was written. Lower backbone.lr (now {bb.lr}).")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(batch)
            bar.update(1)
        history.append({"epoch": epoch, "loss": total / seen, "train_accuracy": correct / seen})
        bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    seconds = time.perf_counter() - started
    metrics = {"train_seconds": seconds, "num_classes": offset,
               "train_images_per_second": bb.epochs * steps_per_epoch * bb.batch_size / max(seconds, 1e-9),
               "final_loss": history[-1]["loss"], "final_train_accuracy": history[-1]["train_accuracy"]}
    return model.eval(), {"history": history, "metrics": metrics}


def projection_head(embed_dim: int, width: int) -> nn.Module:
    """The contrastive term's projection (SimCLR's g: embedding -> width -> width; training only, never part of a
    saved backbone); the identity where ``width`` is 0 (the term on the embedding itself)."""
    if not width:
        return nn.Identity()
    return nn.Sequential(nn.Linear(embed_dim, width), nn.ReLU(), nn.Linear(width, width))


def nt_xent(embedded: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of embeddings (2B, D) whose rows i and i + B are two views of one image: each view's
    other view should be its most similar row (cosine similarity / ``temperature``) among the other 2B - 1."""
    z = F.normalize(embedded, dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    half = len(z) // 2
    partner = torch.cat([torch.arange(half, len(z)), torch.arange(half)]).to(z.device)
    return F.cross_entropy(similarity, partner)


def backbone_from_state(state: dict[str, Any], meta: dict[str, Any]) -> ConvBackbone:
    """Rebuild a backbone in eval mode from a checkpoint's state and meta."""
    settings = meta["settings"]
    model = ConvBackbone(settings["channels"], settings["embed_dim"], int(meta["metrics"]["num_classes"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"backbone weights do not fit the recorded architecture ({str(err).splitlines()[0]}); "
                            "delete the checkpoint to retrain") from err
    return model.eval()


def load_backbone(path: str | Path) -> tuple[ConvBackbone, dict[str, Any]]:
    """Load a backbone checkpoint (weights_only) -> (model in eval mode, meta with 'backbone_id', 'path', 'name')."""
    state, meta = load_named_kind(path, "backbone", "backbone")
    return backbone_from_state(state, meta), meta


def get_backbone(cfg: Config, seed: int, *, train: bool = True, progress: bool = True,
                 verbose: bool = True) -> tuple[ConvBackbone, dict[str, Any]]:
    """The backbone of replicate ``seed``: reused when it matches, else trained.

    ``train=False`` never trains: a missing backbone is a MissingArtifactError naming the file and the command.
    """
    image_sets = [data.load_split(d, "train", cfg.data, progress=progress) for d in backbone_datasets(cfg)]
    identity = backbone_identity(cfg, seed, {s.name: s.fingerprint for s in image_sets})
    path = named_path(paths.models_dir(), f"backbone_seed{seed}", identity)
    device = resolve_device(cfg.device)

    def build() -> None:
        print(f"Training {path.stem} on {', '.join(s.name for s in image_sets)} "
              f"({cfg.backbone.epochs} epochs x {cfg.backbone.images_per_dataset} images per dataset, {device}).")
        model, record = train_backbone(image_sets, cfg, seed, device=device, progress=progress, desc=path.stem)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_checkpoint(path, state, {**identity, **record, "backbone_id": state_fingerprint(state),
                                      "torch_version": str(torch.__version__), "device": str(device)})
        print(f"Saved {path} ({record['metrics']['train_seconds']:.0f} s).")

    state, meta, reused = load_or_build(path, identity, build, retrain=cfg.backbone.retrain, allow_build=train,
                                        what="backbone", how_to_make=make_command(cfg, "02"), verbose=verbose)
    model = backbone_from_state(state, meta).to(device)
    return model, {**meta, "path": str(path), "name": path.stem, "reused": reused}


@torch.no_grad()
def adapt_batchnorm(model: ConvBackbone, images: np.ndarray, *, batch_size: int = 500) -> ConvBackbone:
    """A copy of ``model`` whose normalisation statistics are re-estimated on unlabeled ``images`` (AdaBN)."""
    adapted = copy.deepcopy(model)
    layers = batchnorm_layers(adapted)
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches below
    adapted.train()
    device = next(adapted.parameters()).device
    for start in range(0, len(images), batch_size):
        adapted.features(images_to_tensor(images[start:start + batch_size]).to(device))
    for layer in layers:
        layer.momentum = 0.1
    return adapted.eval()


def get_all_backbones(cfg: Config, *, train: bool = True, progress: bool = True
                      ) -> dict[int, tuple[ConvBackbone, dict]]:
    """The backbone of every replicate seed."""
    return {seed: get_backbone(cfg, seed, train=train, progress=progress) for seed in cfg.seeds}
