"""Figures of notebook 02: VAE training curves, reconstructions and 2-D projections of the latents."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hmlib.features import project_2d

from hmlib.plots import PALETTE, dataset_color, show_image_row


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average with a window shrinking at the start (same length as ``values``)."""
    if window <= 1 or len(values) < 2:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_training_curves(history: Sequence[Mapping[str, float]], title: str = "VAE training") -> Figure:
    """Loss, reconstruction and KL per sample per step (raw, faint; smoothed, bold), beta on the loss panel."""
    if not history:
        raise ValueError("empty training history")
    steps = np.array([h["step"] for h in history])
    window = max(1, len(steps) // 50)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, label in zip(axes, ("loss", "recon", "kl"),
                              ("loss = recon + beta * KL", "reconstruction (per image)", "KL per image (nats)")):
        values = np.array([h[key] for h in history])
        ax.plot(steps, values, color=PALETTE[0], alpha=0.25, lw=0.8)
        ax.plot(steps, _smooth(values, window), color=PALETTE[0], lw=1.8)
        ax.set(xlabel="step", title=label)
        if key != "kl":  # the first steps dwarf the rest; show the interesting range
            ax.set_ylim(top=np.percentile(values, 99) * 1.05, bottom=values.min() * 0.95)
    beta_ax = axes[0].twinx()
    beta_ax.plot(steps, [h["beta"] for h in history], color=PALETTE[3], lw=1.2, ls="--")
    beta_ax.set_ylabel("beta", color=PALETTE[3])
    beta_ax.grid(False)
    fig.suptitle(title)
    return fig


def plot_reconstructions(originals: Mapping[str, np.ndarray], reconstructions: Mapping[str, np.ndarray],
                         title: str = "Reconstructions (top: image, bottom: decoded posterior mean)") -> Figure:
    """Per dataset, a row of images over a row of their reconstructions (arrays (n, 28, 28), uint8 or [0, 1])."""
    names = list(originals)
    if not names:
        raise ValueError("no datasets to show")
    num_cols = max(len(originals[n]) for n in names)
    fig, axes = plt.subplots(2 * len(names), 1, figsize=(0.8 * num_cols, 1.7 * len(names)), squeeze=False,
                             gridspec_kw={"hspace": 0.05})
    for row, name in enumerate(names):
        for kind, images in enumerate((originals[name], reconstructions[name])):
            pixels = np.asarray(images, dtype=float) * (1.0 if np.asarray(images).dtype == np.uint8 else 255.0)
            ax = axes[2 * row + kind, 0]
            show_image_row(ax, list(pixels) + [None] * (num_cols - len(pixels)))
            ax.text(-4, 14, name if kind == 0 else "recon", ha="right", va="center", fontsize="small",
                    color=dataset_color(name) if kind == 0 else "0.3")
    fig.suptitle(title)
    return fig


def plot_latent_projection(latents: Mapping[str, tuple[np.ndarray, np.ndarray]], method: str = "pca",
                           max_points: int = 1000, seed: int = 0,
                           title: str = "Posterior means, coloured by class") -> Figure:
    """One panel per dataset: 2-D projection of a class-stratified subsample of mu, coloured by class."""
    names = list(latents)
    if not names:
        raise ValueError("no datasets to show")
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mu, labels = latents[name]
        idx = rng.permutation(len(mu))[:max_points]
        xy = project_2d(mu[idx], method, seed)
        classes = np.unique(labels[idx])
        colours = plt.get_cmap("tab10" if classes.size <= 10 else "turbo")(np.linspace(0, 1, classes.size)
                                                                           if classes.size > 10 else np.arange(classes.size))
        ax.scatter(xy[:, 0], xy[:, 1], c=colours[np.searchsorted(classes, labels[idx])], s=5, alpha=0.7, lw=0)
        ax.set(title=f"{name} ({classes.size} classes)", xticks=[], yticks=[])
        ax.grid(False)
    fig.suptitle(f"{title} ({method.upper() if method == 'pca' else 't-SNE'}, {max_points} points per dataset)")
    return fig


def pick_examples(labels: np.ndarray, num: int = 12, seed: int = 0) -> np.ndarray:
    """Indices of ``num`` examples spread over classes (one per class in turn, random within a class)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    shuffled = labels[order]
    # rank of each image within its class (in shuffled order): pick all rank-0 images first, then rank 1, ...
    sort = np.argsort(shuffled, kind="stable")
    starts = np.searchsorted(shuffled[sort], shuffled[sort], side="left")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[sort] = np.arange(len(labels)) - starts
    picked = order[np.lexsort((rng.random(len(labels)), rank))[:num]]
    return picked[np.argsort(labels[picked], kind="stable")]


def plot_backbone_training(metas: Mapping[str, Mapping]) -> Figure:
    """Training loss and training accuracy per epoch of each backbone (from its checkpoint meta)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (label, meta) in enumerate(metas.items()):
        history = meta["history"]
        epochs = [h["epoch"] + 1 for h in history]
        color = PALETTE[i % len(PALETTE)]
        axes[0].plot(epochs, [h["loss"] for h in history], "o-", color=color, label=label)
        axes[1].plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", color=color, label=label)
    axes[0].set(title="cross-entropy (label smoothing, augmented)", xlabel="epoch", ylabel="loss")
    axes[1].set(title="training accuracy over the meta-training classes", xlabel="epoch", ylabel="%")
    axes[0].legend(fontsize="x-small")
    return fig


def plot_cluster_quality(rows: Sequence[Mapping]) -> Figure:
    """k-means accuracy (mean ± 95% CI) per dataset for each representation (rows of evaluation.quality)."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    reps = list(dict.fromkeys(r["representation"] for r in rows))
    width = 0.8 / max(len(reps), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(datasets) + 2), 3.8))
    for j, rep in enumerate(reps):
        picked = {r["dataset"]: r for r in rows if r["representation"] == rep}
        xs = [i - 0.4 + width * (j + 0.5) for i, d in enumerate(datasets) if d in picked]
        ax.bar(xs, [picked[d]["accuracy %"] for d in datasets if d in picked], width=0.95 * width,
               yerr=[picked[d]["95% CI ±"] or 0 for d in datasets if d in picked], capsize=2,
               color=PALETTE[j % len(PALETTE)], label=rep)
    ax.set_xticks(range(len(datasets)), [f"{d}\n({rows[0]['role_of'][d]})" if "role_of" in rows[0] else d
                                          for d in datasets])
    ax.set(ylabel="k-means accuracy % (95% CI)", ylim=(0, 100), title="How well each representation clusters")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig
