"""The hypernetwork: reads a task's VAE distribution and emits the parameters of a small target MLP.

Shapes: a task has N images with latent dimension d; its *context* is the matrix of rows
[mu, logvar] (M, 2d). Every module accepts an optional leading task dimension T, so a meta-batch of
tasks runs as one batched computation: context (T, M, 2d) -> parameters with a leading T.

The emitted parameter dict is exactly the parameter set of :class:`TargetNet`, so it can be used with
``torch.func.functional_call(TargetNet(...), params, (x,))`` or, faster, :func:`target_forward`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from hmlib.config import HyperConfig

EPS = 1e-5
PIXELS = 28 * 28


@dataclass
class TaskInputs:
    """One task (or a batch of tasks with a leading T dimension): VAE posteriors and optional pixels."""

    mu: Tensor  # (N, d) or (T, N, d)
    logvar: Tensor  # same shape as mu
    pixels: Tensor | None = None  # (N, 784) or (T, N, 784), floats in [0, 1]

    def __post_init__(self) -> None:
        if self.mu.shape != self.logvar.shape:
            raise ValueError(f"mu and logvar differ in shape: {tuple(self.mu.shape)} vs {tuple(self.logvar.shape)}")
        if self.mu.dim() not in (2, 3):
            raise ValueError(f"mu must be (N, d) or (T, N, d), got shape {tuple(self.mu.shape)}")
        if self.pixels is not None and self.pixels.shape[:-1] != self.mu.shape[:-1]:
            raise ValueError(f"pixels {tuple(self.pixels.shape)} do not match mu {tuple(self.mu.shape)} in (T,) N")

    @property
    def rows(self) -> Tensor:
        """The task's VAE distribution [mu, logvar], shape (..., N, 2d)."""
        return torch.cat([self.mu, self.logvar], dim=-1)

    @classmethod
    def from_arrays(cls, mu, logvar, pixels=None) -> "TaskInputs":
        """Build float32 tensors from numpy arrays (pixels may be uint8 images (N, 28, 28))."""
        pix = None
        if pixels is not None:
            is_uint8 = getattr(pixels, "dtype", None) in (np.uint8, torch.uint8)
            pix = torch.as_tensor(pixels).float()
            if pix.dim() >= 3 and tuple(pix.shape[-2:]) == (28, 28):  # images (..., 28, 28) -> (..., 784)
                pix = pix.flatten(-2)
            if is_uint8:
                pix = pix / 255.0
        return cls(torch.as_tensor(mu).float(), torch.as_tensor(logvar).float(), pix)


def normalize_task(x: Tensor) -> Tensor:
    """Centre and scale every column by the task's own statistics over its rows (dim -2)."""
    mean = x.mean(dim=-2, keepdim=True)
    std = x.std(dim=-2, keepdim=True, unbiased=False)
    return (x - mean) / (std + EPS)


def whiten_task(x: Tensor, shrinkage: float = 0.1) -> Tensor:
    """Standardise, then decorrelate the columns with the task's own (shrunk) covariance: ZCA whitening."""
    z = normalize_task(x)
    cov = z.transpose(-1, -2) @ z / z.shape[-2]
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    evals, evecs = torch.linalg.eigh((1 - shrinkage) * cov + shrinkage * eye)
    inv_sqrt = evecs @ torch.diag_embed(evals.clamp_min(EPS).rsqrt()) @ evecs.transpose(-1, -2)
    return z @ inv_sqrt


