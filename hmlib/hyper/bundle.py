"""A hypernetwork checkpoint carries the models it reads through, so one file is enough to use it.

Every checkpoint bundles the shared VAE (the conditioning) and, for generator ``film``, the backbone it
modulates (as meta-trained, when meta-training fine-tunes it). :func:`load_bundle` rebuilds all of it from the
one file: what ``hmlib eval`` on a fresh machine and ``hmlib cluster`` use. The transductive setting swaps in
the backbone adapted to a held-out dataset (:mod:`hmlib.backbone.transductive`), found in ``models/``.
A bundle loads onto the device its user chooses, whatever device made it (the file holds CPU tensors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hmlib.artifacts import ArtifactError, file_sha256, load_checkpoint, state_fingerprint
from hmlib.backbone.model import ConvBackbone
from hmlib.backbone.train import backbone_from_state, get_backbone
from hmlib.config import Config, resolve_device
from hmlib.hyper.checkpoints import hypernet_from_checkpoint
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.inputs import reads_images
from hmlib.vae.model import VAE
from hmlib.vae.train import get_vae, vae_from_state


def bundle_for(cfg: Config, seed: int, *, train: bool = False, progress: bool = False
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'vae': {'state', 'meta'}, 'backbone': {...}}, {'vae': model, 'backbone': model}) of the models a
    checkpoint of this config reads through."""
    bundle: dict[str, Any] = {}
    vae, meta = get_vae(cfg, "shared", seed, train=train, progress=progress, verbose=False)
    bundle["vae"] = {"state": load_checkpoint(meta["path"])[0], "meta": _portable(meta)}
    models: dict[str, Any] = {"vae": vae}
    if reads_images(cfg):
        backbone, meta = get_backbone(cfg, seed, train=train, progress=progress, verbose=False)
        bundle["backbone"] = {"state": load_checkpoint(meta["path"])[0], "meta": _portable(meta)}
        models["backbone"] = backbone
    return bundle, models


def _portable(meta: dict[str, Any]) -> dict[str, Any]:
    """The meta of a bundled model without machine-specific paths or bulky histories."""
    return {k: v for k, v in meta.items() if k not in ("path", "history", "reused")}


@dataclass
class Bundle:
    """A hypernetwork with the models it reads through, all from one checkpoint file."""

    path: Path
    sha256: str
    hypernet: HyperNet
    meta: dict[str, Any]
    cfg: Config
    vae: VAE
    vae_meta: dict[str, Any]
    backbone: ConvBackbone | None  # the backbone the hypernetwork modulates (as meta-trained)
    backbone_meta: dict[str, Any] | None

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def device(self) -> torch.device:
        """Where its models are (chosen when it was loaded; ``cfg.device`` is the device that made it)."""
        return self.hypernet.device


def load_bundle(path: str | Path, device: torch.device | str | None = None) -> Bundle:
    """Hypernetwork, config and bundled VAE/backbone from a checkpoint (weights_only; nothing is trained), on
    ``device`` (default: 'auto'), whatever device made it (its config's ``device`` records that one)."""
    path = Path(path)
    device = resolve_device("auto" if device is None else str(device))
    state, meta = load_checkpoint(path)
    hypernet, cfg = hypernet_from_checkpoint(state, meta, path)
    hypernet.to(device)
    bundled = state.get("bundle") or {}
    try:
        vae_meta = dict(bundled["vae"]["meta"])
        vae = vae_from_state(bundled["vae"]["state"], vae_meta).to(device)
        backbone = backbone_meta = None
        if "backbone" in bundled:
            backbone = hypernet.generator.backbone
            backbone_meta = dict(bundled["backbone"]["meta"])
            if cfg.meta.backbone_lr > 0:  # fine-tuned by meta-training: the weights, and so the identity, differ
                backbone_meta["backbone_id"] = state_fingerprint(backbone.state_dict())
                backbone_meta["name"] = f"{backbone_meta['name']}_meta-{path.stem}"
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{path} holds a damaged bundle of upstream models ({type(err).__name__}: {err}); "
                            "re-run meta-training to rewrite it") from err
    return Bundle(path, file_sha256(path), hypernet, meta, cfg, vae, vae_meta, backbone, backbone_meta)
