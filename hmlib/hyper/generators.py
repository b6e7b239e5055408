"""Generators: from a task code, the task-specific part of the network, and that network's forward pass.

Every generator implements the :class:`Generator` interface: ``prepare`` (the task's inputs as the target
network reads them), ``forward`` (task code -> generated parameters, a dict of (T, ...) tensors), ``logits``
((T, N, K) under given parameters), ``adaptable`` (the names the inner loop updates), ``inner_lrs`` (their
step sizes), ``extend`` (logits of images outside the task) and ``check_config``. ``GENERATORS`` is the
registry that ``hyper.generation`` chooses from.

- ``film`` (default, method v3): for every normalisation layer of the backbone, a per-channel FiLM (scale and
  shift) and the blend between the backbone's stored statistics and the task's own (TaskNorm); the generated
  modulation changes the *representation* of the task's images. The cluster head is computed, not generated:
  K prototypes by differentiable k-means on the modulated embedding, and a generated temperature. The inner
  loop updates the FiLM of the last ``film.adapt_blocks`` blocks and the head with per-parameter, meta-learned
  step sizes (Meta-SGD); the blocks below are computed once per task.
- ``full`` (the prototype's, ``seed`` profile): one MLP head per layer emits all weights and biases of a target
  MLP on the task's [mu, logvar] rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlib.backbone import modulation as mod
from hmlib.backbone.model import ConvBackbone, augment, blocks
from hmlib.config import Config, FilmConfig, FullConfig, HyperConfig, ConfigError
from hmlib.features import standardize, to_device
from hmlib.hyper.cluster_ops import cosine_logits, kmeans_prototypes
from hmlib.hyper.encoders import mlp

Params = dict[str, Tensor]


@dataclass
class TaskInputs:
    """One task, or a batch with a leading T: conditioning rows and what the target network reads.

    ``context`` (T, M, C): the task's VAE distribution rows. ``images`` (T, N, 28, 28) uint8 or (T, N, 1, 28, 28)
    float in [0, 1] (generator ``film``), or ``features`` (T, N, F) (generator ``full``).
    """

    context: Tensor
    images: Tensor | None = None
    features: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images is not None and self.images.dtype == torch.uint8:
            self.images = self.images.unsqueeze(-3).float().div(255.0)
        main = self.images if self.images is not None else self.features
        if main is None:
            raise ValueError("TaskInputs needs images or features")
        lead = main.dim() - (3 if self.images is not None else 1)
        if lead not in (1, 2) or self.context.dim() != lead + 1:
            raise ValueError(f"context {tuple(self.context.shape)} and inputs {tuple(main.shape)} must both be one "
                             "task (N, ...) or a batch (T, N, ...)")
        if lead == 2 and self.context.shape[0] != main.shape[0]:
            raise ValueError(f"context and inputs hold different numbers of tasks: {self.context.shape[0]} vs "
                             f"{main.shape[0]}")

    @property
    def batched(self) -> bool:
        return self.context.dim() == 3

    @property
    def num_tasks(self) -> int:
        return int(self.context.shape[0]) if self.batched else 1

    def as_batch(self) -> "TaskInputs":
        """The same task(s) with a leading task dimension."""
        if self.batched:
            return self
        return TaskInputs(self.context.unsqueeze(0), None if self.images is None else self.images.unsqueeze(0),
                          None if self.features is None else self.features.unsqueeze(0))

    def to(self, device: torch.device | str) -> "TaskInputs":
        """The same task(s) on ``device`` (from the CPU to a GPU through pinned memory, without blocking)."""
        move = lambda t: None if t is None else to_device(t, device)  # noqa: E731
        return TaskInputs(move(self.context), move(self.images), move(self.features))


@dataclass
class TaskState:
    """A batch of tasks as the target network reads them; ``cache`` holds what ``forward`` computed once."""

    images: Tensor | None = None  # (T, N, 1, 28, 28)
    features: Tensor | None = None  # (T, N, F) standardised ('full')
    mean: Tensor | None = None  # (T, 1, F) the task's feature statistics ('full', to place rows outside the task)
    std: Tensor | None = None
    augmented: Tensor | None = None  # (T, N, 1, 28, 28) augmented copies, for inner losses that ask for them
    cache: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> "TaskState":
        """The same tasks with a cache of their own (what :meth:`Generator.prepare` computed, shared, not copied):
        one preparation for several adaptations of the same tasks."""
        return replace(self, cache=dict(self.cache))

    @property
    def reference(self) -> Tensor:
        """The task's features before any inner step (where inner losses mine neighbours)."""
        return self.cache["reference"] if "reference" in self.cache else self.features


