"""Generators: from a task code, the parameters of the task-specific classifier, and that classifier's forward.

Every generator owns its whole target network: ``prepare`` (per-task view of the images' features),
``forward`` (task code -> parameter dict), ``logits`` (parameters -> (T, N, K)), ``adaptable`` (what the
inner loop updates), ``extend`` (logits of images outside the task, for sets larger than one task) and
``check_config`` (what it needs of the configuration). ``GENERATORS`` is the registry.

- ``cluster`` (default): the task's features (backbone embeddings, or [mu, logvar]) standardised over the
  task and L2-normalised, smoothed over the task's kNN graph (feature diffusion with a generated weight
  alpha), K prototypes computed from the task by k-means in that space (gradients flow through the
  centroids), logits = generated temperature x cosine similarity.
- ``full`` (the prototype's): one MLP head per layer emits all weights and biases of a target MLP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlib.config import Config, HyperConfig
from hmlib.features import standardize
from hmlib.hyper.encoders import mlp

Params = dict[str, Tensor]


@dataclass
class TaskState:
    """A task's features as the target network reads them (computed once, before any inner step)."""

    z: Tensor  # (T, N, F) normalised features; also the inner losses' reference
    graph: Tensor | None = None  # (T, N, N) row-normalised symmetric kNN adjacency, or None
    mean: Tensor | None = None  # (T, 1, F) the task's feature statistics (to place rows outside the task)
    std: Tensor | None = None


# ------------------------------------------------------------------------------ task-level operations

def knn_graph(z: Tensor, neighbors: int) -> Tensor:
    """Row-normalised symmetrised kNN adjacency (T, N, N) of unit rows z (T, N, F) by cosine similarity."""
    with torch.no_grad():
        sim = z @ z.transpose(-1, -2)
        sim.diagonal(dim1=-2, dim2=-1).fill_(-float("inf"))
        index = sim.topk(min(neighbors, z.shape[-2] - 1), dim=-1).indices
        adjacency = torch.zeros_like(sim).scatter_(-1, index, 1.0)
        adjacency = (adjacency + adjacency.transpose(-1, -2)) / 2
        return adjacency / adjacency.sum(-1, keepdim=True).clamp_min(1e-12)


def diffuse(z: Tensor, graph: Tensor | None, alpha: Tensor, steps: int) -> Tensor:
    """h <- (1 - alpha) z + alpha A h, ``steps`` times, then L2-normalised; alpha (T, 1) in (0, 1)."""
    if graph is None or steps == 0:
        return z
    weight = alpha.unsqueeze(-1)  # (T, 1, 1)
    h = z
    for _ in range(steps):
        h = (1 - weight) * z + weight * (graph @ h)
    return F.normalize(h, dim=-1)


def _sq_dist(h: Tensor, centers: Tensor) -> Tensor:
    """Squared distances (..., M, K) between rows h (..., M, E) and centers (..., K, E) (one matrix product)."""
    dist = (h * h).sum(-1, keepdim=True) - 2 * h @ centers.transpose(-1, -2) + (centers * centers).sum(-1).unsqueeze(-2)
    return dist.clamp_min(0.0)


