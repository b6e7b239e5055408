"""The one unsupervised inner loop (meta-training and test time), its losses, and the aligned outer loss.

:func:`adapt` runs S SGD steps of an unsupervised loss on a task. With ``create_graph=True`` the steps
stay in the autograd graph (second-order, MAML-style) so the outer loss reaches the hypernetwork
through them; at test time (:func:`predict_task`) no graph is kept. Tasks may carry a leading batch
dimension T: the inner loss is summed over tasks, so each task's gradient is its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.func import functional_call

from hmlib.config import AdaptConfig
from hmlib.metrics import batched_clustering_accuracy
from hmlib.hypernet import HyperNet, TaskInputs, target_forward

EPS = 1e-8


# ------------------------------------------------------------------------------------ inner losses
def entropy_loss(logits: Tensor) -> Tensor:
    """TENT: mean per-image prediction entropy, per task (...,)."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def infomax_loss(logits: Tensor, balance_weight: float = 1.0) -> Tensor:
    """SHOT/IIC: mean per-image entropy minus balance_weight * entropy of the mean prediction, per task."""
    probs = torch.softmax(logits, dim=-1)
    mean_probs = probs.mean(dim=-2)
    marginal_entropy = -(mean_probs * torch.log(mean_probs + EPS)).sum(-1)
    return entropy_loss(logits) - balance_weight * marginal_entropy


def geometry_loss(logits: Tensor, reference: Tensor, weight: float = 3.0) -> Tensor:
    """Prototype: MSE between pairwise cosine-distance matrices of outputs and reference latents, per task."""
    out = F.normalize(logits, dim=-1)
    ref = F.normalize(reference, dim=-1)
    dist_out = 1.0 - out @ out.transpose(-1, -2)
    dist_ref = 1.0 - ref @ ref.transpose(-1, -2)
    return weight * ((dist_out - dist_ref) ** 2).mean(dim=(-1, -2))


def inner_loss(logits: Tensor, reference: Tensor, cfg: AdaptConfig) -> Tensor:
    """The configured unsupervised loss per task (...,); ``reference`` = the images' latent means."""
    if cfg.inner_loss == "entropy":
        return entropy_loss(logits)
    if cfg.inner_loss == "infomax":
        return infomax_loss(logits, cfg.balance_weight)
    if cfg.inner_loss == "geometry":
        return geometry_loss(logits, reference, cfg.geometry_weight)
    raise ValueError(f"adapt.inner_loss={cfg.inner_loss!r}; choose 'geometry', 'entropy' or 'infomax'")


# ----------------------------------------------------------------------------------- the inner loop
@dataclass
class AdaptResult:
    """Logits after 0..S inner steps (each (..., N, K)), the inner losses (S,) and the final target params."""

    logits: list[Tensor]
    inner_losses: list[Tensor]
    target_params: dict[str, Tensor]


def adapt(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, *, num_steps: int | None = None,
          create_graph: bool = False, context: Tensor | None = None) -> AdaptResult:
    """The one inner loop: generate target params, then S SGD steps of the unsupervised loss.

    ``create_graph=True`` keeps the steps in the graph (meta-training); ``cfg.first_order`` detaches the
    inner gradients. ``context`` overrides the conditioning rows (e.g. the pixel-noise ablation).
    """
    num_steps = cfg.num_inner_steps if num_steps is None else num_steps
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if cfg.adapt_params not in ("generated", "last", "hypernet"):
        raise ValueError(f"adapt.adapt_params={cfg.adapt_params!r}; choose 'generated', 'last' or 'hypernet'")
    features = hypernet.target_features(inputs)  # (..., N, in)
    reference = features[..., : hypernet.latent_dim]  # the (normalised) latent means
    context = hypernet.context(inputs) if context is None else context
    second_order = create_graph and not cfg.first_order

    with torch.enable_grad():
        if cfg.adapt_params == "hypernet":
            return _adapt_hypernet(hypernet, features, reference, context, cfg, num_steps, create_graph, second_order)
        target_params = hypernet(context)
        names = list(hypernet.last_layer_keys) if cfg.adapt_params == "last" else list(target_params)
        if not create_graph:  # test time: the steps start from a detached copy
            target_params = {k: v.detach().requires_grad_(k in names) for k, v in target_params.items()}
        logits, losses = [], []
        for step in range(num_steps + 1):
            out = target_forward(target_params, features)
            logits.append(out if create_graph else out.detach())
            if step == num_steps:
                break
            loss = inner_loss(out, reference, cfg)
            grads = torch.autograd.grad(loss.sum(), [target_params[k] for k in names],
                                        create_graph=second_order, retain_graph=create_graph)
            losses.append(loss.mean().detach())
            updated = {}
            for name, grad in zip(names, grads):
                new = target_params[name] - cfg.inner_lr * (grad if second_order else grad.detach())
                updated[name] = new if create_graph else new.detach().requires_grad_()
            target_params = {**target_params, **updated}
    return AdaptResult(logits, losses, target_params)


