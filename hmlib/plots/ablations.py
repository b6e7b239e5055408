"""Figures of notebook 04: step curves, paired differences and the explorer's views."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hmlib.plots import CONFUSION_CMAP, PALETTE, method_color, method_label
from hmlib.stats import mean_ci

if TYPE_CHECKING:  # imported for type hints only (no import cycle at run time)
    from hmlib.ablations import AblationResult
    from hmlib.widgets import ExplorerState


def _band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Means and 95% half-widths over tasks (axis 0) for every column of (T, C) values (0 width if undefined)."""
    stats = [mean_ci(values[:, c]) for c in range(values.shape[1])]
    return np.array([m for m, _ in stats]), np.array([h or 0.0 for _, h in stats])


def plot_step_curve(result: "AblationResult", steps: Sequence[int], *, label: str | None = None) -> Figure:
    """Accuracy (mean ± 95% CI over tasks) against the number of test-time inner steps, with k-means."""
    label = label or result.variants[0]["label"]
    acc = result.curve(label)
    steps = [s for s in steps if s < acc.shape[1]]
    mean, half = _band(acc[:, steps] * 100)
    positions = np.arange(len(steps))  # equal spacing: the grid is roughly geometric
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(positions, mean, "o-", color=method_color("hypernet_adapted"), label="hypernet + adaptation")
    ax.fill_between(positions, mean - half, mean + half, color=method_color("hypernet_adapted"), alpha=0.2)
    k_mean, k_half = mean_ci(result.kmeans.mean(axis=0) * 100)
    ax.axhline(k_mean, color=method_color("kmeans_embedding"), ls="--", label=method_label("kmeans_embedding"))
    ax.axhspan(k_mean - (k_half or 0), k_mean + (k_half or 0), color=method_color("kmeans_embedding"), alpha=0.15)
    ax.set_xticks(positions, [str(s) for s in steps])
    ax.set_xlabel("test-time inner steps")
    ax.set_ylabel("clustering accuracy (%)")
    ax.set_title(f"{len(result.conditions)} held-out condition(s) ({result.setting.replace('_', '-')}), "
                 f"{acc.shape[0]} tasks, {len(result.seeds)} seed(s)")
    ax.legend(loc="best")
    return fig