def target_layer_shapes(in_dim: int, hidden: tuple[int, ...], num_classes: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the target MLP's parameters (same names as TargetNet's state dict)."""
    dims = [in_dim, *hidden, num_classes]
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        shapes[f"layers.{i}.weight"] = (fan_out, fan_in)
        shapes[f"layers.{i}.bias"] = (fan_out,)
    return shapes


def target_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """Run the target network: x (..., N, in) with params (..., out, in) -> logits (..., N, K).

    A plain MLP, or (when the dict holds ``prototypes``) the cluster head of ``hyper.generation='cluster'``.
    """
    if "prototypes" in params:
        return cluster_logits(cluster_embed(params, x), params["prototypes"], params["log_tau"])
    return _mlp_forward(params, x)


def _mlp_forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
    num_layers = sum(1 for k in params if k.startswith("layers.")) // 2
    for i in range(num_layers):
        weight, bias = params[f"layers.{i}.weight"], params[f"layers.{i}.bias"]
        x = x @ weight.transpose(-1, -2) + bias.unsqueeze(-2)
        if i < num_layers - 1:
            x = torch.relu(x)
    return x


# ------------------------------------------------------------------------------------ cluster head
def cluster_embed(params: dict[str, Tensor], x: Tensor) -> Tensor:
    """The cluster head's embedding g(x) = x + MLP(x) (residual: the identity when the MLP's last layer is 0)."""
    return x + _mlp_forward(params, x)


def cluster_logits(h: Tensor, prototypes: Tensor, log_tau: Tensor) -> Tensor:
    """Logits -tau * mean squared distance: h (..., N, E), prototypes (..., K, E), log_tau (..., 1) -> (..., N, K)."""
    sq_dist = ((h.unsqueeze(-2) - prototypes.unsqueeze(-3)) ** 2).mean(-1)
    return -log_tau.exp().unsqueeze(-1) * sq_dist


def _sq_dist(h: Tensor, centers: Tensor) -> Tensor:
    """Squared distances (..., M, K) between rows h (..., M, E) and centers (..., K, E)."""
    return ((h.unsqueeze(-2) - centers.unsqueeze(-3)) ** 2).sum(-1)


def kmeans_prototypes(h: Tensor, num_clusters: int, iters: int = 5, inits: int = 4, seed: int = 0) -> Tensor:
    """K-means centroids of each task's embedded rows, h (T, M, E) -> (T, K, E).

    Deterministic k-means++ seeding (``inits`` seedings from a fixed generator, the same for every task, so a
    batch of tasks gives the same result as one at a time), ``iters`` Lloyd iterations and the choice of the
    seeding with the lowest inertia all run without gradients; the returned centroids are the means of the
    embedded rows of each final cluster, so gradients flow through h (an empty cluster keeps its seed centre).
    """
    T, M, _ = h.shape
    K, R = num_clusters, max(1, inits)
    with torch.no_grad():
        hd = h.detach().unsqueeze(1).expand(T, R, M, h.shape[-1])  # (T, R, M, E)
        u = torch.rand(R, K, generator=torch.Generator().manual_seed(seed)).to(h.device, h.dtype)
        first = (u[:, 0] * M).long().clamp(max=M - 1)  # (R,)
        centers = hd.gather(2, first.view(1, R, 1, 1).expand(T, R, 1, hd.shape[-1]))
        d2 = _sq_dist(hd, centers).squeeze(-1)  # (T, R, M)
        for k in range(1, K):  # k-means++: inverse-CDF draw proportional to the squared distance
            cdf = d2.cumsum(-1)
            target = u[:, k].view(1, R, 1) * cdf[..., -1:]
            idx = torch.searchsorted(cdf.contiguous(), target.contiguous()).clamp(max=M - 1)  # (T, R, 1)
            new = hd.gather(2, idx.unsqueeze(-1).expand(T, R, 1, hd.shape[-1]))
            centers = torch.cat([centers, new], dim=2)
            d2 = torch.minimum(d2, _sq_dist(hd, new).squeeze(-1))
        for _ in range(iters):
            onehot = torch.nn.functional.one_hot(_sq_dist(hd, centers).argmin(-1), K).to(h.dtype)  # (T, R, M, K)
            counts = onehot.sum(2).unsqueeze(-1)  # (T, R, K, 1)
            means = onehot.transpose(-1, -2) @ hd / counts.clamp_min(1)
            centers = torch.where(counts > 0, means, centers)
        dist = _sq_dist(hd, centers)
        assign = dist.argmin(-1)  # (T, R, M)
        inertia = dist.min(-1).values.sum(-1)  # (T, R)
        best = inertia.argmin(-1)  # (T,)
        arange = torch.arange(T, device=h.device)
        onehot = torch.nn.functional.one_hot(assign[arange, best], K).to(h.dtype)  # (T, M, K)
        fallback = centers[arange, best]  # (T, K, E)
        counts = onehot.sum(1).unsqueeze(-1)  # (T, K, 1)
    means = onehot.transpose(-1, -2) @ h / counts.clamp_min(1)
    return torch.where(counts > 0, means, fallback)


class TargetNet(nn.Module):
    """The target MLP as a module, for ``torch.func.functional_call`` with a generated param dict."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        dims = [in_dim, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        return target_forward(dict(self.named_parameters()), x)