def _adapt_hypernet(hypernet: HyperNet, features: Tensor, reference: Tensor, context: Tensor, cfg: AdaptConfig,
                    num_steps: int, create_graph: bool, second_order: bool) -> AdaptResult:
    """Prototype variant: SGD on all hypernetwork parameters (one task at a time via functional_call)."""
    if context.dim() == 3:  # a batch of tasks: each task gets its own copy of the hypernetwork
        results = [_adapt_hypernet(hypernet, features[t], reference[t], context[t], cfg, num_steps, create_graph,
                                   second_order) for t in range(context.shape[0])]
        return AdaptResult(
            logits=[torch.stack([r.logits[s] for r in results]) for s in range(num_steps + 1)],
            inner_losses=[torch.stack([r.inner_losses[s] for r in results]).mean() for s in range(num_steps)],
            target_params={k: torch.stack([r.target_params[k] for r in results]) for k in results[0].target_params})
    hyper_params = {k: v for k, v in hypernet.named_parameters()}
    if not create_graph:
        hyper_params = {k: v.detach().requires_grad_() for k, v in hyper_params.items()}
    names = list(hyper_params)
    logits, losses = [], []
    for step in range(num_steps + 1):
        target_params = functional_call(hypernet, hyper_params, (context,))
        out = target_forward(target_params, features)
        logits.append(out if create_graph else out.detach())
        if step == num_steps:
            break
        loss = inner_loss(out, reference, cfg)
        grads = torch.autograd.grad(loss, [hyper_params[k] for k in names], create_graph=second_order,
                                    retain_graph=create_graph, allow_unused=True)
        losses.append(loss.detach())
        updated = {}
        for name, grad in zip(names, grads):
            if grad is None:
                continue
            new = hyper_params[name] - cfg.inner_lr * (grad if second_order else grad.detach())
            updated[name] = new if create_graph else new.detach().requires_grad_()
        hyper_params = {**hyper_params, **updated}
    params = target_params if create_graph else {k: v.detach() for k, v in target_params.items()}
    return AdaptResult(logits, losses, params)


def predict_task(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, num_steps: int | None = None,
                 *, context: Tensor | None = None) -> Tensor:
    """Logits after 0..S inner steps, (S+1, N, K) (or (S+1, T, N, K) for a batch of tasks); no graph kept."""
    result = adapt(hypernet, inputs, cfg, num_steps=num_steps, create_graph=False, context=context)
    return torch.stack(result.logits)


# ------------------------------------------------------------------------ Hungarian-aligned outer loss
def class_log_likelihood(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(T, K_out, K_class): summed log-probability of output unit j over the images of class c."""
    logp = F.log_softmax(logits, dim=-1)  # (T, N, K)
    onehot = F.one_hot(labels, num_classes).to(logp.dtype)  # (T, N, K)
    return logp.transpose(-1, -2) @ onehot


def best_alignment(logits: Tensor, labels: Tensor) -> Tensor:
    """Permutation (T, K) mapping each class c to its output unit, maximising the labels' likelihood."""
    logits, labels = _batched(logits, labels)
    scores = class_log_likelihood(logits.detach(), labels, logits.shape[-1]).cpu().numpy()
    scores = np.nan_to_num(scores, nan=-1e30, neginf=-1e30, posinf=1e30)  # non-finite logits: any order
    perms = np.empty(scores.shape[:2], dtype=np.int64)
    for t, score in enumerate(scores):  # K x K assignment per task
        units, classes = linear_sum_assignment(score, maximize=True)
        perms[t, classes] = units
    return torch.from_numpy(perms).to(logits.device)


def aligned_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy after the best one-to-one alignment of output units to the task's classes."""
    logits, labels = _batched(logits, labels)
    unit_of_class = best_alignment(logits, labels)  # (T, K)
    target_units = unit_of_class.gather(1, labels)  # (T, N): the unit each image should fire
    return F.cross_entropy(logits.flatten(0, 1), target_units.flatten())


def task_accuracy(logits: Tensor, labels: Tensor) -> np.ndarray:
    """Clustering accuracy (Hungarian matching of argmax clusters) per task, shape (T,)."""
    logits, labels = _batched(logits, labels)
    return batched_clustering_accuracy(logits.argmax(-1).cpu().numpy(), labels.cpu().numpy(), logits.shape[-1])


def _batched(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    return logits, labels.long()


def predict_clusters(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, num_steps: int | None = None
                     ) -> np.ndarray:
    """Cluster index of every image after 0..S inner steps, (S+1, N) int64 (argmax of predict_task)."""
    return predict_task(hypernet, inputs, cfg, num_steps).argmax(-1).cpu().numpy()
