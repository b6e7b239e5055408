"""The convolutional VAE (stage 2): models, loss, beta schedule, training, checkpoints and ``get_vae``.

Two variants share one interface (``VAE.encode``/``decode``/``forward``): ``"conv"``, a compact
two-layer conv encoder with a transposed-conv decoder, and ``"prototype"``, METHOD.md's residual
encoder 1->32->64->128 (28->14->7) with a pixel-shuffle decoder. The decoder always returns logits;
``"bce"`` reads them as Bernoulli logits, ``"mse_ssim"`` as ``sigmoid(logits)`` images.
Checkpoints live in ``models/<scope>_vae_head_<d>.pt`` and are reused only when every setting and
every training-data fingerprint matches.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hmlib import paths
from hmlib.artifacts import ArtifactError, StaleArtifactError, file_sha256, load_checkpoint, save_checkpoint
from hmlib.reproducibility import seeded
from hmlib.config import BUILTIN_DATASETS, Config, ConfigError, VAEConfig, config_to_dict, resolve_device

IMAGE_SIZE = 28
MODEL_KEYS = ("variant", "latent_dim")
TRAINING_KEYS = ("likelihood", "ssim_weight", "beta_start", "beta_end", "epochs", "batch_size", "lr",
                 "max_train_images", "seed")


class VAETrainingError(RuntimeError):
    """Training diverged (NaN/inf loss); the last good checkpoint was left untouched."""


# ----------------------------------------------------------------------------------------------
# Models


class ResidualBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))), channels and size preserved."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class VAE(nn.Module):
    """Gaussian-posterior VAE on 1x28x28 images in [0, 1]: ``encode -> (mu, logvar)``, ``decode -> logits``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, feature_dim: int, latent_dim: int,
                 variant: str) -> None:
        super().__init__()
        self.variant = variant
        self.latent_dim = latent_dim
        self.encoder = encoder  # (B, 1, 28, 28) -> (B, feature_dim)
        self.to_mu = nn.Linear(feature_dim, latent_dim)
        self.to_logvar = nn.Linear(feature_dim, latent_dim)
        self.decoder = decoder  # (B, latent_dim) -> (B, 1, 28, 28) logits

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters (mu, logvar), each (B, d), of images x (B, 1, 28, 28) in [0, 1]."""
        features = self.encoder(x)
        return self.to_mu(features), self.to_logvar(features)

    def decode(self, z: Tensor) -> Tensor:
        """Pixel logits (B, 1, 28, 28) of latent codes z (B, d)."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, mu, logvar) with z drawn by the reparameterisation trick."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Images in [0, 1] decoded from the posterior means of x (no sampling)."""
        mu, _ = self.encode(x)
        return torch.sigmoid(self.decode(mu))


def _conv_parts(latent_dim: int) -> tuple[nn.Module, nn.Module, int]:
    """Compact variant: two stride-2 convs (28->14->7) and their transposes, one hidden FC layer."""
    hidden = 256
    encoder = nn.Sequential(
        nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),   # 32x14x14
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),  # 64x7x7
        nn.Flatten(), nn.Linear(64 * 7 * 7, hidden), nn.ReLU(),
    )
    decoder = nn.Sequential(
        nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, 64 * 7 * 7), nn.ReLU(),
        nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),  # 32x14x14
        nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),              # 1x28x28 logits
    )
    return encoder, decoder, hidden


def _prototype_parts(latent_dim: int) -> tuple[nn.Module, nn.Module, int]:
    """METHOD.md's prototype: residual encoder 1->32->64->128 (28->14->7), pixel-shuffle decoder."""
    encoder = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), ResidualBlock(32),                # 32x28x28
        nn.Conv2d(32, 64, 4, stride=2, padding=1), ResidualBlock(64),     # 64x14x14
        nn.Conv2d(64, 128, 4, stride=2, padding=1), ResidualBlock(128),   # 128x7x7
        nn.ReLU(), nn.Flatten(),
    )
    decoder = nn.Sequential(
        nn.Linear(latent_dim, 128 * 7 * 7), nn.Unflatten(1, (128, 7, 7)), ResidualBlock(128),
        nn.Conv2d(128, 64 * 4, 3, padding=1), nn.PixelShuffle(2), ResidualBlock(64),  # 64x14x14
        nn.Conv2d(64, 32 * 4, 3, padding=1), nn.PixelShuffle(2), ResidualBlock(32),   # 32x28x28
        nn.ReLU(), nn.Conv2d(32, 1, 3, padding=1),                                     # 1x28x28 logits
    )
    return encoder, decoder, 128 * 7 * 7


