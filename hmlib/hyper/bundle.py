"""A hypernetwork checkpoint carries the models it reads through, so one file is enough to use it.

Zero-shot checkpoints bundle the shared VAE (the conditioning) and the backbone; transductive ones bundle
the backbone (the VAE of a transductive task is the dataset's own, found in ``models/``). :func:`load_bundle`
rebuilds all of it from the one file: what ``hmlib eval`` on a fresh machine and ``hmlib cluster`` use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmlib.artifacts import ArtifactError, file_sha256, load_checkpoint
from hmlib.backbone.model import ConvBackbone
from hmlib.backbone.train import backbone_from_state, get_backbone
from hmlib.config import Config, config_from_dict
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.metatrain import load_hypernet
from hmlib.vae.model import VAE
from hmlib.vae.train import get_vae, vae_from_state


def bundle_for(cfg: Config, setting: str, seed: int, *, train: bool = False, progress: bool = False) -> dict[str, Any]:
    """{'vae': {'state', 'meta'}, 'backbone': {...}} of the models a checkpoint of this setting reads through."""
    bundle: dict[str, Any] = {}
    if setting == "zero_shot":
        _, meta = get_vae(cfg, "shared", seed, train=train, progress=progress, verbose=False)
        bundle["vae"] = {"state": load_checkpoint(meta["path"])[0], "meta": _portable(meta)}
    if cfg.hyper.target_input == "embedding" or cfg.hyper.conditioning_input == "embedding":
        _, meta = get_backbone(cfg, seed, train=train, progress=progress, verbose=False)
        bundle["backbone"] = {"state": load_checkpoint(meta["path"])[0], "meta": _portable(meta)}
    return bundle


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
    vae: VAE | None
    vae_meta: dict[str, Any] | None
    backbone: ConvBackbone | None
    backbone_meta: dict[str, Any] | None

    @property
    def setting(self) -> str:
        return self.meta["setting"]


def load_bundle(path: str | Path) -> Bundle:
    """Hypernetwork, config and bundled VAE/backbone from a checkpoint (weights_only; nothing is trained)."""
    path = Path(path)
    hypernet, meta = load_hypernet(path)
    state, _ = load_checkpoint(path)
    bundled = state.get("bundle") or {}
    vae = vae_meta = backbone = backbone_meta = None
    try:
        if "vae" in bundled:
            vae_meta = dict(bundled["vae"]["meta"])
            vae = vae_from_state(bundled["vae"]["state"], vae_meta)
        if "backbone" in bundled:
            backbone_meta = dict(bundled["backbone"]["meta"])
            backbone = backbone_from_state(bundled["backbone"]["state"], backbone_meta)
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"{path} holds a damaged bundle of upstream models ({type(err).__name__}: {err}); "
                            "re-run meta-training to rewrite it") from err
    return Bundle(path, file_sha256(path), hypernet, meta, config_from_dict(meta["config"]), vae, vae_meta,
                  backbone, backbone_meta)