# ----------------------------------------------------------------------------------- set encoders
def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
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
        self.row_mlp = _mlp(row_dim, cfg.embed_dim, cfg.embed_dim)
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


class StatsPool(nn.Module):
    """DeepSets with mean and spread: row MLP, then the mean and standard deviation over rows."""

    def __init__(self, row_dim: int, cfg: HyperConfig):
        super().__init__()
        self.row_mlp = _mlp(row_dim, cfg.embed_dim, cfg.embed_dim)
        self.out = _mlp(2 * cfg.embed_dim, cfg.embed_dim, cfg.embed_dim)

    def forward(self, rows: Tensor) -> Tensor:
        h = self.row_mlp(rows)
        return self.out(torch.cat([h.mean(dim=-2), h.std(dim=-2, unbiased=False)], dim=-1))


class HyperFastPool(nn.Module):
    """HyperFast-style, label-free: fixed random ReLU features, then PCA statistics of the task."""

    def __init__(self, row_dim: int, cfg: HyperConfig):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(row_dim, cfg.random_features, generator=generator)
                             / math.sqrt(row_dim))
        self.num_components = cfg.num_components
        self.out = _mlp(cfg.random_features * (1 + cfg.num_components), cfg.embed_dim, cfg.embed_dim)

    def forward(self, rows: Tensor) -> Tensor:
        with torch.no_grad():  # fixed features of the data: nothing to learn before the PCA
            feats = torch.relu(rows @ self.projection)  # (T, M, F)
            mean = feats.mean(dim=-2)
            _, sing, vh = torch.linalg.svd(feats - mean.unsqueeze(-2), full_matrices=False)
            comps = vh[:, : self.num_components]  # (T, C, F); fix each component's sign for determinism
            signs = torch.sign(comps.gather(-1, comps.abs().argmax(dim=-1, keepdim=True)))
            comps = comps * signs * (sing[:, : self.num_components] / math.sqrt(rows.shape[1])).unsqueeze(-1)
            stats = torch.cat([mean, comps.flatten(1)], dim=-1)
        return self.out(stats)


ENCODERS = {"attention": AttentionPool, "multihead": MultiheadPool, "stats": StatsPool, "hyperfast": HyperFastPool}