class Generator(nn.Module):
    """The interface every generator implements (see the module docstring)."""

    candidates: tuple[str, ...] = ("generated",)  # test-time candidates it supports (hmlib.hyper.adapt.CANDIDATES)

    def prepare(self, inputs: TaskInputs, *, augmented: bool = False) -> TaskState:
        raise NotImplementedError

    def forward(self, code: Tensor, state: TaskState, num_classes: int,
                fixed: Mapping[str, float] | None = None) -> Params:
        """Generated parameters; ``fixed`` replaces every generated tensor whose name starts with a key by that
        constant (ablations: e.g. ``{'blend': 1.0}`` normalises every layer with the task's own statistics)."""
        raise NotImplementedError

    def logits(self, params: Params, state: TaskState, *, augmented: bool = False) -> Tensor:
        raise NotImplementedError

    def adaptable(self, params: Params) -> list[str]:
        raise NotImplementedError

    def inner_lrs(self, names: list[str], default: float) -> dict[str, Tensor | float]:
        """Step size of each adaptable parameter (a tensor broadcastable to it, or a number)."""
        return {name: default for name in names}

    def direction(self, name: str, grad: Tensor) -> Tensor:
        """The direction an inner step takes for a parameter's gradient (plain gradient descent by default)."""
        return grad

    def extend(self, params: Params, state: TaskState, inputs: TaskInputs) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def check_config(cfg: Config) -> None:
        """Refuse (ConfigError) a configuration this generator cannot run."""


def fix(params: Params, fixed: Mapping[str, float] | None) -> Params:
    """``params`` with every tensor whose name starts with a key of ``fixed`` replaced by that constant."""
    if not fixed:
        return params
    out = dict(params)
    for name, value in params.items():
        for prefix, constant in fixed.items():
            if name.startswith(prefix):
                out[name] = torch.full_like(value, float(constant))
    return out


# ---------------------------------------------------------------------------------------- film

