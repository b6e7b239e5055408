"""The one unsupervised inner loop, for meta-training and test time alike.

:func:`adapt` generates a task's classifier and runs S SGD steps of the inner loss on its adaptable
parameters. With ``create_graph=True`` the steps stay in the autograd graph (second-order, MAML-style),
so the outer loss reaches the hypernetwork through them; at test time (:func:`predict_task`) no graph
is kept. The inner loss is summed over tasks, so each task's gradient is its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from hmlib.config import AdaptConfig
from hmlib.hyper.generators import Params, TaskState
from hmlib.hyper.hypernet import HyperNet, TaskInputs
from hmlib.hyper.losses import inner_loss


@dataclass
class AdaptResult:
    """Logits after 0..S inner steps (each (T, N, K)), the mean inner loss before each step, the final parameters."""

    logits: list[Tensor]
    inner_losses: list[Tensor]
    params: Params


def adapt(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, *, num_steps: int | None = None,
          create_graph: bool = False, num_classes: int | None = None) -> AdaptResult:
    """Generate each task's classifier, then S SGD steps of the unsupervised loss (batched over tasks)."""
    num_steps = cfg.num_inner_steps if num_steps is None else int(num_steps)
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    inputs = hypernet.check(inputs)
    state = hypernet.prepare(inputs.features)
    with torch.enable_grad():
        if cfg.adapt_params == "hypernet":
            if num_classes not in (None, hypernet.num_classes):
                raise ValueError("adapt_params='hypernet' clusters into the checkpoint's K only")
            return _adapt_hypernet(hypernet, inputs, state, cfg, num_steps, create_graph)
        params = hypernet(inputs.context, state, num_classes)
        names = hypernet.adaptable(params)
        if not create_graph:  # test time: the steps start from a detached copy
            params = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
        logits, losses = [], []
        for step in range(num_steps + 1):
            out = hypernet.logits(params, state)
            logits.append(out if create_graph else out.detach())
            if step == num_steps:
                break
            loss = inner_loss(out, state.z, cfg)
            grads = torch.autograd.grad(loss.sum(), [params[k] for k in names], create_graph=create_graph)
            losses.append(loss.mean().detach())
            updated = {name: params[name] - cfg.inner_lr * grad for name, grad in zip(names, grads)}
            if not create_graph:
                updated = {k: v.detach().requires_grad_() for k, v in updated.items()}
            params = {**params, **updated}
    return AdaptResult(logits, losses, params)


def _adapt_hypernet(hypernet: HyperNet, inputs: TaskInputs, state: TaskState, cfg: AdaptConfig, num_steps: int,
                    create_graph: bool) -> AdaptResult:
    """The prototype's variant: SGD on all of the hypernetwork's parameters, each task with its own copy."""
    results = []
    for t in range(inputs.features.shape[0]):
        task_state = TaskState(state.z[t:t + 1], None if state.graph is None else state.graph[t:t + 1])
        weights = dict(hypernet.named_parameters())
        if not create_graph:
            weights = {k: v.detach().requires_grad_() for k, v in weights.items()}
        logits, losses = [], []
        for step in range(num_steps + 1):
            params = functional_call(hypernet, weights, (inputs.context[t:t + 1], task_state))
            out = hypernet.logits(params, task_state)
            logits.append(out if create_graph else out.detach())
            if step == num_steps:
                break
            loss = inner_loss(out, task_state.z, cfg).sum()
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph, allow_unused=True)
            losses.append(loss.detach())
            weights = {k: (v if g is None else v - cfg.inner_lr * g) for (k, v), g in zip(weights.items(), grads)}
            if not create_graph:
                weights = {k: v.detach().requires_grad_() for k, v in weights.items()}
        results.append(AdaptResult(logits, losses, params if create_graph else {k: v.detach() for k, v in params.items()}))
    return AdaptResult(
        logits=[torch.cat([r.logits[s] for r in results]) for s in range(num_steps + 1)],
        inner_losses=[torch.stack([r.inner_losses[s] for r in results]).mean() for s in range(num_steps)],
        params={k: torch.cat([r.params[k] for r in results]) for k in results[0].params})


def predict_task(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, num_steps: int | None = None) -> Tensor:
    """Logits after 0..S inner steps, (S+1, T, N, K) ((S+1, N, K) for one unbatched task); no graph kept."""
    logits = torch.stack(adapt(hypernet, inputs, cfg, num_steps=num_steps, create_graph=False).logits)
    return logits if inputs.batched else logits[:, 0]


def predict_clusters(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, num_steps: int | None = None
                     ) -> np.ndarray:
    """Cluster index of every image after 0..S inner steps: argmax of :func:`predict_task`."""
    return predict_task(hypernet, inputs, cfg, num_steps).argmax(-1).cpu().numpy()
