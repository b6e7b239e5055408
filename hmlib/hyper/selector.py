"""Learning when not to adapt: a scorer of the test-time candidates, meta-learned on the meta-training datasets.

Every candidate of ``adapt.candidates`` (the generated adaptation, the same network on the backbone's stored
statistics, on the task's own) is described by label-free features of the task after its inner steps: the
silhouette of its clusters on its adapted representation, its confidence (mean top probability), the balance of its
clusters (entropy of the mean assignment over log K), its inner loss before and after the steps, the mean generated
blend, and log K. A :class:`Selector` scores each candidate from these features (one small linear model shared by the
candidates, plus a per-candidate bias); the highest score is kept. It is fitted after meta-training on fresh
episodes of the meta-training datasets under training shifts, where the labels say which candidate was best (a
soft target: softmax of the candidates' accuracies), and chosen only if it beats the silhouette rule on the
validation episodes with a paired 95% interval above zero (else the silhouette rule stays: ``Selector.trained`` is
False). A margin within the noise is not enough: on a leave-one-dataset-out fold (docs/METHOD.md) a selector kept
by a 0.06-point validation margin chose 4.0 points worse than the silhouette rule at K = 10 on the held-back dataset.
Nothing here reads a label of a held-out dataset; at test time the selector sees only the features.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# How meta-training decides to keep the fitted selector (part of a checkpoint's identity: a checkpoint whose selector
# was kept by an older rule is refitted, not reused): the paired 95% interval of its gain over the silhouette rule on
# the validation tasks must lie above zero.
SELECTION_RULE = "learned beats silhouette, paired 95% CI above 0"
FEATURES = ("silhouette", "confidence", "balance", "inner_loss_before", "inner_loss_after", "blend", "log_k")


def candidate_features(silhouettes: Tensor, logits_after: Tensor, losses: Sequence[Tensor] | None,
                       blend: Tensor | None) -> Tensor:
    """Features (T, F) of one candidate on a batch of tasks (see ``FEATURES``)."""
    T, _, K = logits_after.shape
    probs = torch.softmax(logits_after, -1)
    confidence = probs.max(-1).values.mean(-1)
    mean = probs.mean(1)
    balance = -(mean * torch.log(mean + 1e-8)).sum(-1) / math.log(K)
    zeros = torch.zeros(T, dtype=logits_after.dtype, device=logits_after.device)
    before = losses[0] if losses else zeros
    after = losses[-1] if losses else zeros
    blend = zeros if blend is None else blend
    return torch.stack([silhouettes, confidence, balance, before, after, blend,
                        torch.full_like(zeros, math.log(K))], dim=-1)


class Selector(nn.Module):
    """Scores (C, T) of C candidates from their features (C, T, F): a shared linear model plus a bias per
    candidate, on standardised features. Untrained, it scores by the silhouette alone (the label-free rule)."""

    def __init__(self, num_candidates: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(len(FEATURES)))
        self.bias = nn.Parameter(torch.zeros(num_candidates))
        self.register_buffer("mean", torch.zeros(len(FEATURES)))
        self.register_buffer("std", torch.ones(len(FEATURES)))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def trained(self) -> bool:
        return bool(self.fitted)

    def forward(self, features: Tensor) -> Tensor:
        if not self.trained:
            return features[..., FEATURES.index("silhouette")]
        x = (features - self.mean) / self.std
        return x @ self.weight + self.bias[: features.shape[0], None]


def fit_selector(selector: Selector, features: Tensor, accuracy: Tensor, *, temperature: float = 0.02,
                 weight_decay: float = 1e-2, steps: int = 300) -> dict[str, float]:
    """Fit on features (C, T, F) and accuracies (C, T) of training tasks: cross-entropy of the scores against the
    softmax of the accuracies (/ ``temperature``), L2-regularised, full-batch L-BFGS; returns the fit's figures."""
    features, accuracy = features.detach().cpu().double(), accuracy.detach().cpu().double()  # tiny: on the CPU
    mean, std = features.flatten(0, 1).mean(0), features.flatten(0, 1).std(0).clamp_min(1e-6)
    x = ((features - mean) / std).float()
    target = torch.softmax(accuracy / temperature, dim=0).float()  # (C, T)
    weight = torch.zeros(features.shape[-1], requires_grad=True)
    bias = torch.zeros(features.shape[0], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        scores = x @ weight + bias[:, None]  # (C, T)
        loss = -(target * F.log_softmax(scores, dim=0)).sum(0).mean() + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        selector.weight.copy_(weight)
        selector.bias.copy_(bias)
        selector.mean.copy_(mean.float())
        selector.std.copy_(std.float())
        selector.fitted.fill_(True)
    return {"tasks": int(features.shape[1])}


def chosen_accuracy(scores: Tensor, accuracy: Tensor) -> Tensor:
    """Accuracy (T,) of the candidate each task's highest score picks (scores and accuracy (C, T); ties: the first)."""
    pick = scores.argmax(0).to(accuracy.device)
    return accuracy[pick, torch.arange(accuracy.shape[1], device=accuracy.device)]


def choice_accuracy(scores: Tensor, accuracy: Tensor) -> float:
    """Mean accuracy of the candidate each task's highest score picks (scores and accuracy (C, T))."""
    return float(chosen_accuracy(scores, accuracy).mean())


def oracle_and_fixed(accuracy: Tensor) -> dict[str, float]:
    """Reference figures: the best candidate per task (oracle) and each candidate always."""
    out = {"oracle": float(accuracy.max(0).values.mean())}
    out.update({f"always_{c}": float(a.mean()) for c, a in enumerate(accuracy)})
    return out


__all__ = ["FEATURES", "SELECTION_RULE", "Selector", "candidate_features", "choice_accuracy", "chosen_accuracy",
           "fit_selector", "oracle_and_fixed"]