class FilmGenerator(Generator):
    """Per-task FiLM and statistics blend of every backbone normalisation layer + a k-means cluster head."""

    candidates = ("generated", "stored", "task")  # the blend can be fixed to either statistics

    def __init__(self, cfg: HyperConfig, film: FilmConfig, backbone: ConvBackbone, num_classes: int) -> None:
        super().__init__()
        self.cfg, self.film, self.num_classes = cfg, film, num_classes
        self.backbone = backbone  # a submodule: its (meta-trained, when meta.backbone_lr > 0) weights are the model's
        self.widths = [bn.num_features for _, bn in blocks(backbone)]
        self.split = len(self.widths) - film.adapt_blocks
        self.heads = nn.ModuleList(nn.Linear(cfg.embed_dim, 2 * c + 1) for c in self.widths)
        self.tau_head = nn.Linear(cfg.embed_dim, 1)
        blend_logit = math.log(film.blend_init / (1 - film.blend_init))
        with torch.no_grad():  # the identity modulation for any code, with small (never zero) weights
            for head in [*self.heads, self.tau_head]:
                nn.init.normal_(head.weight, std=film.init_std)
                head.bias.zero_()
            for head in self.heads:
                head.bias[-1] = blend_logit
            self.tau_head.bias.fill_(math.log(film.tau))
        init = math.log(film.inner_lr)
        self.log_lrs = nn.ParameterDict({
            **{f"scale_{l}": nn.Parameter(torch.full((c,), init)) for l, c in enumerate(self.widths)},
            **{f"shift_{l}": nn.Parameter(torch.full((c,), init)) for l, c in enumerate(self.widths)},
            "prototypes": nn.Parameter(torch.tensor(math.log(film.head_lr))),
            "log_tau": nn.Parameter(torch.tensor(math.log(film.head_lr)))})
        self.log_lrs.requires_grad_(film.learn_inner_lr)

    @staticmethod
    def check_config(cfg: Config) -> None:
        if cfg.film.adapt_blocks > len(cfg.backbone.channels):
            raise ConfigError(f"film.adapt_blocks = {cfg.film.adapt_blocks} but the backbone has "
                              f"{len(cfg.backbone.channels)} blocks (backbone.channels)")

    def prepare(self, inputs: TaskInputs, *, augmented: bool = False) -> TaskState:
        if inputs.images is None:
            raise ValueError("the 'film' generator reads the task's images (TaskInputs.images)")
        state = TaskState(images=inputs.images)
        state.cache["first"] = mod.first_conv(self.backbone, inputs.images)  # the same for every modulation
        if augmented:
            T, N = inputs.images.shape[:2]
            generator = torch.Generator().manual_seed(0)  # the same augmentation every call: deterministic
            state.augmented = augment(inputs.images.flatten(0, 1).cpu(), generator).to(inputs.images).view_as(
                inputs.images)
            state.cache["first_augmented"] = mod.first_conv(self.backbone, state.augmented)
        return state

    def modulation(self, params: Params) -> mod.Modulation:
        return mod.Modulation.from_tensors(params, len(self.widths))

    def forward(self, code: Tensor, state: TaskState, num_classes: int,
                fixed: Mapping[str, float] | None = None) -> Params:
        params: Params = {}
        for l, (head, c) in enumerate(zip(self.heads, self.widths)):
            out = head(code)  # (T, 2C + 1)
            params[f"scale.{l}"], params[f"shift.{l}"] = out[:, :c], out[:, c:2 * c]
            params[f"blend.{l}"] = torch.sigmoid(out[:, -1])
        params["log_tau"] = self.tau_head(code)  # (T, 1)
        params = fix(params, fixed)
        self.begin(params, state)
        z = state.cache["reference"]
        params["prototypes"] = kmeans_prototypes(z, num_classes, self.film.cluster_iters, self.film.cluster_inits)
        return params

    def begin(self, params: Params, state: TaskState) -> None:
        """Compute, once, the blocks below the adapted ones and the starting embedding (the inner losses' reference)."""
        modulation = self.modulation(params)
        for key in ("pre_moments", "pre_augmented_moments"):  # of an earlier trunk
            state.cache.pop(key, None)
        state.cache["pre"] = mod.trunk(self.backbone, state.images, modulation, self.split, state.cache.get("first"))
        if state.augmented is not None:
            state.cache["pre_augmented"] = mod.trunk(self.backbone, state.augmented, modulation, self.split,
                                                     state.cache.get("first_augmented"))
        state.cache["reference"] = self.embedding(params, state)

    def embedding(self, params: Params, state: TaskState, *, augmented: bool = False) -> Tensor:
        """The modulated embedding (T, N, D), standardised over each task and L2-normalised per image."""
        key = "pre_augmented" if augmented else "pre"
        pre, T = state.cache[key], state.images.shape[0]
        moments = None
        if not pre.requires_grad:  # a test-time inner loop (no graph): its task moments once, not at every step
            moments = state.cache.get(f"{key}_moments")
            if moments is None:
                moments = state.cache[f"{key}_moments"] = mod.pre_moments(pre, T)
        z = mod.top(self.backbone, pre, self.modulation(params), self.split, T, moments)
        return F.normalize(standardize(z)[0], dim=-1)

    def logits(self, params: Params, state: TaskState, *, augmented: bool = False) -> Tensor:
        return cosine_logits(self.embedding(params, state, augmented=augmented), params["prototypes"],
                             params["log_tau"])

    def adaptable(self, params: Params) -> list[str]:
        film = [f"{kind}.{l}" for kind in ("scale", "shift") for l in range(self.split, len(self.widths))]
        head = ["prototypes", "log_tau"]
        return {"film": film, "head": head, "both": film + head}[self.film.adapt]

    def inner_lrs(self, names: list[str], default: float) -> dict[str, Tensor | float]:
        return {name: self.log_lrs[name.replace(".", "_")].exp() for name in names}

    def direction(self, name: str, grad: Tensor) -> Tensor:
        """With ``film.normalize_steps``: the gradient divided by its root mean square over each task's tensor, so
        a step's size is its step size whatever the scale of the loss (as Adam's first step; Meta-SGD then learns
        a size per parameter)."""
        if not self.film.normalize_steps:
            return grad
        rms = grad.pow(2).mean(dim=tuple(range(1, grad.dim())), keepdim=True).sqrt()
        return grad / (rms + 1e-8)

    def extend(self, params: Params, state: TaskState, inputs: TaskInputs) -> Tensor:
        """Logits (T, M, K) of images outside the task, read as the task's adapted network reads its own images:
        normalised with the task's statistics, standardised with the task's embedding statistics."""
        other = mod.embed_beside(self.backbone, state.images, inputs.as_batch().images, self.modulation(params))
        task = mod.top(self.backbone, state.cache["pre"], self.modulation(params), self.split, state.images.shape[0])
        _, mean, std = standardize(task)
        return cosine_logits(F.normalize((other - mean) / std, dim=-1), params["prototypes"], params["log_tau"])