# ------------------------------------------------------------------------------------- generators
class FullGenerator(nn.Module):
    """Prototype generation: one MLP head per target layer emitting all of its weights and biases."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], cfg: HyperConfig):
        super().__init__()
        self.shapes = shapes
        self.heads = nn.ModuleList()
        for i in range(len(shapes) // 2):
            out_dim, in_dim = shapes[f"layers.{i}.weight"]
            head = _mlp(cfg.embed_dim, cfg.head_hidden, out_dim * in_dim + out_dim)
            nn.init.normal_(head[-1].weight, std=0.01)
            reference = nn.Linear(in_dim, out_dim)  # start the generated layer at a standard init
            with torch.no_grad():
                head[-1].bias.copy_(torch.cat([reference.weight.flatten(), reference.bias]))
            self.heads.append(head)

    def forward(self, embedding: Tensor) -> dict[str, Tensor]:
        params = {}
        for i, head in enumerate(self.heads):
            out_dim, in_dim = self.shapes[f"layers.{i}.weight"]
            flat = head(embedding)  # (T, out*in + out)
            params[f"layers.{i}.weight"] = flat[:, : out_dim * in_dim].reshape(-1, out_dim, in_dim)
            params[f"layers.{i}.bias"] = flat[:, out_dim * in_dim:]
        return params


class CompactGenerator(nn.Module):
    """Learned base MLP; generated FiLM modulation of hidden layers and a generated last layer offset."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], cfg: HyperConfig):
        super().__init__()
        self.num_layers = len(shapes) // 2
        self.base = TargetNet(shapes["layers.0.weight"][1], tuple(cfg.target_hidden),
                              shapes[f"layers.{self.num_layers - 1}.weight"][0])
        self.hidden_sizes = [shapes[f"layers.{i}.weight"][0] for i in range(self.num_layers - 1)]
        self.film = _mlp(cfg.embed_dim, cfg.head_hidden, 2 * sum(self.hidden_sizes)) if self.hidden_sizes else None
        num_classes, last_in = shapes[f"layers.{self.num_layers - 1}.weight"]
        self.last = _mlp(cfg.embed_dim, cfg.head_hidden, num_classes * last_in + num_classes)
        for head in (self.film, self.last):
            if head is not None:
                nn.init.normal_(head[-1].weight, std=0.01)
                nn.init.zeros_(head[-1].bias)

    def forward(self, embedding: Tensor) -> dict[str, Tensor]:
        T = embedding.shape[0]
        base = dict(self.base.named_parameters())
        params = {}
        if self.film is not None:
            gamma, beta = self.film(embedding).chunk(2, dim=-1)  # (T, sum(hidden)) each
            gammas, betas = gamma.split(self.hidden_sizes, -1), beta.split(self.hidden_sizes, -1)
            for i in range(self.num_layers - 1):
                scale = 1.0 + gammas[i]  # FiLM on pre-activations == scaling rows of W and b
                params[f"layers.{i}.weight"] = base[f"layers.{i}.weight"] * scale.unsqueeze(-1)
                params[f"layers.{i}.bias"] = base[f"layers.{i}.bias"] * scale + betas[i]
        last = self.num_layers - 1
        weight, bias = base[f"layers.{last}.weight"], base[f"layers.{last}.bias"]
        flat = self.last(embedding)
        params[f"layers.{last}.weight"] = weight + flat[:, : weight.numel()].reshape(T, *weight.shape)
        params[f"layers.{last}.bias"] = bias + flat[:, weight.numel():]
        return params