def kmeans_prototypes(h: Tensor, num_clusters: int, iters: int = 10, inits: int = 10, seed: int = 0) -> Tensor:
    """K-means centroids of each task's rows, h (T, M, E) -> (T, K, E).

    Deterministic k-means++ seeding (``inits`` seedings from a fixed generator, the same for every task, so a
    batch of tasks gives the same result as one at a time), ``iters`` Lloyd iterations and the choice of the
    seeding with the lowest inertia run without gradients; the returned centroids are the means of the rows
    of each final cluster, so gradients flow through h (an empty cluster keeps its seed centre).
    """
    T, M, E = h.shape
    K, R = num_clusters, max(1, inits)
    with torch.no_grad():
        hd = h.detach().unsqueeze(1).expand(T, R, M, E)
        u = torch.rand(R, K, generator=torch.Generator().manual_seed(seed)).to(h.device, h.dtype)
        first = (u[:, 0] * M).long().clamp(max=M - 1)  # (R,)
        centers = hd.gather(2, first.view(1, R, 1, 1).expand(T, R, 1, E))
        d2 = _sq_dist(hd, centers).squeeze(-1)  # (T, R, M)
        for k in range(1, K):  # k-means++: inverse-CDF draw proportional to the squared distance
            cdf = d2.cumsum(-1)
            target = u[:, k].view(1, R, 1) * cdf[..., -1:]
            idx = torch.searchsorted(cdf.contiguous(), target.contiguous()).clamp(max=M - 1)  # (T, R, 1)
            new = hd.gather(2, idx.unsqueeze(-1).expand(T, R, 1, E))
            centers = torch.cat([centers, new], dim=2)
            d2 = torch.minimum(d2, _sq_dist(hd, new).squeeze(-1))
        for _ in range(iters):
            onehot = F.one_hot(_sq_dist(hd, centers).argmin(-1), K).to(h.dtype)  # (T, R, M, K)
            counts = onehot.sum(2).unsqueeze(-1)  # (T, R, K, 1)
            centers = torch.where(counts > 0, onehot.transpose(-1, -2) @ hd / counts.clamp_min(1), centers)
        dist = _sq_dist(hd, centers)
        best = dist.min(-1).values.sum(-1).argmin(-1)  # (T,): the seeding with the lowest inertia
        arange = torch.arange(T, device=h.device)
        onehot = F.one_hot(dist.argmin(-1)[arange, best], K).to(h.dtype)  # (T, M, K)
        fallback = centers[arange, best]  # (T, K, E)
        counts = onehot.sum(1).unsqueeze(-1)  # (T, K, 1)
    return torch.where(counts > 0, onehot.transpose(-1, -2) @ h / counts.clamp_min(1), fallback)


# ---------------------------------------------------------------------------------------- generators

