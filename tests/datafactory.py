"""Tiny datasets in the hub schema for tests: parquet mirrors (``<root>/<name>/<split>.parquet``) and image folders.

Images are synthetic and class-dependent (class c: a bright bar at angle c * 180/K on a dark ground, plus
noise), so a test can check that labels still match pictures after loading. No mirror or hub is needed.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

TINY_NAMES = ("mnist", "fashion_mnist", "hebrew_chars", "math_shapes")


def class_patterns(labels: np.ndarray, num_classes: int, size: int = 28, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size): class c is a bright bar through the centre at angle c * pi / num_classes, plus noise."""
    rng = np.random.default_rng(seed)
    grid = (np.arange(size) - (size - 1) / 2) / (size / 2)
    y, x = np.meshgrid(grid, grid, indexing="ij")
    angles = np.asarray(labels)[:, None, None] * np.pi / num_classes
    distance = np.abs(x[None] * np.sin(angles) - y[None] * np.cos(angles))  # to the line through the centre
    bar = (distance < 0.15) & (x[None] ** 2 + y[None] ** 2 < 0.7)
    noise = rng.integers(0, 40, size=bar.shape)
    return np.where(bar, 255 - noise, noise).astype(np.uint8)


def to_pil(images: np.ndarray, mode: str = "L") -> list[Image.Image]:
    """uint8 (n, h, w) arrays -> PIL images converted to ``mode``."""
    return [Image.fromarray(a, mode="L").convert(mode) for a in images]


def write_parquet_split(path: Path, images: Sequence[Image.Image], labels: np.ndarray, label_names: Sequence[str],
                        image_column: str = "image", label_column: str = "label") -> Path:
    """Write one split as the hub does: an ``Image`` feature (PNG bytes) and a ``ClassLabel`` feature."""
    import datasets

    features = datasets.Features({image_column: datasets.Image(),
                                  label_column: datasets.ClassLabel(names=list(label_names))})
    data = {image_column: list(images), label_column: [int(v) for v in labels]}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path


def png_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    """``image`` encoded as ``format`` (PNG, TIFF, JPEG ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def write_raw_rows(path: Path, images: Sequence[Any], labels: Sequence[int | None], label_names: Sequence[str],
                   image_column: str = "image", label_column: str = "label") -> Path:
    """Write rows as given, with pyarrow (``datasets`` refuses some): images are bytes, path strings or None,
    stored as the hub's ``{"bytes", "path"}`` struct; labels may be None; the hub schema metadata is attached,
    so the columns read back as an ``Image`` and a ``ClassLabel`` feature."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    structs = [{"bytes": item, "path": None} if isinstance(item, (bytes, type(None))) else {"bytes": None, "path": item}
               for item in images]
    features = {image_column: {"_type": "Image"}, label_column: {"names": list(label_names), "_type": "ClassLabel"}}
    table = pa.table({image_column: pa.array(structs, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      label_column: pa.array(list(labels), type=pa.int64())})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def balanced_labels(num_images: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """Shuffled labels with every class as equally represented as possible."""
    return np.random.default_rng(seed).permutation(np.arange(num_images) % num_classes).astype(np.int64)


def write_tiny_dataset(root: Path, name: str, *, num_classes: int = 6, splits: dict[str, int] | None = None,
                       size: int = 28, mode: str = "L", invert: bool = False, seed: int = 0) -> Path:
    """``<root>/<name>/<split>.parquet`` with class-pattern images; ``invert`` draws dark ink on a light ground."""
    splits = {"train": 120, "test": 60} if splits is None else splits
    names = [f"class_{c}" for c in range(num_classes)]
    for offset, (split, count) in enumerate(splits.items()):
        labels = balanced_labels(count, num_classes, seed + offset)
        images = class_patterns(labels, num_classes, size, seed + offset)
        if invert:
            images = 255 - images
        write_parquet_split(root / name / f"{split}.parquet", to_pil(images, mode), labels, names)
    return root / name


def write_tiny_mirror(root: Path, names: Sequence[str] = TINY_NAMES, seed: int = 0, **kwargs) -> Path:
    """A mirror laid out as ../shared/data with tiny class-pattern copies of ``names``."""
    for i, name in enumerate(names):
        write_tiny_dataset(root, name, seed=seed + 10 * i, **kwargs)
    return root


def write_image_folder(root: Path, counts: dict[str, dict[str, int]], size: tuple[int, int] = (20, 30),
                       mode: str = "RGB") -> Path:
    """``<root>/<split>/<class>/<i>.png`` images (odd size and mode); counts: split -> class name -> images."""
    for split, per_class in counts.items():
        for c, (label_name, count) in enumerate(per_class.items()):
            folder = root / split / label_name
            folder.mkdir(parents=True, exist_ok=True)
            images = class_patterns(np.full(count, c), len(per_class), max(size), seed=c)[:, :size[1], :size[0]]
            for i, img in enumerate(to_pil(images, mode)):
                img.save(folder / f"{i}.png")
    return root


def perturbed_backbone(channels: tuple[int, ...], embed_dim: int, seed: int = 0):
    """A small ConvBackbone in eval mode whose stored statistics and affine transforms are far from the defaults."""
    from hmlib.backbone.model import ConvBackbone, batchnorm_layers
    from hmlib.reproducibility import seeded

    with seeded(seed):
        model = ConvBackbone(channels, embed_dim, 3)
        for layer in batchnorm_layers(model):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    return model.eval()
