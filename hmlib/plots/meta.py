"""Meta-training figures: training curves over seeds and one task's latents before/after adaptation."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from hmlib.metrics import best_matching
from hmlib.plots import PALETTE, method_color


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0 or window <= 1:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_training_curves(histories: Mapping[str, Mapping[str, list]], *, smooth: int = 25,
                         chance: float | None = None) -> Figure:
    """Outer loss, inner loss before/after the inner steps, validation accuracy before/after, and the mean
    generated normalisation blend of every layer (where recorded), per run."""
    blends = [h for h in histories.values() if h.get("blend") and h["blend"][0]]
    fig, axes = plt.subplots(1, 4 if blends else 3, figsize=(20 if blends else 15, 4.0))
    for i, (label, history) in enumerate(histories.items()):
        color = PALETTE[i % len(PALETTE)]
        it = np.asarray(history["iteration"])
        axes[0].plot(it, _smooth(history["outer_loss"], smooth), color=color, label=label)
        axes[1].plot(it, _smooth(history["inner_loss_before"], smooth), color=color, ls=":", label=f"{label}, before")
        axes[1].plot(it, _smooth(history["inner_loss_after"], smooth), color=color, label=f"{label}, after")
        ev = np.asarray(history["eval_iteration"])
        axes[2].plot(ev, history["val_acc_before"], color=color, ls=":", marker=".", label=f"{label}, before")
        axes[2].plot(ev, history["val_acc_after"], color=color, marker=".", label=f"{label}, after")
        if blends and history.get("blend"):
            layers = np.asarray(history["blend"], dtype=np.float64)  # (iterations, layers)
            for layer, ls in zip(range(layers.shape[1]), ("-", "--", ":", "-.") * 4):
                axes[3].plot(it, _smooth(layers[:, layer], smooth), color=color, ls=ls,
                             label=f"{label}, block {layer + 1}" if i == 0 or layer == 0 else None)
    if chance is not None:
        axes[2].axhline(chance, color=method_color("chance"), lw=1, ls="-.", label="chance")
    if blends:
        axes[3].set(title="generated blend per block (1 = task statistics)", xlabel="iteration", ylabel="blend",
                    ylim=(0, 1))
        axes[3].legend(fontsize="x-small")
    axes[0].set(title="outer loss", xlabel="iteration", ylabel="loss")
    axes[1].set(title="inner loss (dotted: before steps)", xlabel="iteration", ylabel="loss")
    axes[2].set(title="validation accuracy (dotted: before)", xlabel="iteration",
                ylabel="clustering accuracy")
    axes[0].legend(fontsize="x-small")  # one colour per run; line styles explained once, on the right
    styles = [Line2D([], [], color="#555555", ls="-", label="after the inner steps"),
              Line2D([], [], color="#555555", ls=":", label="before")]
    if chance is not None:
        styles.append(Line2D([], [], color=method_color("chance"), ls="-.", label="chance"))
    axes[2].legend(handles=styles, fontsize="x-small", loc="lower right")
    return fig


def _aligned(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Relabel predicted clusters by their best-matching class (same colour = matched class)."""
    return best_matching(pred, labels, num_classes)[pred]


def plot_task_adaptation(points_2d: np.ndarray, labels: np.ndarray, predictions: Mapping[str, np.ndarray], *,
                         title: str = "") -> Figure:
    """One task's features in 2-D, coloured by true class and by each prediction (clusters matched to classes)."""
    num_classes = int(max(labels.max(), *(p.max() for p in predictions.values()))) + 1
    colors = np.asarray(PALETTE)[:num_classes]
    panels = {"true class": labels, **{k: _aligned(np.asarray(v), labels, num_classes) for k, v in predictions.items()}}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), sharex=True, sharey=True)
    for ax, (name, values) in zip(np.atleast_1d(axes), panels.items()):
        ax.scatter(points_2d[:, 0], points_2d[:, 1], c=colors[values], s=12, alpha=0.85, linewidths=0)
        if name != "true class":
            wrong = values != labels
            ax.scatter(points_2d[wrong, 0], points_2d[wrong, 1], facecolors="none", edgecolors="black", s=22,
                       linewidths=0.5)
            name = f"{name}: {1 - wrong.mean():.0%} right"
        ax.set(title=name, xticks=[], yticks=[])
    if title:
        fig.suptitle(title)
    return fig