class ClusterGenerator(nn.Module):
    """Generated temperature and diffusion weight; prototypes computed from the task (k-means), refined by the inner loop."""

    def __init__(self, cfg: HyperConfig, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.uses_graph = cfg.graph_neighbors > 0 and cfg.diffusion_steps > 0
        self.log_tau = nn.Linear(cfg.embed_dim, 1)
        self.alpha_logit = nn.Linear(cfg.embed_dim, 1)
        with torch.no_grad():  # start at the configured values whatever the task code
            for head, value in ((self.log_tau, math.log(cfg.cluster_tau)),
                                (self.alpha_logit, math.log(cfg.diffusion_alpha / (1 - cfg.diffusion_alpha)))):
                head.weight.zero_()
                head.bias.fill_(value)

    @staticmethod
    def check_config(cfg: Config) -> None:
        """Any target input and conditioning work."""

    def prepare(self, features: Tensor) -> TaskState:
        x, mean, std = standardize(features)
        z = F.normalize(x, dim=-1)
        return TaskState(z, knn_graph(z, self.cfg.graph_neighbors) if self.uses_graph else None, mean, std)

    def embed(self, params: Params, state: TaskState) -> Tensor:
        """The task's rows in the cluster space: diffused over the kNN graph with the generated weight."""
        return diffuse(state.z, state.graph, torch.sigmoid(params["alpha_logit"]), self.cfg.diffusion_steps)

    def forward(self, code: Tensor, state: TaskState, num_classes: int | None = None) -> Params:
        params = {"log_tau": self.log_tau(code), "alpha_logit": self.alpha_logit(code)}
        params["prototypes"] = kmeans_prototypes(self.embed(params, state), num_classes or self.num_classes,
                                                 self.cfg.cluster_iters, self.cfg.cluster_inits)
        return params

    def logits(self, params: Params, state: TaskState) -> Tensor:
        h = self.embed(params, state)
        prototypes = F.normalize(params["prototypes"], dim=-1)
        return params["log_tau"].exp().unsqueeze(-1) * (h @ prototypes.transpose(-1, -2))

    def adaptable(self, params: Params) -> list[str]:
        return ["log_tau", "alpha_logit", "prototypes"] if self.uses_graph else ["log_tau", "prototypes"]

    def extend(self, params: Params, state: TaskState, features: Tensor) -> Tensor:
        """Logits (T, M, K) of rows outside the task: standardised with the task's statistics, diffused one step
        towards their nearest task rows (the task's fixed point), scored against the task's prototypes."""
        z = F.normalize((features - state.mean) / state.std, dim=-1)
        if state.graph is not None:
            alpha = torch.sigmoid(params["alpha_logit"]).unsqueeze(-1)
            index = (z @ state.z.transpose(-1, -2)).topk(min(self.cfg.graph_neighbors, state.z.shape[-2]), dim=-1).indices
            h_task = self.embed(params, state)  # (T, N, F)
            neighbours = torch.gather(h_task.unsqueeze(1).expand(-1, z.shape[1], -1, -1), 2,
                                      index.unsqueeze(-1).expand(-1, -1, -1, z.shape[-1])).mean(2)
            z = F.normalize((1 - alpha) * z + alpha * neighbours, dim=-1)
        prototypes = F.normalize(params["prototypes"], dim=-1)
        return params["log_tau"].exp().unsqueeze(-1) * (z @ prototypes.transpose(-1, -2))


class FullGenerator(nn.Module):
    """The prototype's generation: one MLP head per target layer emits all of its weights and biases."""

    def __init__(self, cfg: HyperConfig, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        dims = [feature_dim, *cfg.target_hidden, num_classes]
        self.shapes = list(zip(dims[1:], dims[:-1]))  # (out, in) per layer
        self.heads = nn.ModuleList()
        for out_dim, in_dim in self.shapes:
            head = mlp(cfg.embed_dim, cfg.head_hidden, out_dim * in_dim + out_dim)
            nn.init.normal_(head[-1].weight, std=0.01)
            reference = nn.Linear(in_dim, out_dim)  # start the generated layer at a standard init
            with torch.no_grad():
                head[-1].bias.copy_(torch.cat([reference.weight.flatten(), reference.bias]))
            self.heads.append(head)

    @staticmethod
    def check_config(cfg: Config) -> None:
        """Any target input and conditioning work."""

    def prepare(self, features: Tensor) -> TaskState:
        x, mean, std = standardize(features)
        return TaskState(x, None, mean, std)

    def forward(self, code: Tensor, state: TaskState, num_classes: int | None = None) -> Params:
        if num_classes not in (None, self.shapes[-1][0]):
            raise ValueError(f"the 'full' generator emits exactly {self.shapes[-1][0]} outputs, not {num_classes}; "
                             "a checkpoint with generation 'cluster' clusters into any K")
        params = {}
        for i, (head, (out_dim, in_dim)) in enumerate(zip(self.heads, self.shapes)):
            flat = head(code)  # (T, out*in + out)
            params[f"layers.{i}.weight"] = flat[:, : out_dim * in_dim].reshape(-1, out_dim, in_dim)
            params[f"layers.{i}.bias"] = flat[:, out_dim * in_dim:]
        return params

    def logits(self, params: Params, state: TaskState) -> Tensor:
        x = state.z
        for i in range(len(self.shapes)):
            x = x @ params[f"layers.{i}.weight"].transpose(-1, -2) + params[f"layers.{i}.bias"].unsqueeze(-2)
            if i < len(self.shapes) - 1:
                x = torch.relu(x)
        return x

    def adaptable(self, params: Params) -> list[str]:
        return list(params)

    def extend(self, params: Params, state: TaskState, features: Tensor) -> Tensor:
        """Logits (T, M, K) of rows outside the task, standardised with the task's statistics."""
        return self.logits(params, TaskState((features - state.mean) / state.std))


# The registry of generators: config validation, ablations and docs read it; add one here.
GENERATORS: dict[str, Any] = {"cluster": ClusterGenerator, "full": FullGenerator}
