"""Set encoders: they pool a task's conditioning rows (its VAE distribution [mu, logvar]) into one vector.

Each encoder maps rows (T, M, C) -> a task code (T, E), with E = ``hyper.embed_dim``; none of them sees a
label. ``ENCODERS`` is the registry that ``hyper.conditioning`` chooses from.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hmlib.config import HyperConfig


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


class AttentionPool(nn.Module):
    """Prototype conditioning: one learned query, softmax over rows of <row, q>, weighted mean of rows."""

    def __init__(self, row_dim: int, cfg: HyperConfig):
        super().__init__()
        self.query = nn.Parameter(torch.randn(row_dim) / math.sqrt(row_dim))
        self.proj = nn.Linear(row_dim, cfg.embed_dim)

    def forward(self, rows: Tensor) -> Tensor:
        weights = torch.softmax(rows @ self.query, dim=-1)  # (T, M)
        return self.proj((weights.unsqueeze(-1) * rows).sum(dim=-2))


class MultiheadPool(nn.Module):
    """Row MLP, then multi-head attention pooling with several learned seed queries (Set Transformer PMA)."""

    def __init__(self, row_dim: int, cfg: HyperConfig):
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"hyper.embed_dim={cfg.embed_dim} must be divisible by hyper.num_heads={cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.row_mlp = mlp(row_dim, cfg.embed_dim, cfg.embed_dim)
        self.seeds = nn.Parameter(torch.randn(cfg.num_seeds, cfg.embed_dim) / math.sqrt(cfg.embed_dim))
        self.key = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.value = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.out = nn.Sequential(nn.Linear(cfg.num_seeds * cfg.embed_dim, cfg.embed_dim), nn.ReLU(),
                                 nn.Linear(cfg.embed_dim, cfg.embed_dim))

    def forward(self, rows: Tensor) -> Tensor:
        T, M = rows.shape[0], rows.shape[1]
        S, E, H = self.seeds.shape[0], self.seeds.shape[1], self.num_heads
        h = self.row_mlp(rows)  # (T, M, E)
        keys = self.key(h).view(T, M, H, E // H).transpose(1, 2)  # (T, H, M, E/H)
        values = self.value(h).view(T, M, H, E // H).transpose(1, 2)
        queries = self.seeds.view(S, H, E // H).transpose(0, 1)  # (H, S, E/H)
        attn = torch.softmax(queries @ keys.transpose(-1, -2) / math.sqrt(E // H), dim=-1)  # (T, H, S, M)
        pooled = (attn @ values).transpose(1, 2).reshape(T, S * E)
        return self.out(pooled)


# The registry of conditioning encoders: config validation, ablations and docs read it; add one here.
ENCODERS = {"attention": AttentionPool, "multihead": MultiheadPool}