_VARIANTS = {"conv": _conv_parts, "prototype": _prototype_parts}


def build_vae(cfg: VAEConfig) -> VAE:
    """A freshly initialised VAE of ``cfg.variant`` with latent dimension ``cfg.latent_dim``."""
    if cfg.variant not in _VARIANTS:
        raise ConfigError(f"vae.variant = {cfg.variant!r} is not one of {', '.join(map(repr, _VARIANTS))}")
    if not isinstance(cfg.latent_dim, int) or cfg.latent_dim <= 0:
        raise ConfigError(f"vae.latent_dim must be a positive integer, got {cfg.latent_dim!r}")
    encoder, decoder, feature_dim = _VARIANTS[cfg.variant](cfg.latent_dim)
    return VAE(encoder, decoder, feature_dim, cfg.latent_dim, cfg.variant)


# ----------------------------------------------------------------------------------------------
# Loss and beta schedule


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(x: Tensor, y: Tensor, window_size: int = 11) -> Tensor:
    """Per-image SSIM (B,) of images in [0, 1] (Gaussian window, sigma 1.5, 'same' padding)."""
    window = _gaussian_window(window_size).to(x)
    pad = window_size // 2
    mu_x, mu_y = F.conv2d(x, window, padding=pad), F.conv2d(y, window, padding=pad)
    var_x = F.conv2d(x * x, window, padding=pad) - mu_x ** 2
    var_y = F.conv2d(y * y, window, padding=pad) - mu_y ** 2
    cov = F.conv2d(x * y, window, padding=pad) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def kl_per_sample(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(q(z|x) || N(0, I)) per sample (B,), summed over latent dimensions."""
    return -0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1)


def reconstruction_loss(logits: Tensor, x: Tensor, likelihood: str, ssim_weight: float = 1.0) -> Tensor:
    """Per-sample reconstruction loss (B,): Bernoulli NLL ("bce") or summed MSE + w * (1 - SSIM) ("mse_ssim")."""
    if likelihood == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
    if likelihood == "mse_ssim":
        recon = torch.sigmoid(logits)
        return ((recon - x) ** 2).flatten(1).sum(1) + ssim_weight * (1 - ssim(recon, x))
    raise ConfigError(f"vae.likelihood = {likelihood!r} is not one of 'bce', 'mse_ssim'")


def vae_loss(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float, likelihood: str,
             ssim_weight: float = 1.0) -> dict[str, Tensor]:
    """Batch means of 'loss' = recon + beta * kl, 'recon' and 'kl' (KL per sample)."""
    recon = reconstruction_loss(logits, x, likelihood, ssim_weight).mean()
    kl = kl_per_sample(mu, logvar).mean()
    return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def beta_schedule(step: int, total_steps: int, beta_start: float, beta_end: float) -> float:
    """Beta annealed linearly from beta_start (first step) to beta_end (last step)."""
    if total_steps <= 1:
        return float(beta_end)
    fraction = min(max(step / (total_steps - 1), 0.0), 1.0)
    return float(beta_start + (beta_end - beta_start) * fraction)


# ----------------------------------------------------------------------------------------------
# Training


def images_to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28) in [0, 1]."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected uint8 images of shape (n, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                         f"got {images.dtype} {tuple(images.shape)}")
    return images.unsqueeze(1).float().div_(255.0)


@dataclass
class TrainResult:
    """History (one dict per step: step, epoch, beta, loss, recon, kl) and summary metrics."""

    history: list[dict[str, float]]
    metrics: dict[str, float]


def train_vae(model: VAE, images: np.ndarray, cfg: VAEConfig, *, device: torch.device | str = "cpu",
              progress: bool = True, desc: str = "VAE") -> TrainResult:
    """Train ``model`` in place on uint8 images (n, 28, 28); raise VAETrainingError on NaN/inf loss."""
    if len(images) == 0:
        raise ValueError("no training images")
    device = torch.device(device)
    data = torch.as_tensor(images)
    images_to_tensor(data[:1])  # validates dtype and shape
    generator = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=desc, disable=not progress, leave=False)
    step = 0
    with seeded(cfg.seed):  # reparameterisation noise from the VAE's own seed, whatever ran before
        for epoch in range(cfg.epochs):
            order = torch.randperm(len(data), generator=generator)
            for batch_idx in order.split(cfg.batch_size):
                x = images_to_tensor(data[batch_idx]).to(device)
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


def vae_stem(cfg: Config, scope: str) -> str:
    """Default checkpoint stem: ``shared_vae_head_<d>`` or ``<dataset>_vae_head_<d>``."""
    return f"{scope}_vae_head_{cfg.vae.latent_dim}"


def vae_path(cfg: Config, scope: str, name: str | None = None) -> Path:
    """``models/<stem>.pt`` for a scope (or an explicit stem)."""
    return paths.models_dir() / f"{name or vae_stem(cfg, scope)}.pt"


def scope_datasets(cfg: Config, scope: str) -> tuple[str, ...]:
    """Datasets a VAE of this scope trains on: the meta-training datasets for "shared", else the one dataset."""
    if scope == "shared":
        return tuple(cfg.meta.train_datasets)
    known = set(BUILTIN_DATASETS) | set(cfg.data.custom_datasets)
    if scope not in known:
        raise ConfigError(f"unknown VAE scope {scope!r}; use 'shared' or a dataset name: {', '.join(sorted(known))}")
    return (scope,)


def _expected_meta(cfg: Config, scope: str, fingerprints: dict[str, str]) -> dict[str, Any]:
    vae_cfg = config_to_dict(cfg.vae)
    return {
        "kind": "vae",
        "scope": scope,
        "datasets": list(fingerprints),
        "model": {k: vae_cfg[k] for k in MODEL_KEYS},
        "training": {k: vae_cfg[k] for k in TRAINING_KEYS},
        "data_fingerprints": fingerprints,
    }


def _vae_from_checkpoint(path: Path, expected: dict[str, Any] | None = None) -> tuple[VAE, dict[str, Any]]:
    state, meta = load_checkpoint(path, expected)
    if meta.get("kind") != "vae" or "model" not in meta:
        raise ArtifactError(f"{path} is not a VAE checkpoint (kind={meta.get('kind')!r}); delete it to retrain")
    model = build_vae(VAEConfig(**meta["model"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"{path}: weights do not fit a {meta['model']} VAE ({str(err).splitlines()[0]}); "
                            "delete it to retrain") from err
    model.eval()
    meta = {**meta, "path": str(path), "vae_id": file_sha256(path)[:16]}
    return model, meta


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> tuple[VAE, dict[str, Any]]:
    """Load a VAE checkpoint (weights_only) -> (model in eval mode, meta incl. 'vae_id' and 'path')."""
    model, meta = _vae_from_checkpoint(Path(path))
    return model.to(device), meta


def get_vae(cfg: Config, scope: str, *, name: str | None = None, progress: bool = True,
            verbose: bool = True) -> tuple[VAE, dict[str, Any]]:
    """Load the VAE of ``scope`` ("shared" or a dataset) if its settings and data match, else train it.

    ``cfg.vae.retrain``: "auto" reuses a matching checkpoint and retrains a stale one, "never" refuses
    to train, "always" retrains. A checkpoint trained on other datasets is never overwritten under
    "auto" (pass ``name=`` to keep variants apart).
    """
    from hmlib.data import load_split  # imported here: hmlib.data is optional for model-only use

    datasets = scope_datasets(cfg, scope)
    image_sets = [load_split(d, "train", cfg.data, progress=progress) for d in datasets]
    fingerprints = {s.name: s.fingerprint for s in image_sets}
    expected = _expected_meta(cfg, scope, fingerprints)
    path = vae_path(cfg, scope, name)
    device = resolve_device(cfg.device)
    retrain = cfg.vae.retrain

    if path.exists() and retrain != "always":
        try:
            model, meta = _vae_from_checkpoint(path, expected)
            if verbose:
                print(f"Reusing VAE checkpoint {path.name} (settings and data fingerprints match).")
            return model.to(device), {**meta, "reused": True}
        except StaleArtifactError as err:
            recorded = _checkpoint_meta(path)
            changes = "; ".join(_setting_changes(recorded, expected)) or str(err)
            if retrain == "never":
                raise StaleArtifactError(f"{path} was made with other settings or data ({changes}); vae.retrain = "
                                         "'never': refusing to retrain. Set vae.retrain to 'auto' or 'always', or "
                                         "restore the matching settings.") from err
            if sorted(recorded.get("datasets", datasets)) != sorted(datasets):
                raise StaleArtifactError(
                    f"{path} was trained on {recorded['datasets']}, not {list(datasets)}; refusing to overwrite it. "
                    f"Pass name='...' to get_vae to keep this VAE apart, or set vae.retrain = 'always'.") from err
            print(f"VAE checkpoint {path.name} is stale ({changes}); retraining.")
        except ArtifactError as err:
            if retrain == "never":
                raise
            print(f"VAE checkpoint {path.name} is unreadable ({err}); retraining.")
    elif retrain == "never":
        raise ArtifactError(f"no VAE checkpoint at {path} and vae.retrain = 'never'; run notebook 02 "
                            "(or set vae.retrain = 'auto') to train it.")

    images, counts = select_training_images(image_sets, cfg.vae.max_train_images, cfg.vae.seed)
    with seeded(cfg.vae.seed):  # initial weights from the VAE's own seed
        model = build_vae(cfg.vae)
    print(f"Training {path.stem} on {counts} ({len(images)} images, {cfg.vae.epochs} epochs, {device}).")
    result = train_vae(model, images, cfg.vae, device=device, progress=progress, desc=path.stem)
    meta = {**expected, "name": path.stem, "train_counts": counts, "metrics": result.metrics,
            "history": result.history, "torch_version": str(torch.__version__)}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(path, state, meta)
    print(f"Saved {path} ({result.metrics['train_seconds']:.0f} s, "
          f"{result.metrics['train_images_per_second']:.0f} images/s).")
    return model, {**meta, "path": str(path), "vae_id": file_sha256(path)[:16], "reused": False}


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    """The recorded meta of a readable checkpoint (empty if unreadable)."""
    try:
        return load_checkpoint(path)[1]
    except ArtifactError:
        return {}


def _setting_changes(recorded: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose recorded value differs from the expected one, as 'key: recorded -> expected'."""
    changes = []
    for key, want in expected.items():
        have = recorded.get(key, "<absent>")
        if isinstance(want, dict) and isinstance(have, dict):
            changes += _setting_changes(have, want, f"{prefix}{key}.")
        elif have != want:
            changes.append(f"{prefix}{key}: {have!r} -> {want!r}")
    return changes


def vae_for_setting(cfg: Config, setting: str, dataset: str, *, progress: bool = True, verbose: bool = True
                    ) -> tuple[VAE, dict[str, Any]]:
    """The VAE a setting uses for a dataset: "zero_shot" -> shared VAE, "transductive" -> the dataset's own."""
    if setting == "zero_shot":
        return get_vae(cfg, "shared", progress=progress, verbose=verbose)
    if setting == "transductive":
        return get_vae(cfg, dataset, progress=progress, verbose=verbose)
    raise ValueError(f"unknown setting {setting!r}; use 'zero_shot' or 'transductive'")


@torch.no_grad()
def encode_images(vae: VAE, images: np.ndarray, *, batch_size: int = 2048, progress: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Encode uint8 images (n, 28, 28) -> (mu, logvar), each float32 (n, d), in eval mode."""
    data = torch.as_tensor(images)
    if len(data) == 0:
        return np.zeros((0, vae.latent_dim), np.float32), np.zeros((0, vae.latent_dim), np.float32)
    images_to_tensor(data[:1])
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    mus, logvars = [], []
    for start in tqdm(range(0, len(data), batch_size), desc="encode", disable=not progress, leave=False):
        mu, logvar = vae.encode(images_to_tensor(data[start:start + batch_size]).to(device))
        mus.append(mu.cpu())
        logvars.append(logvar.cpu())
    vae.train(was_training)
    return torch.cat(mus).numpy().astype(np.float32), torch.cat(logvars).numpy().astype(np.float32)


@torch.no_grad()
def reconstruct_images(vae: VAE, images: np.ndarray) -> np.ndarray:
    """Decoded posterior means of uint8 images (n, 28, 28) -> float32 (n, 28, 28) in [0, 1]."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    recon = vae.reconstruct(images_to_tensor(images).to(device))[:, 0].cpu().numpy()
    vae.train(was_training)
    return recon.astype(np.float32)


def vae_summary(metas: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per VAE (from get_vae's meta): name, datasets, reused, training size and cost, final loss terms."""
    rows = []
    for label, meta in metas.items():
        metrics = meta.get("metrics", {})
        rows.append({
            "vae": label, "checkpoint": meta.get("name"), "trained on": ", ".join(meta.get("datasets", [])),
            "reused": meta.get("reused"), "images/epoch": metrics.get("num_train_images"),
            "epochs": meta.get("training", {}).get("epochs"), "train s": round(metrics.get("train_seconds", float("nan")), 1),
            "final recon": round(metrics.get("final_recon", float("nan")), 2),
            "final KL": round(metrics.get("final_kl", float("nan")), 2),
        })
    return rows
