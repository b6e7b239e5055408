"""The one unsupervised inner loop, for meta-training and test time alike, and the label-free choice at test time.

:func:`adapt` generates each task's network and runs S gradient steps of the inner loss on its adaptable
parameters, each with its own step size (meta-learned where the generator learns them: Meta-SGD). With
``create_graph=True`` the steps stay in the autograd graph (second-order, MAML-style), so the outer loss reaches
the hypernetwork, and the step sizes, through them; at test time (:func:`predict_task`) no graph is kept. The
inner loss is summed over tasks, so each task's gradient is its own.

When not to adapt (:func:`adapt_candidates`): at test time the generated adaptation is one candidate;
``adapt.candidates`` may add the same hypernetwork with every normalisation blend fixed to 0 (the backbone's stored
statistics) or to 1 (the task's own). Each is adapted by the same inner loop, and per task the one whose clusters
have the highest silhouette on its own adapted representation is kept (the rule that picked the better
normalisation on shrunk and on noisy digits, METHOD.md). Batched over tasks; nothing reads a label.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from hmlib.config import AdaptConfig
from hmlib.hyper.generators import Params, TaskInputs, TaskState
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.cluster_ops import nearest_neighbours
from hmlib.hyper.losses import INNER_LOSSES, InnerView
from hmlib.hyper.selector import FEATURES, candidate_features


@dataclass
class AdaptResult:
    """Logits after 0..S inner steps (each (T, N, K)), the mean inner loss before each step, the final
    parameters and the task state they act on (and, if asked, the parameters after every step)."""

    logits: list[Tensor]
    inner_losses: list[Tensor]
    params: Params
    state: TaskState | None = None
    trajectory: list[Params] | None = None
    task_losses: list[Tensor] | None = None  # the inner loss of every task (T,) before each step


def _detached(state: TaskState) -> TaskState:
    state.cache = {k: v.detach() if isinstance(v, Tensor) else v for k, v in state.cache.items()}
    return state


def adapt(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, *, num_steps: int | None = None,
          create_graph: bool = False, num_classes: int | None = None, context: Tensor | None = None,
          fixed: Mapping[str, float] | None = None, trajectory: bool = False,
          prepared: TaskState | None = None) -> AdaptResult:
    """Generate each task's network, then S steps of the unsupervised loss (batched over tasks).

    ``context`` replaces the conditioning rows (the pixel-noise and constant-code ablations) while the network
    still reads the task's own images; ``fixed`` replaces generated tensors by constants (e.g. ``{'blend': 0}``:
    the stored statistics everywhere); ``trajectory`` keeps the (detached) parameters after every step;
    ``prepared``: ``hypernet.prepare`` of the same inputs, where several adaptations share it (a copy is used).
    """
    num_steps = cfg.num_inner_steps if num_steps is None else int(num_steps)
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    inputs = hypernet.check(inputs)
    context = inputs.context if context is None else context.to(inputs.context.device)
    loss_spec = INNER_LOSSES[cfg.inner_loss]
    with torch.enable_grad():
        state = prepare(hypernet, inputs, cfg, num_steps) if prepared is None else prepared.copy()
        if cfg.adapt_params == "hypernet":
            if num_classes not in (None, hypernet.num_classes):
                raise ValueError("adapt_params='hypernet' clusters into the checkpoint's K only")
            return _adapt_hypernet(hypernet, inputs, context, state, cfg, num_steps, create_graph)
        params = hypernet(context, state, num_classes, fixed)
        names = hypernet.adaptable(params)
        lrs = {k: cfg.lr_scale * v for k, v in hypernet.inner_lrs(names, cfg.inner_lr).items()}
        if not create_graph:  # test time: the steps start from a detached copy
            params = {k: v.detach().requires_grad_(k in names) for k, v in params.items()}
            state = _detached(state)
        logits, losses, path, task_losses = [], [], [], []
        index = neighbour_index(state.reference, cfg, loss_spec.neighbours and num_steps > 0)
        for step in range(num_steps + 1):
            out = hypernet.logits(params, state)
            logits.append(out if create_graph else out.detach())
            if trajectory:
                path.append({k: v.detach() for k, v in params.items()})
            if step == num_steps:
                break
            augmented = hypernet.logits(params, state, augmented=True) if loss_spec.augmented else None
            loss = loss_spec.fn(InnerView(out, state.reference, augmented, index), cfg)
            grads = torch.autograd.grad(loss.sum(), [params[k] for k in names], create_graph=create_graph)
            losses.append(loss.mean().detach())
            task_losses.append(loss.detach())
            step = hypernet.generator.direction
            updated = {name: params[name] - lrs[name] * step(name, grad) for name, grad in zip(names, grads)}
            if not create_graph:
                updated = {k: v.detach().requires_grad_() for k, v in updated.items()}
            params = {**params, **updated}
    return AdaptResult(logits, losses, params, state, path if trajectory else None, task_losses)


def prepare(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, num_steps: int) -> TaskState:
    """``hypernet.prepare`` of checked inputs for ``num_steps`` inner steps of ``cfg.inner_loss`` (its augmented
    views only where the loss reads them and a step is taken): what :func:`adapt` starts from."""
    return hypernet.prepare(inputs, augmented=INNER_LOSSES[cfg.inner_loss].augmented and num_steps > 0)


def neighbour_index(reference: Tensor, cfg: AdaptConfig, needed: bool) -> Tensor | None:
    """Each image's ``cfg.neighbours`` nearest neighbours in the reference features, (T, N, k), mined once for all
    the inner steps (the reference does not change over them); None where the loss does not read them."""
    return nearest_neighbours(reference, cfg.neighbours) if needed else None


def _adapt_hypernet(hypernet: HyperNet, inputs: TaskInputs, context: Tensor, state: TaskState, cfg: AdaptConfig,
                    num_steps: int, create_graph: bool) -> AdaptResult:
    """The prototype's variant: SGD on all of the hypernetwork's parameters, each task with its own copy."""
    results = []
    loss_spec = INNER_LOSSES[cfg.inner_loss]
    for t in range(context.shape[0]):
        task_state = TaskState(features=state.features[t:t + 1], mean=state.mean[t:t + 1], std=state.std[t:t + 1])
        weights = dict(hypernet.named_parameters())
        if not create_graph:
            weights = {k: v.detach().requires_grad_() for k, v in weights.items()}
        logits, losses = [], []
        for step in range(num_steps + 1):
            params = functional_call(hypernet, weights, (context[t:t + 1], task_state))
            out = hypernet.logits(params, task_state)
            logits.append(out if create_graph else out.detach())
            if step == num_steps:
                break
            # the reference comes from the generator's forward, run again at every step here: mined every step
            loss = loss_spec.fn(InnerView(out, task_state.reference), cfg).sum()
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=create_graph, allow_unused=True)
            losses.append(loss.detach())
            lr = cfg.inner_lr * cfg.lr_scale
            weights = {k: (v if g is None else v - lr * g) for (k, v), g in zip(weights.items(), grads)}
            if not create_graph:
                weights = {k: v.detach().requires_grad_() for k, v in weights.items()}
        results.append(AdaptResult(logits, losses, params if create_graph else {k: v.detach() for k, v in params.items()}))
    return AdaptResult(
        logits=[torch.cat([r.logits[s] for r in results]) for s in range(num_steps + 1)],
        inner_losses=[torch.stack([r.inner_losses[s] for r in results]).mean() for s in range(num_steps)],
        params={k: torch.cat([r.params[k] for r in results]) for k in results[0].params}, state=state)


CANDIDATES: dict[str, dict[str, float]] = {
    "generated": {},  # the hypernetwork's own blend of stored and task statistics
    "stored": {"blend": 0.0},  # the backbone's stored statistics everywhere: do not re-normalise to the task
    "task": {"blend": 1.0},  # the task's own statistics everywhere
}


def silhouette(z: Tensor, clusters: Tensor, num_classes: int) -> Tensor:
    """Mean silhouette (T,) of cluster ids (T, N) on rows z (T, N, D), Euclidean; -1 where one cluster is used
    (scikit-learn's definition, batched over tasks)."""
    dist = torch.cdist(z, z)  # (T, N, N)
    onehot = F.one_hot(clusters, num_classes).to(z.dtype)  # (T, N, K)
    counts = onehot.sum(1, keepdim=True)  # (T, 1, K)
    sums = dist @ onehot  # (T, N, K): summed distance of each row to each cluster
    size = (onehot * counts).sum(-1)  # (T, N): the size of each row's own cluster
    own = (onehot * sums).sum(-1) / (size - 1).clamp_min(1)  # mean distance to the others of its cluster
    other = torch.where(onehot.bool() | (counts == 0), torch.full_like(sums, float("inf")),
                        sums / counts.clamp_min(1)).min(-1).values  # mean distance to the nearest other cluster
    score = torch.where(size <= 1, torch.zeros_like(own), (other - own) / torch.maximum(own, other).clamp_min(1e-12))
    used = (counts > 0).sum((-1, -2))
    return torch.where(used > 1, score.mean(-1), torch.full_like(score[:, 0], -1.0))


def representation(hypernet: HyperNet, result: AdaptResult) -> Tensor:
    """The adapted representation (T, N, F) a task's clusters were formed in: the modulated embedding (generator
    'film'), else the generated network's normalised outputs."""
    generator = hypernet.generator
    if hasattr(generator, "embedding"):
        return generator.embedding(result.params, result.state)
    return F.normalize(result.logits[-1], dim=-1)


def adapt_candidates(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, *, num_steps: int | None = None,
                     num_classes: int | None = None, context: Tensor | None = None,
                     fixed: Mapping[str, float] | None = None, trajectory: bool = False,
                     prepared: TaskState | None = None, choose_at: int | None = None
                     ) -> tuple[list[AdaptResult], Tensor]:
    """Every candidate of ``adapt.candidates`` adapted (no graph), and the label-free choice per task (T,), an index
    into :func:`candidate_names`: the meta-learned selector's or the highest silhouette of its clusters on its own
    adapted representation (:func:`choice_rule`), read after ``choose_at`` of the ``num_steps`` steps (default: all
    of them; the choice a run of ``choose_at`` steps makes). ``fixed`` (an ablation forcing generated tensors)
    leaves only the generated candidate; ``prepared`` as in :func:`adapt` (made here once for all candidates where
    not given)."""
    names = candidate_names(hypernet, cfg, fixed)
    inputs = hypernet.check(inputs)
    num_steps = cfg.num_inner_steps if num_steps is None else int(num_steps)
    choose_at = num_steps if choose_at is None else int(choose_at)
    if not 0 <= choose_at <= num_steps:
        raise ValueError(f"choose_at must be in 0..num_steps ({num_steps}), got {choose_at}")
    early = len(names) > 1 and choose_at < num_steps  # the choice reads each candidate's state after choose_at steps
    if prepared is None and len(names) > 1:  # the candidates read the same images: prepared once (no graph)
        with torch.no_grad():
            prepared = prepare(hypernet, inputs, cfg, num_steps)
    results = [adapt(hypernet, inputs, cfg, num_steps=num_steps, num_classes=num_classes, context=context,
                     fixed={**(fixed or {}), **CANDIDATES[name]} or None, trajectory=trajectory or early,
                     prepared=prepared)
               for name in names]
    if len(results) == 1:
        return results, torch.zeros(results[0].logits[0].shape[0], dtype=torch.long, device=hypernet.device)
    with torch.no_grad():
        features = torch.stack([features_of(hypernet, after_steps(r, choose_at) if early else r)
                                for r in results])  # (C, T, F)
        if choice_rule(hypernet, cfg, fixed) == "learned":
            scores = hypernet.selector(features)
        else:
            scores = features[..., FEATURES.index("silhouette")]
    if early and not trajectory:
        results = [dataclasses.replace(r, trajectory=None) for r in results]
    return results, scores.argmax(0)


def after_steps(result: AdaptResult, steps: int) -> AdaptResult:
    """An adaptation run with its trajectory, as it stood after its first ``steps`` steps (what a run of that many
    steps returns)."""
    if result.trajectory is None:
        raise ValueError("after_steps needs the run's trajectory (adapt(..., trajectory=True))")
    return AdaptResult(result.logits[:steps + 1], result.inner_losses[:steps], result.trajectory[steps], result.state,
                       result.trajectory[:steps + 1],
                       None if result.task_losses is None else result.task_losses[:steps])


def candidate_names(hypernet: HyperNet, cfg: AdaptConfig, fixed: Mapping[str, float] | None = None) -> list[str]:
    """The candidates adapted at test time: those of ``adapt.candidates`` the generator supports (only the generated
    one where ``fixed`` forces generated tensors)."""
    names = ["generated"] if fixed else [n for n in cfg.candidates if n in hypernet.generator.candidates]
    return names or ["generated"]


def choice_rule(hypernet: HyperNet, cfg: AdaptConfig, fixed: Mapping[str, float] | None = None) -> str:
    """How :func:`adapt_candidates` chooses among the candidates: 'learned' (the meta-learned selector, where
    ``adapt.choice`` asks for it and meta-training kept one for this many candidates), 'silhouette', or 'none'
    (one candidate)."""
    count = len(candidate_names(hypernet, cfg, fixed))
    if count == 1:
        return "none"
    if cfg.choice == "learned" and hypernet.selector.trained and count == hypernet.selector.bias.shape[0]:
        return "learned"
    return "silhouette"


def features_of(hypernet: HyperNet, result: AdaptResult) -> Tensor:
    """Label-free features (T, F) of one adapted candidate (:data:`hmlib.hyper.selector.FEATURES`)."""
    last = result.logits[-1]
    sil = silhouette(representation(hypernet, result), last.argmax(-1), last.shape[-1])
    blends = [v for k, v in result.params.items() if k.startswith("blend.")]
    blend = torch.stack(blends).mean(0) if blends else None
    return candidate_features(sil, last, result.task_losses, blend)


def predict_task(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, num_steps: int | None = None, *,
                 num_classes: int | None = None, context: Tensor | None = None,
                 fixed: Mapping[str, float] | None = None, chunk: int = 25, choose_at: int | None = None) -> Tensor:
    """Logits after 0..S inner steps of the chosen candidate, (S+1, T, N, K) ((S+1, N, K) for one unbatched task); no
    graph kept. S is ``num_steps``, by default the test-time count ``cfg.steps_at_test`` (:func:`adapt` and
    :func:`adapt_candidates` default to the meta-training ``cfg.num_inner_steps``); the candidate is the one chosen
    after ``choose_at`` steps (default S: a step curve of the method's kept candidate is ``num_steps`` beyond the
    test-time count with ``choose_at=cfg.steps_at_test``). Tasks are processed ``chunk`` at a time (memory); the
    result does not depend on ``chunk``."""
    num_steps = cfg.steps_at_test if num_steps is None else int(num_steps)
    batch = hypernet.check(inputs)
    parts = []
    for start in range(0, batch.num_tasks, chunk):
        part = slice(start, start + chunk)
        sub = TaskInputs(batch.context[part], None if batch.images is None else batch.images[part],
                         None if batch.features is None else batch.features[part])
        results, pick = adapt_candidates(hypernet, sub, cfg, num_steps=num_steps, num_classes=num_classes,
                                         fixed=fixed, context=None if context is None else context[part],
                                         choose_at=choose_at)
        logits = torch.stack([torch.stack(r.logits) for r in results])  # (C, S+1, T, N, K)
        tasks = torch.arange(pick.shape[0], device=pick.device)
        parts.append(logits[pick, :, tasks].transpose(0, 1))  # (S+1, T, N, K)
    logits = torch.cat(parts, dim=1)
    return logits if inputs.batched else logits[:, 0]


def predict_clusters(hypernet: HyperNet, inputs: TaskInputs, cfg: AdaptConfig, num_steps: int | None = None, *,
                     num_classes: int | None = None) -> np.ndarray:
    """Cluster index of every image after 0..S inner steps (default ``cfg.steps_at_test``): argmax of
    :func:`predict_task`."""
    return predict_task(hypernet, inputs, cfg, num_steps, num_classes=num_classes).argmax(-1).cpu().numpy()