def plot_comparison(result: "AblationResult") -> Figure:
    """Left: accuracy before/after adaptation per variant. Right: paired difference vs the reference."""
    rows = result.summary()
    labels = [r["variant"] for r in rows]
    y = np.arange(len(rows))[::-1]
    has_ref = result.reference is not None
    fig, axes = plt.subplots(1, 2 if has_ref else 1, figsize=(11 if has_ref else 6.4, 0.7 * len(rows) + 1.6),
                             squeeze=False, sharey=True)
    ax = axes[0, 0]
    for offset, key, name in ((0.15, "before", "hypernet"), (-0.15, "after", "hypernet_adapted")):
        means = [100 * r[key]["mean"] for r in rows]
        halves = [100 * (r[key]["ci"] or 0) for r in rows]
        ax.errorbar(means, y + offset, xerr=halves, fmt="o", capsize=3, color=method_color(name),
                    label="before adaptation" if key == "before" else "after adaptation")
    ax.scatter([100 * r["kmeans"]["mean"] for r in rows], y, marker="|", s=200,
               color=method_color("kmeans_embedding"), label=method_label("kmeans_embedding"), zorder=3)
    ax.set_yticks(y, labels)
    ax.set_ylim(y.min() - 0.6, y.max() + 0.6)
    ax.set_xlabel("clustering accuracy (%), mean ± 95% CI")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    if has_ref:
        ax = axes[0, 1]
        for yi, row in zip(y, rows):
            stat = row.get("vs_reference")
            if stat is None:
                ax.plot([0], [yi], "D", color=PALETTE[7])
                continue
            color = method_color("hypernet_adapted") if stat["excludes_zero"] and stat["mean"] > 0 else (
                method_color("kmeans_pixels") if stat["excludes_zero"] else method_color("chance"))
            ax.errorbar([100 * stat["mean"]], [yi], xerr=[100 * (stat["ci"] or 0)], fmt="o", capsize=3, color=color)
        ax.axvline(0, color="black", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.set_xlabel(f"paired difference vs {result.reference} (points)")
    fig.suptitle(result.title)
    return fig


def _scatter_clusters(ax: plt.Axes, state: "ExplorerState", legend: bool = False) -> None:
    """The representation (2-D projection) coloured by matched cluster; mismatched images ringed in black."""
    colors = np.array(PALETTE)[state.pred % len(PALETTE)]
    ax.scatter(state.embedding[:, 0], state.embedding[:, 1], c=colors, s=9, linewidths=0)
    wrong = state.pred != state.labels
    ax.scatter(state.embedding[wrong, 0], state.embedding[wrong, 1], facecolors="none", edgecolors="black",
               s=16, linewidths=0.4)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:
        handles = [plt.Line2D([], [], ls="", marker="o", color=PALETTE[j % len(PALETTE)], label=str(c))
                   for j, c in enumerate(state.classes)]
        ax.legend(handles=handles, title="cluster → class", loc="center left", bbox_to_anchor=(1.0, 0.5))


def _steps_text(num_steps: int) -> str:
    return f"{num_steps} step" + ("" if num_steps == 1 else "s")


def plot_explorer_state(state: "ExplorerState", *, figsize: tuple[float, float] = (12.0, 3.6)) -> Figure:
    """The explorer's view: accuracy vs steps, confusion matrix and latents coloured by predicted cluster."""
    fig, (ax_curve, ax_cm, ax_lat) = plt.subplots(1, 3, figsize=figsize, gridspec_kw={"width_ratios": [1.3, 1, 1]})
    steps = np.arange(len(state.accuracy))
    ax_curve.plot(steps, 100 * state.accuracy, "-", color=method_color("hypernet_adapted"))
    ax_curve.plot([state.num_steps], [100 * state.current_accuracy], "o", color="black")
    ax_curve.set_xlabel("inner steps")
    ax_curve.set_ylabel("clustering accuracy (%)")
    ax_curve.set_ylim(0, 100)
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set_title(f"{state.inner_loss}, step sizes x {state.inner_lr:.3g}")
    _confusion(ax_cm, state)
    _scatter_clusters(ax_lat, state, legend=True)
    ax_lat.set_title("adapted representation (fixed PCA axes), colour = cluster")
    ax_lat.set_xlabel("black ring: mismatched")
    fig.suptitle(f"{state.dataset} task {state.task} (classes {', '.join(map(str, state.classes))}): "
                 f"{100 * state.current_accuracy:.1f}% after {_steps_text(state.num_steps)}")
    return fig


def _confusion(ax: plt.Axes, state: "ExplorerState", annotate: bool = True) -> None:
    ax.imshow(state.confusion, cmap=CONFUSION_CMAP)
    if annotate:
        top = state.confusion.max()
        for (i, j), v in np.ndenumerate(state.confusion):
            ax.text(j, i, str(v), ha="center", va="center", fontsize="small",
                    color="white" if v > 0.6 * top else "black")
    k = len(state.classes)
    ax.set_xticks(range(k), [str(c) for c in state.classes])
    ax.set_yticks(range(k), [str(c) for c in state.classes])
    ax.set_xlabel("true class")
    ax.set_ylabel("matched cluster")
    ax.grid(False)


def plot_step_multiples(states: Sequence["ExplorerState"]) -> Figure:
    """Small multiples over the step grid: latents coloured by cluster (top) and confusion matrices (bottom)."""
    if not states:
        raise ValueError("no states to plot")
    fig, axes = plt.subplots(2, len(states), figsize=(2.3 * len(states), 4.8), squeeze=False)
    for col, state in enumerate(states):
        _scatter_clusters(axes[0, col], state)
        axes[0, col].set_title(f"{_steps_text(state.num_steps)}: {100 * state.current_accuracy:.1f}%")
        _confusion(axes[1, col], state, annotate=len(states) <= 8)
        if col:
            axes[1, col].set_ylabel("")
    first = states[0]
    fig.suptitle(f"{first.dataset} task {first.task}: {first.inner_loss}, step sizes x {first.inner_lr:.3g}")
    return fig


def plot_task_curves(curves: Mapping[str, np.ndarray], *, title: str = "") -> Figure:
    """Accuracy vs inner steps of one task for several settings (e.g. the lr grid or the inner losses)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, acc) in enumerate(curves.items()):
        ax.plot(np.arange(len(acc)), 100 * np.asarray(acc), "-", color=PALETTE[i % len(PALETTE)], label=name)
    ax.set_xlabel("inner steps")
    ax.set_ylabel("clustering accuracy (%)")
    ax.set_ylim(0, 100)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.legend(loc="best")
    return fig


class ExplorerFigure:
    """The explorer's figure kept alive between updates: artists change in place, the layout is frozen.

    Re-creating a three-panel figure and re-running its layout costs several times more than
    redrawing it; the live widget calls :meth:`update` then :meth:`png` on every change.
    """

    def __init__(self, state: "ExplorerState", *, figsize: tuple[float, float] = (12.0, 3.6), dpi: int = 80) -> None:
        self.figure = plot_explorer_state(state, figsize=figsize)
        plt.close(self.figure)  # drawn on demand by png(); never shown by the notebook backend
        FigureCanvasAgg(self.figure)  # closing detached pyplot's canvas: render with Agg directly
        self.figure.set_dpi(dpi)
        self.figure.canvas.draw()  # run the layout once, then freeze it
        self.figure.set_layout_engine("none")
        self.ax_curve, self.ax_cm, self.ax_lat = self.figure.axes[:3]
        self.curve, self.marker = self.ax_curve.lines[:2]
        self.image = self.ax_cm.images[0]
        self.points, self.rings = self.ax_lat.collections[:2]
        self.num_classes = len(state.classes)

    def update(self, state: "ExplorerState") -> None:
        """Show another state (same number of classes) without rebuilding the figure."""
        if len(state.classes) != self.num_classes:
            raise ValueError(f"the figure was built for {self.num_classes} classes, the state has {len(state.classes)}")
        steps = np.arange(len(state.accuracy))
        self.curve.set_data(steps, 100 * state.accuracy)
        self.marker.set_data([state.num_steps], [100 * state.current_accuracy])
        self.ax_curve.set_xlim(-0.5, max(len(steps) - 0.5, 0.5))
        self.ax_curve.set_title(f"{state.inner_loss}, step sizes x {state.inner_lr:.3g}")
        self.image.set_data(state.confusion)
        self.image.set_clim(0, max(int(state.confusion.max()), 1))
        top = state.confusion.max()
        for text, ((i, j), v) in zip(self.ax_cm.texts, np.ndenumerate(state.confusion)):
            text.set_text(str(v))
            text.set_color("white" if v > 0.6 * top else "black")
        names = [str(c) for c in state.classes]
        self.ax_cm.set_xticks(range(self.num_classes), names)
        self.ax_cm.set_yticks(range(self.num_classes), names)
        self.points.set_offsets(state.embedding)
        self.points.set_facecolors(np.array(PALETTE)[state.pred % len(PALETTE)])
        wrong = state.pred != state.labels
        self.rings.set_offsets(state.embedding[wrong] if wrong.any() else np.empty((0, 2)))
        low, high = state.embedding.min(0), state.embedding.max(0)
        pad = 0.05 * np.maximum(high - low, 1e-6)
        self.ax_lat.set_xlim(low[0] - pad[0], high[0] + pad[0])
        self.ax_lat.set_ylim(low[1] - pad[1], high[1] + pad[1])
        legend = self.ax_lat.get_legend()
        if legend is not None:
            for text, name in zip(legend.get_texts(), names):
                text.set_text(name)
        self.figure.suptitle(f"{state.dataset} task {state.task} (classes {', '.join(names)}): "
                             f"{100 * state.current_accuracy:.1f}% after {_steps_text(state.num_steps)}")

    def png(self) -> bytes:
        """The figure rendered as PNG bytes (fast zlib level: the widget redraws often)."""
        from PIL import Image

        self.figure.canvas.draw()
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(self.figure.canvas.buffer_rgba())).save(buffer, format="png", compress_level=1)
        return buffer.getvalue()
