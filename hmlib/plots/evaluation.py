"""Evaluation figures: the results table, per-task hypernetwork vs baseline scatter, accuracy bars with CIs."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hmlib.evaluation.methods import METHODS
from hmlib.evaluation.tables import heatmap_data
from hmlib.plots import method_color
from hmlib.stats import pct, signed


def evaluation_table(result: Mapping[str, Any], title: str | None = None) -> Figure:
    """The grid's summary (a row per condition: the method, k-means, plain adaptation, the paired differences and
    the test-time gain) drawn as a figure, for reports."""
    header = ["condition", "hypernet + adaptation", "k-means (embedding)", "plain adaptation", "vs strongest",
              "vs plain", "gain"]
    cells = []
    for c in result["summary"]["conditions"]:
        acc = c["accuracy"]
        cells.append([c["label"], pct(acc.get("hypernet_adapted")), pct(acc.get("kmeans_embedding")),
                      pct(acc.get("plain_choice")), signed(c["vs_strongest"]), signed(c.get("vs_plain")),
                      signed(c["gain"])])
    fig, ax = plt.subplots(figsize=(13, 0.45 * (len(cells) + 2)))
    ax.axis("off")
    table = ax.table(cellText=cells or [[""] * len(header)], colLabels=header, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(header))))
    for (r, _), cell in table.get_celld().items():
        if r == 0:
            cell.set_text_props(weight="bold")
    if title:
        ax.set_title(title)
    return fig


def difference_heatmap(result: Mapping[str, Any], title: str | None = None) -> Figure:
    """Conditions x methods: each method's mean paired difference (points) with the condition's strongest
    label-free baseline (0 = that baseline; green above, red below)."""
    conditions, names, values = heatmap_data(result)
    labels = [METHODS[n].label if n in METHODS else n for n in names]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(names), 0.9 + 0.42 * len(conditions)))
    limit = max(1.0, float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0)
    image = ax.imshow(values, cmap="RdYlGn", vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(names)), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(conditions)), conditions, fontsize=8)
    fig.colorbar(image, ax=ax, label="paired difference vs the strongest label-free baseline, points")
    ax.set_title(title or "Every method against each condition's strongest label-free baseline")
    return fig


def task_scatter(hyper_acc: np.ndarray, baseline_acc: np.ndarray, *, baseline_label: str = "k-means on the embedding",
                 hyper_label: str = "hypernetwork + adaptation", title: str | None = None) -> Figure:
    """Per-task accuracy of the hypernetwork (y) against a baseline (x) on identical tasks; diagonal = tie."""
    hyper_acc = 100 * np.asarray(hyper_acc, dtype=np.float64)
    baseline_acc = 100 * np.asarray(baseline_acc, dtype=np.float64)
    if hyper_acc.shape != baseline_acc.shape:
        raise ValueError(f"per-task arrays differ in shape: {hyper_acc.shape} vs {baseline_acc.shape}")
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    ax.scatter(baseline_acc, hyper_acc, s=14, alpha=0.6, color=method_color("hypernet_adapted"), edgecolor="none")
    lo = min(hyper_acc.min(initial=100), baseline_acc.min(initial=100), 25.0)
    ax.plot([lo, 100], [lo, 100], color="#777777", lw=1, ls="--")
    wins, losses = int(np.sum(hyper_acc > baseline_acc)), int(np.sum(hyper_acc < baseline_acc))
    ax.text(0.03, 0.97, f"hypernet better on {wins} tasks\nworse on {losses}, tied on {len(hyper_acc) - wins - losses}",
            transform=ax.transAxes, va="top", fontsize="small")
    ax.set(xlim=(lo, 101), ylim=(lo, 101), xlabel=f"{baseline_label}, accuracy %", ylabel=f"{hyper_label}, accuracy %",
           title=title or "Per task: hypernetwork vs baseline")
    ax.set_aspect("equal")
    return fig


def plot_transductive_curves(curves: Mapping[str, Sequence[float]], *, title: str | None = None) -> Figure:
    """Accuracy of k-means on test tasks (report only) after 0..E epochs of transductive adaptation, one line per
    (dataset, seed); epoch 0 is the normalisation statistics alone."""
    fig, ax = plt.subplots(figsize=(5.4, 3.6))
    for label, values in curves.items():
        values = 100 * np.asarray(values, dtype=np.float64)
        ax.plot(range(len(values)), values, marker="o", label=label)
    ax.set(xlabel="epochs of adaptation (0: statistics only)", ylabel="k-means accuracy on test tasks, %",
           title=title or "Transductive adaptation of the backbone")
    ax.legend(fontsize="small")
    return fig
