"""The convolutional VAE: models, loss terms and the beta schedule (notebook 02).

Two variants share one interface (``VAE.encode``/``decode``/``forward``): ``"conv"``, a compact
two-layer conv encoder with a transposed-conv decoder, and ``"prototype"``, METHOD.md's residual
encoder 1->32->64->128 (28->14->7) with a pixel-shuffle decoder. The decoder always returns logits;
``"bce"`` reads them as Bernoulli logits, ``"mse_ssim"`` as ``sigmoid(logits)`` images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlib.config import ConfigError, VAEConfig

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