class ClusterGenerator(nn.Module):
    """Cluster head: a compact-generated residual embedding MLP (identity at init) and a learned temperature.

    The prototypes are not generated from the pooled vector but computed from the task itself (k-means in
    the embedding space, :func:`kmeans_prototypes`) by :class:`HyperNet`; they join the param dict, so the
    inner loop refines them like any other generated parameter.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], cfg: HyperConfig):
        super().__init__()
        self.mlp = CompactGenerator({k: v for k, v in shapes.items() if k.startswith("layers.")}, cfg)
        last = self.mlp.num_layers - 1
        with torch.no_grad():  # g starts as the identity: zero residual branch
            self.mlp.base.layers[last].weight.zero_()
            self.mlp.base.layers[last].bias.zero_()
        self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.cluster_tau)))

    def forward(self, embedding: Tensor) -> dict[str, Tensor]:
        params = self.mlp(embedding)
        params["log_tau"] = self.log_tau.expand(embedding.shape[0], 1)
        return params


GENERATORS = {"full": FullGenerator, "compact": CompactGenerator, "cluster": ClusterGenerator}


class HyperNet(nn.Module):
    """Set encoder over the task's [mu, logvar] rows + generator of the target MLP's parameters."""

    def __init__(self, cfg: HyperConfig, latent_dim: int, num_classes: int):
        super().__init__()
        if cfg.conditioning not in ENCODERS:
            raise ValueError(f"hyper.conditioning={cfg.conditioning!r}; choose one of {sorted(ENCODERS)}")
        if cfg.generation not in GENERATORS:
            raise ValueError(f"hyper.generation={cfg.generation!r}; choose one of {sorted(GENERATORS)}")
        self.cfg, self.latent_dim, self.num_classes = cfg, latent_dim, num_classes
        self.use_pixels = cfg.target_input == "latent+pixels"
        self.pixel_proj = nn.Linear(PIXELS, cfg.pixel_dim) if self.use_pixels else None
        self.target_in_dim = 2 * latent_dim + (cfg.pixel_dim if self.use_pixels else 0)
        self.is_cluster = cfg.generation == "cluster"
        if self.is_cluster:
            if self.use_pixels:  # the prototypes come from the context rows, which must be the target's inputs
                raise ValueError("hyper.generation='cluster' needs hyper.target_input='latent'")
            dim = self.target_in_dim  # residual embedding: same width in and out
            self.target_shapes = {**target_layer_shapes(dim, tuple(cfg.target_hidden), dim),
                                  "prototypes": (num_classes, dim), "log_tau": (1,)}
        else:
            self.target_shapes = target_layer_shapes(self.target_in_dim, tuple(cfg.target_hidden), num_classes)
        self.encoder = ENCODERS[cfg.conditioning](2 * latent_dim, cfg)
        self.generator = GENERATORS[cfg.generation](self.target_shapes, cfg)

    @property
    def last_layer_keys(self) -> tuple[str, str]:
        """Names of the target's last layer parameters (adapt_params='last'); the cluster head's prototypes and tau."""
        if self.is_cluster:
            return "prototypes", "log_tau"
        last = len(self.target_shapes) // 2 - 1
        return f"layers.{last}.weight", f"layers.{last}.bias"

    def _normalize(self, x: Tensor) -> Tensor:
        if self.cfg.normalize == "whiten":
            return whiten_task(x)
        return normalize_task(x) if self.cfg.normalize == "task" else x

    def context(self, inputs: TaskInputs) -> Tensor:
        """Conditioning rows: the task's [mu, logvar] rows, at most num_context of them (forward normalises)."""
        self._check_latent(inputs.mu)
        return inputs.rows[..., : self.cfg.num_context, :]

    def target_features(self, inputs: TaskInputs) -> Tensor:
        """Target network input per image: normalised [mu, logvar] (+ projected pixels), (..., N, in)."""
        self._check_latent(inputs.mu)
        feats = self._normalize(inputs.rows)
        if self.use_pixels:
            if inputs.pixels is None:
                raise ValueError("hyper.target_input='latent+pixels' needs TaskInputs.pixels (N, 784)")
            feats = torch.cat([feats, self._normalize(self.pixel_proj(inputs.pixels))], dim=-1)
        return feats

    def forward(self, context: Tensor) -> dict[str, Tensor]:
        """Context rows (M, 2d) or (T, M, 2d) -> target parameters (leading T iff the input had one)."""
        if context.shape[-1] != 2 * self.latent_dim:
            raise ValueError(f"context rows have {context.shape[-1]} columns, expected 2*latent_dim="
                             f"{2 * self.latent_dim} ([mu, logvar])")
        batched = context.dim() == 3
        rows = self._normalize(context if batched else context.unsqueeze(0))
        params = self.generator(self.encoder(rows))
        if self.is_cluster:  # prototypes from the task itself: k-means on the embedded (normalised) rows
            params["prototypes"] = kmeans_prototypes(cluster_embed(params, rows), self.num_classes,
                                                     self.cfg.cluster_iters, self.cfg.cluster_inits)
        return params if batched else {k: v.squeeze(0) for k, v in params.items()}

    def _check_latent(self, mu: Tensor) -> None:
        if mu.shape[-1] != self.latent_dim:
            raise ValueError(f"latents have dimension {mu.shape[-1]} but this hypernetwork was built for "
                             f"{self.latent_dim}; use latents from the VAE it was trained with")