# ---------------------------------------------------------------------------------------- full

class FullGenerator(Generator):
    """The prototype's generation: one MLP head per target layer emits all of its weights and biases."""

    def __init__(self, cfg: HyperConfig, full: FullConfig, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        dims = [feature_dim, *full.target_hidden, num_classes]
        self.num_classes = num_classes
        self.shapes = list(zip(dims[1:], dims[:-1]))  # (out, in) per layer
        self.heads = nn.ModuleList()
        for out_dim, in_dim in self.shapes:
            head = mlp(cfg.embed_dim, full.head_hidden, out_dim * in_dim + out_dim)
            nn.init.normal_(head[-1].weight, std=0.01)
            reference = nn.Linear(in_dim, out_dim)  # start the generated layer at a standard init
            with torch.no_grad():
                head[-1].bias.copy_(torch.cat([reference.weight.flatten(), reference.bias]))
            self.heads.append(head)

    @staticmethod
    def check_config(cfg: Config) -> None:
        if cfg.adapt.inner_loss == "augmentation":
            raise ConfigError("the 'full' generator reads VAE rows, not images: adapt.inner_loss = 'augmentation' "
                              "needs images")
        if cfg.meta.outer_loss in ("centroids", "both"):
            raise ConfigError("the 'full' generator has no representation to take class centroids in: set "
                              "meta.outer_loss = 'aligned'")
        if cfg.meta.min_classes != cfg.meta.max_classes:
            raise ConfigError("the 'full' generator emits a fixed number of outputs: set meta.min_classes = "
                              "meta.max_classes (the K it is trained for)")


    def prepare(self, inputs: TaskInputs, *, augmented: bool = False) -> TaskState:
        if inputs.features is None:
            raise ValueError("the 'full' generator reads the task's [mu, logvar] rows (TaskInputs.features)")
        x, mean, std = standardize(inputs.features)
        return TaskState(features=x, mean=mean, std=std)

    def forward(self, code: Tensor, state: TaskState, num_classes: int,
                fixed: Mapping[str, float] | None = None) -> Params:
        if num_classes != self.num_classes:
            raise ValueError(f"the 'full' generator emits exactly {self.num_classes} outputs, not {num_classes}; "
                             "a checkpoint with generation 'film' clusters into any K")
        params = {}
        for i, (head, (out_dim, in_dim)) in enumerate(zip(self.heads, self.shapes)):
            flat = head(code)  # (T, out*in + out)
            params[f"layers.{i}.weight"] = flat[:, : out_dim * in_dim].reshape(-1, out_dim, in_dim)
            params[f"layers.{i}.bias"] = flat[:, out_dim * in_dim:]
        return fix(params, fixed)

    def logits(self, params: Params, state: TaskState, *, augmented: bool = False) -> Tensor:
        return self._mlp(params, state.features)

    def _mlp(self, params: Params, x: Tensor) -> Tensor:
        for i in range(len(self.shapes)):
            x = x @ params[f"layers.{i}.weight"].transpose(-1, -2) + params[f"layers.{i}.bias"].unsqueeze(-2)
            if i < len(self.shapes) - 1:
                x = torch.relu(x)
        return x

    def adaptable(self, params: Params) -> list[str]:
        return list(params)

    def extend(self, params: Params, state: TaskState, inputs: TaskInputs) -> Tensor:
        """Logits (T, M, K) of rows outside the task, standardised with the task's statistics."""
        return self._mlp(params, (inputs.as_batch().features - state.mean) / state.std)


# The registry of generators: config validation, ablations and docs read it; add one here.
GENERATORS: dict[str, type[Generator]] = {"film": FilmGenerator, "full": FullGenerator}
