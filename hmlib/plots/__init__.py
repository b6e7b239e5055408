"""One figure style for every notebook and report, plus fixed colours per method and dataset.

Call :func:`set_style` once per notebook. Plot functions live in ``hmlib/plots/<topic>.py``, take
data (never a config path) and return a :class:`matplotlib.figure.Figure`. Use
:func:`method_color` / :func:`dataset_color` so a method keeps its colour in every figure.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

from hmlib.evaluation.methods import METHODS

# Colour-blind-safe base palette (seaborn "colorblind" = Wong/Okabe-Ito family), fixed order.
PALETTE: tuple[str, ...] = tuple(sns.color_palette("colorblind", 10).as_hex())

# Methods keep one colour and label everywhere: they come from the method registry
# (hmlib.evaluation.methods.METHODS); these are the few extra series the figures draw.
EXTRA_COLORS: dict[str, str] = {"chance": "#9a9a9a"}
EXTRA_LABELS: dict[str, str] = {"chance": "chance"}

DATASET_COLORS: dict[str, str] = {
    "mnist": PALETTE[0],
    "fashion_mnist": PALETTE[1],
    "kmnist": PALETTE[2],
    "hebrew_chars": PALETTE[3],
    "math_shapes": PALETTE[4],
}

SEQUENTIAL_CMAP = "viridis"  # ordered quantities (steps, learning rates)
CONFUSION_CMAP = "Blues"  # confusion matrices and count heat maps
IMAGE_CMAP = "gray"  # image grids (ink bright on dark, as the preprocessed data)


def show_image(ax: plt.Axes, pixels: np.ndarray, cmap: str | None = IMAGE_CMAP) -> None:
    """``pixels`` (0..255) on ``ax``, without ticks or grid."""
    ax.imshow(pixels, cmap=cmap, vmin=0, vmax=255)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def show_image_row(ax: plt.Axes, images: Sequence[np.ndarray | None], gap: int = 2) -> list[float]:
    """``images`` (each 0..255, all one size; None leaves its place empty) side by side on one axes, ``gap`` pixels
    of figure background between them: a row of a grid drawn as one image, so a figure of hundreds of thumbnails
    lays out in a fraction of a second (one axes per thumbnail took seconds). Returns each image's x centre in the
    axes' data coordinates (to label the images with ticks)."""
    shapes = {np.shape(x) for x in images if x is not None}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"show_image_row takes 2-D images of one size (and None for an empty place); got shapes "
                         f"{sorted(shapes) or 'none'}")
    shape = shapes.pop()
    row = np.ma.masked_all((shape[0], len(images) * (shape[1] + gap) - gap))
    for col, pixels in enumerate(images):
        if pixels is not None:
            row[:, col * (shape[1] + gap): col * (shape[1] + gap) + shape[1]] = pixels
    show_image(ax, row)
    ax.set_frame_on(False)
    return [col * (shape[1] + gap) + (shape[1] - 1) / 2 for col in range(len(images))]


def set_style(context: str = "notebook") -> None:
    """Apply the hmlib seaborn/matplotlib style (call once per notebook)."""
    sns.set_theme(context=context, style="whitegrid", palette=list(PALETTE))
    mpl.rcParams.update({
        "figure.figsize": (6.4, 4.0),
        "figure.dpi": 100,
        "savefig.dpi": 120,
        "savefig.bbox": "tight",
        "figure.constrained_layout.use": True,
        "axes.titlesize": "medium",
        "axes.titleweight": "bold",
        "axes.labelsize": "medium",
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.frameon": False,
        "legend.fontsize": "small",
        "image.cmap": SEQUENTIAL_CMAP,
        "image.interpolation": "nearest",
        "axes.formatter.useoffset": False,
    })
    _show_figures_once()


def _show_figures_once() -> None:
    """In IPython, close a pyplot figure once it is rendered as output, so the inline backend does not show it again.

    Without this, a cell ending in a plot function's returned Figure shows it twice: once as the cell's
    value and once more when the inline backend flushes every open pyplot figure after the cell.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    plt.close(plt.figure())  # load the backend now, so its figure formatters are registered before we wrap them
    for formatter in shell.display_formatter.formatters.values():
        try:
            render = formatter.lookup_by_type(Figure)
        except KeyError:
            continue
        if getattr(render, "hmlib_once", False):
            continue

        def render_once(fig: Figure, _render=render) -> object:
            data = _render(fig)
            manager = getattr(fig.canvas, "manager", None)
            if manager is not None and plt.fignum_exists(manager.num):
                plt.close(fig)  # already shown: the post-cell flush must not show it again
            return data

        render_once.hmlib_once = True  # type: ignore[attr-defined]
        formatter.for_type(Figure, render_once)


def _fallback(name: str) -> str:
    """Stable palette colour for a name without a fixed colour (same name, same colour)."""
    return PALETTE[sum(name.encode()) % len(PALETTE)]


def method_color(name: str) -> str:
    """Colour of a method (from the method registry; stable for any other name)."""
    method = METHODS.get(name)
    return method.color if method is not None else EXTRA_COLORS.get(name, _fallback(name))


def method_label(name: str) -> str:
    """Legend label of a method (from the method registry; its name otherwise)."""
    method = METHODS.get(name)
    return method.label if method is not None else EXTRA_LABELS.get(name, name.replace("_", " "))


def dataset_color(name: str) -> str:
    """Colour of a dataset (fixed for the built-ins, stable for any other name)."""
    return DATASET_COLORS.get(name, _fallback(name))


__all__ = [
    "PALETTE", "DATASET_COLORS", "SEQUENTIAL_CMAP", "CONFUSION_CMAP",
    "IMAGE_CMAP", "set_style", "show_image", "show_image_row", "method_color", "method_label", "dataset_color",
]
