"""Figures of notebook 01: raw vs preprocessed samples, polarity, class counts, an example task, corruptions."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hmlib.data.corruptions import FAMILIES, apply, corruption_table, get_corruption
from hmlib.plots import IMAGE_CMAP, PALETTE, dataset_color, show_image, show_image_row


def plot_preprocessing(preview, title: str | None = None) -> Figure:
    """Three rows per sample: the stored image (own size and mode), luminance/pad/resize, then polarity fixed."""
    num = len(preview.raw)
    if num == 0:
        raise ValueError("the preview holds no images")
    fig = plt.figure(figsize=(1.1 * num, 4.2))
    grid = fig.add_gridspec(3, num)
    top = [fig.add_subplot(grid[0, col]) for col in range(num)]  # the stored images differ in size and mode
    kept, final = fig.add_subplot(grid[1, :]), fig.add_subplot(grid[2, :])
    shifted = preview.name.partition("+")[2]  # a shifted dataset's preview shows its corruption in the last row
    rows = ("as stored", "grey, padded, 28x28", f"final + {shifted}" if shifted else "final (polarity)")
    for ax, raw in zip(top, preview.raw):
        shown = raw.convert("RGB") if raw.mode not in ("L", "RGB") else raw
        show_image(ax, np.asarray(shown), IMAGE_CMAP if shown.mode == "L" else None)
        ax.set_title(f"{raw.size[0]}x{raw.size[1]} {raw.mode}", fontsize="x-small", fontweight="normal")
    show_image_row(kept, list(preview.kept))
    centres = show_image_row(final, list(preview.processed))
    final.set_xticks(centres, [str(preview.label_names[label]) for label in preview.labels], fontsize="x-small")
    final.tick_params(length=0)
    for ax, label in zip((top[0], kept, final), rows):
        ax.set_ylabel(label, fontsize="x-small")
    fig.suptitle(title or f"{preview.name}: preprocessing step by step "
                          f"({100 * preview.inverted_fraction:.1f}% of a sample had their polarity flipped)")
    return fig


def plot_polarity(inverted_fraction: Mapping[str, float]) -> Figure:
    """Share of images whose polarity was flipped (dark ink on a light ground made bright on dark), per dataset."""
    names = list(inverted_fraction)
    values = np.array([100 * inverted_fraction[n] for n in names])
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * len(names)))
    ax.barh(names, values, color=[dataset_color(n) for n in names])
    for y, v in enumerate(values):
        ax.text(min(v + 1, 92), y, f"{v:.1f}%", va="center", fontsize="small")
    ax.set(xlim=(0, 100), xlabel="images inverted (%)", title="Polarity normalised per image from its border")
    ax.invert_yaxis()
    return fig


def plot_class_counts(sets: Mapping[str, Mapping[str, object]]) -> Figure:
    """Per dataset, images per class in each split (grouped bars); ``sets[name][split]`` is an ImageSet."""
    names = list(sets)
    if not names:
        raise ValueError("no datasets to show")
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.3 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        splits = list(sets[name])
        label_names = sets[name][splits[0]].label_names
        x = np.arange(len(label_names))
        width = 0.8 / len(splits)
        for i, split in enumerate(splits):
            counts = sets[name][split].class_counts()
            ax.bar(x + (i - (len(splits) - 1) / 2) * width, counts, width, label=f"{split} ({counts.sum():,})",
                   color=PALETTE[i])
        ax.set_xticks(x, [str(n) for n in label_names], rotation=45 if max(map(len, map(str, label_names))) > 3 else 0,
                      ha="right" if max(map(len, map(str, label_names))) > 3 else "center", fontsize="small")
        ax.set(ylabel="images", title=name, ylim=(0, 1.3 * max(sets[name][s].class_counts().max() for s in splits)))
        ax.legend(loc="upper right", ncols=len(splits))
    return fig


def plot_task(image_set, task, per_class: int = 8, title: str | None = None) -> Figure:
    """One task (a TaskBatch of length 1): a row of images per class, labelled with the original class name."""
    indices, labels, classes = task.indices[0], task.labels[0], task.classes[0]
    num_classes = classes.size
    fig, axes = plt.subplots(num_classes, 1, figsize=(0.9 * per_class, 0.95 * num_classes + 0.4), squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        members = indices[labels == j][:per_class]
        show_image_row(ax, [image_set.images[i] for i in members] + [None] * (per_class - members.size))
        ax.set_ylabel(f"label {j}\n{image_set.label_names[classes[j]]}\n({(labels == j).sum()} images)",
                      fontsize="x-small", rotation=0, ha="right", va="center")
    fig.suptitle(title or f"{image_set.name}: one task of {indices.size} images from {num_classes} classes "
                          f"(the model sees them unlabeled and shuffled)")
    return fig


def plot_corruptions(images: np.ndarray, names: Sequence[str] | None = None, seed: int = 0) -> Figure:
    """The clean ``images`` (uint8 (n, h, w)) on top, then a row per corruption (every registered one by default),
    benchmark family first, each row labelled with its name and family."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"plot_corruptions takes a non-empty stack of images (n, h, w), got shape {images.shape}")
    names = [row["name"] for row in corruption_table()] if names is None else list(names)
    names.sort(key=lambda n: FAMILIES.index(get_corruption(n).family))  # stable: the given order within a family
    rows = [("clean", "", images)] + [(n, get_corruption(n).family, apply(n, images, seed)) for n in names]
    num = images.shape[0]
    fig, axes = plt.subplots(len(rows), 1, figsize=(0.8 * num + 1.6, 0.8 * len(rows) + 0.4), squeeze=False)
    for ax, (name, family, shown) in zip(axes[:, 0], rows):
        show_image_row(ax, list(shown))
        colour = PALETTE[FAMILIES.index(family)] if family else "black"
        ax.set_ylabel(f"{name}\n{family}" if family else name, fontsize="x-small", rotation=0, ha="right",
                      va="center", color=colour)
    fig.suptitle(f"Corruptions: benchmark family (held out) then train family; seed {seed}")
    return fig
