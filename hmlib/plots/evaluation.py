"""Evaluation figures: the results table, per-task hypernetwork vs baseline scatter, accuracy bars with CIs."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hmlib.plots import method_color
from hmlib.stats import pct, signed


def evaluation_table(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """The evaluation table (summary rows of hmlib.evaluation) drawn as a figure, for reports."""
    header = ["setting", "N", "method", "accuracy % (95% CI)", "ms / task", "vs k-means on embedding", "test-time gain"]
    cells = [[row["setting"], str(row["num_images"]), row["label"], pct({"mean": row["accuracy"], "ci": row["ci"]}),
              "" if row.get("ms_per_task") is None else f"{row['ms_per_task']:.1f}",
              signed(row["vs"].get("kmeans_embedding")) if "vs" in row else "",
              signed(row["gain"]) if "gain" in row else ""] for row in rows]
    fig, ax = plt.subplots(figsize=(12, 0.45 * (len(cells) + 2)))
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


def accuracy_bars(rows: Sequence[Mapping[str, Any]], *, num_classes: int | None = None,
                  title: str | None = None) -> Figure:
    """Mean accuracy per method with 95% CI error bars, one group per (setting, N); 1/K dashed when given."""
    groups = list(dict.fromkeys((row["setting"], row["num_images"]) for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    labels = {row["method"]: row["label"] for row in rows}
    by_key = {(row["setting"], row["num_images"], row["method"]): row for row in rows}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 3), 4.2))
    for m, method in enumerate(methods):
        xs, means, errs = [], [], []
        for g, (setting, n) in enumerate(groups):
            row = by_key.get((setting, n, method))
            if row is not None:
                xs.append(g - 0.4 + width * (m + 0.5))
                means.append(100 * row["accuracy"])
                errs.append(100 * (row["ci"] or 0.0))
        ax.bar(xs, means, width=width * 0.95, yerr=errs, capsize=2, color=method_color(method), label=labels[method])
    if num_classes:
        ax.axhline(100 / num_classes, color="#9a9a9a", ls="--", lw=1, label=f"1/K = {100 / num_classes:.0f}%")
    ax.set_xticks(range(len(groups)), [f"{s.replace('_', '-')}\nN = {n}" for s, n in groups])
    ax.set(ylabel="clustering accuracy % (95% CI)", ylim=(0, 100), title=title or "Accuracy on the evaluation suite")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
