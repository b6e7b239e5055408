"""Training the VAE and finding it again: ``get_vae`` loads a matching checkpoint or trains one (notebook 02).

Checkpoints are ``models/vae_<scope>_d<d>_seed<s>-<hash>.pt``: the hash covers every setting, seed and
training-data fingerprint, so VAEs of other settings never share a file. A VAE's identity (``vae_id``) is
a hash of its weights, the same whenever the same settings and seed are trained again. The device that trained
it (``device`` in its meta) is recorded but is no part of the name: a VAE trained on a GPU is reused on the CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hmlib import data, paths
from hmlib.artifacts import ArtifactError, load_named_kind, load_or_build, named_path, save_checkpoint, state_fingerprint
from hmlib.config import SETTINGS, Config, ConfigError, VAEConfig, config_to_dict, load_config, resolve_device
from hmlib.features import encode_batches, images_to_tensor, to_device
from hmlib.reproducibility import seeded
from hmlib.vae.model import VAE, beta_schedule, build_vae, vae_loss

MODEL_KEYS = ("variant", "latent_dim")


class VAETrainingError(ArtifactError):
    """Training diverged (NaN/inf loss); no checkpoint was written."""


@dataclass
class TrainResult:
    """History (one dict per step: step, epoch, beta, loss, recon, kl) and summary metrics."""

    history: list[dict[str, float]]
    metrics: dict[str, float]


def train_vae(model: VAE, images: np.ndarray, cfg: VAEConfig, *, seed: int = 0, device: torch.device | str = "cpu",
              progress: bool = True, desc: str = "VAE") -> TrainResult:
    """Train ``model`` in place on uint8 images (n, 28, 28); raise VAETrainingError on NaN/inf loss."""
    if len(images) == 0:
        raise ValueError("no training images")
    device = torch.device(device)
    data = torch.as_tensor(images)
    images_to_tensor(data[:1])  # validates dtype and shape
    generator = torch.Generator().manual_seed(seed)
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
    step = 0
    with seeded(seed):  # reparameterisation noise from the VAE's own seed, whatever ran before
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(data), generator=generator)
            for batch_idx in order.split(cfg.batch_size):
                x = images_to_tensor(to_device(data[batch_idx], device))  # uint8 across, floats made there
                beta = beta_schedule(step, total_steps, cfg.beta_start, cfg.beta_end)
                logits, mu, logvar = model(x)
                terms = vae_loss(logits, x, mu, logvar, beta, cfg.likelihood, cfg.ssim_weight)
                loss = terms["loss"]
                if not torch.isfinite(loss):
                    bar.close()
                    raise VAETrainingError(
                        f"{desc}: loss became {loss.item()} at step {step} (epoch {epoch}); training stopped and "
                        f"no checkpoint was written (any earlier checkpoint is untouched). Try a lower vae.lr "
                        f"(now {cfg.lr}) or a smaller vae.beta_start.")
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                record = {"step": step, "epoch": epoch, "beta": beta,
                          **{k: float(v.detach()) for k, v in terms.items()}}
                history.append(record)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.1f}", kl=f"{record['kl']:.1f}", beta=f"{beta:.2f}")
    bar.close()
    seconds = time.perf_counter() - started
    model.eval()
    last_epoch = [h for h in history if h["epoch"] == cfg.epochs - 1]
    metrics = {f"final_{k}": float(np.mean([h[k] for h in last_epoch])) for k in ("loss", "recon", "kl")}
    metrics.update(train_seconds=seconds, train_images_per_second=len(data) * cfg.epochs / max(seconds, 1e-9),
                   num_train_images=int(len(data)), num_steps=int(total_steps))
    return TrainResult(history=history, metrics=metrics)


def select_training_images(image_sets: Sequence[Any], max_images: int | None, seed: int
                           ) -> tuple[np.ndarray, dict[str, int]]:
    """Balanced draw across datasets: each gets ``max_images // k`` (small ones repeated); None = all of each."""
    if not image_sets:
        raise ValueError("no datasets to train on")
    rng = np.random.default_rng(seed)
    chosen, counts = [], {}
    quota = None if max_images is None else max(1, max_images // len(image_sets))
    for image_set in image_sets:
        n = len(image_set.images)
        if n == 0:
            raise ValueError(f"dataset {image_set.name} ({image_set.split}) has no images")
        if quota is None:
            idx = np.arange(n)
        elif n >= quota:
            idx = rng.choice(n, size=quota, replace=False)
        else:  # repeat the small dataset: every image quota // n or quota // n + 1 times
            idx = np.concatenate([np.tile(np.arange(n), quota // n), rng.choice(n, size=quota % n, replace=False)])
        chosen.append(image_set.images[np.sort(idx)])
        counts[image_set.name] = int(len(idx))
    return np.concatenate(chosen), counts


# ----------------------------------------------------------------------------------------------
# Checkpoints and get_vae


def scope_datasets(cfg: Config, scope: str) -> tuple[str, ...]:
    """Datasets a VAE of this scope trains on: the meta-training datasets for "shared", else the one dataset."""
    if scope == "shared":
        return tuple(cfg.meta.train_datasets)
    if scope not in cfg.datasets and scope not in cfg.data.custom_datasets:
        raise ConfigError(f"unknown VAE scope {scope!r}; use 'shared' or a dataset of the protocol: "
                          f"{', '.join(cfg.datasets)}")
    return (scope,)


def vae_identity(cfg: Config, scope: str, seed: int, fingerprints: dict[str, str]) -> dict[str, Any]:
    """Everything that makes two VAEs different: model and training settings, seed, training data."""
    settings = config_to_dict(cfg.vae)
    settings.pop("retrain")
    return {"kind": "vae", "scope": scope, "seed": int(seed), "settings": settings,
            "data_fingerprints": fingerprints}


def vae_path(cfg: Config, scope: str, seed: int, identity: dict[str, Any]) -> Path:
    """``models/vae_<scope>_d<d>_seed<s>-<hash>.pt``."""
    return named_path(paths.models_dir(), f"vae_{scope}_d{cfg.vae.latent_dim}_seed{seed}", identity)


def vae_from_state(state: dict[str, Any], meta: dict[str, Any]) -> VAE:
    """Rebuild a VAE in eval mode from a checkpoint's state and meta."""
    model = build_vae(VAEConfig(**{k: meta["settings"][k] for k in MODEL_KEYS}))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"VAE weights do not fit a {meta['settings']['variant']} VAE "
                            f"({str(err).splitlines()[0]}); delete the checkpoint to retrain") from err
    return model.eval()


def load_vae(path: str | Path) -> tuple[VAE, dict[str, Any]]:
    """Load a VAE checkpoint (weights_only) -> (model in eval mode, meta with 'vae_id', 'path' and 'name')."""
    state, meta = load_named_kind(path, "vae", "VAE")
    return vae_from_state(state, meta), meta


def get_vae(cfg: Config, scope: str, seed: int, *, train: bool = True, progress: bool = True,
            verbose: bool = True) -> tuple[VAE, dict[str, Any]]:
    """The VAE of ``scope`` ("shared" or a dataset) and replicate ``seed``: reused when it matches, else trained.

    ``train=False`` (evaluation, notebook 04) never trains: a missing VAE is a MissingArtifactError naming
    the file and the command that makes it.
    """
    datasets = scope_datasets(cfg, scope)
    image_sets = [data.load_split(d, "train", cfg.data, progress=progress) for d in datasets]
    identity = vae_identity(cfg, scope, seed, {s.name: s.fingerprint for s in image_sets})
    path = vae_path(cfg, scope, seed, identity)
    device = resolve_device(cfg.device)

    def build() -> None:
        images, counts = select_training_images(image_sets, cfg.vae.max_train_images, seed)
        with seeded(seed):  # initial weights from the replicate's own seed
            model = build_vae(cfg.vae)
        print(f"Training {path.stem} on {counts} ({len(images)} images, {cfg.vae.epochs} epochs, {device}).")
        result = train_vae(model, images, cfg.vae, seed=seed, device=device, progress=progress, desc=path.stem)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_checkpoint(path, state, {**identity, "vae_id": state_fingerprint(state), "train_counts": counts,
                                      "metrics": result.metrics, "history": result.history,
                                      "torch_version": str(torch.__version__), "device": str(device)})
        print(f"Saved {path} ({result.metrics['train_seconds']:.0f} s, "
              f"{result.metrics['train_images_per_second']:.0f} images/s).")

    state, meta, reused = load_or_build(path, identity, build, retrain=cfg.vae.retrain, allow_build=train,
                                        what="VAE", how_to_make=make_command(cfg, "02"), verbose=verbose)
    model = vae_from_state(state, meta).to(device)
    return model, {**meta, "path": str(path), "name": path.stem, "reused": reused}


def make_command(cfg: Config, notebook: str) -> str:
    """The command that makes a stage's artifacts for this config (for 'missing artifact' messages): the profile's,
    and the run's --config where its settings are not the profile's (the command without it would make the
    profile's artifact, not the one missing)."""
    command = f"hmlib run --profile {cfg.profile} --only {notebook}"
    try:
        plain = load_config(cfg.profile)
    except ConfigError:
        return command
    return command if config_to_dict(plain) == config_to_dict(cfg) else f"{command} --config <the file this run read>"


def encode_images(vae: VAE, images: np.ndarray, *, batch_size: int = 2048, progress: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Encode uint8 images (n, 28, 28) -> (mu, logvar), each float32 (n, d), in eval mode."""
    if len(images) == 0:
        return np.zeros((0, vae.latent_dim), np.float32), np.zeros((0, vae.latent_dim), np.float32)
    device = next(vae.parameters()).device
    vae.eval()
    mu, logvar = encode_batches(lambda x: vae.encode(x.to(device)), images, batch_size=batch_size,
                                progress=progress, desc="encode")
    return mu, logvar


@torch.no_grad()
def reconstruct_images(vae: VAE, images: np.ndarray) -> np.ndarray:
    """Decoded posterior means of uint8 images (n, 28, 28) -> float32 (n, 28, 28) in [0, 1]."""
    device = next(vae.parameters()).device
    vae.eval()
    return vae.reconstruct(images_to_tensor(images).to(device))[:, 0].cpu().numpy().astype(np.float32)


def vae_summary(metas: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per VAE (from get_vae's meta): name, datasets, reused, training size and cost, final loss terms."""
    rows = []
    for label, meta in metas.items():
        metrics = meta.get("metrics", {})
        rows.append({
            "vae": label, "checkpoint": meta.get("name"), "trained on": ", ".join(meta.get("data_fingerprints", {})),
            "reused": meta.get("reused"), "images/epoch": metrics.get("num_train_images"),
            "epochs": meta.get("settings", {}).get("epochs"),
            "train s": round(metrics.get("train_seconds", float("nan")), 1),
            "final recon": round(metrics.get("final_recon", float("nan")), 2),
            "final KL": round(metrics.get("final_kl", float("nan")), 2),
        })
    return rows


def get_all_vaes(cfg: Config, *, train: bool = True, progress: bool = True) -> dict[tuple[str, int], tuple[VAE, dict]]:
    """Every VAE of the protocol, keyed (scope, seed): the shared one of each replicate seed (it conditions the
    hypernetwork in both settings)."""
    return {("shared", seed): get_vae(cfg, "shared", seed, train=train, progress=progress) for seed in cfg.seeds}
