"""What notebook 01 shows: where each dataset comes from, raw vs preprocessed samples, and the cache state."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from hmlib.artifacts import ArtifactError
from hmlib.config import DataConfig
from hmlib.data import cache
from hmlib.data.corruptions import apply
from hmlib.data.loading import ImageSet, load_split, local_source_state, open_source
from hmlib.data.preprocess import normalise_polarity, open_image, preprocess_images
from hmlib.data.registry import get_spec
from hmlib.data.splits import stratified_subset
from hmlib.data.tasks import TaskBatch, sample_tasks


@dataclass
class Preview:
    """A few images of one split before and after preprocessing, and how often polarity was flipped."""

    name: str
    raw: list[Image.Image]  # as stored in the source (any mode and size)
    kept: np.ndarray  # uint8 (n, S, S): luminance, padded, resized, polarity untouched
    processed: np.ndarray  # uint8 (n, S, S): what the cache holds
    labels: np.ndarray
    label_names: list[str]
    inverted_fraction: float  # share of a larger sample whose polarity was flipped
    raw_sizes: np.ndarray  # (m, 2) width, height of that larger sample


def _open_decodable(items: Sequence[Any], rows: np.ndarray) -> tuple[list[Image.Image], np.ndarray]:
    """The items that decode, opened and loaded, and their rows (undecodable ones are left out: a build lists them)."""
    opened, kept = [], []
    for item, row in zip(items, rows):
        try:
            img = open_image(item)
            img.load()
        except Exception:  # corrupt bytes, missing file: the preview shows the others
            continue
        opened.append(img)
        kept.append(row)
    return opened, np.asarray(kept, dtype=np.int64)


def preview(name: str, cfg: DataConfig, *, split: str = "train", num_images: int = 12, num_polarity: int = 500,
            seed: int = 0) -> Preview:
    """Decode ``num_images`` (one per class where possible) from the source and preprocess them step by step
    (a shifted dataset: its base's preview, the corruption applied to the final images)."""
    spec = get_spec(name, cfg)
    if spec.corruption is not None:
        shown = preview(spec.base, cfg, split=split, num_images=num_images, num_polarity=num_polarity, seed=seed)
        return replace(shown, name=name, processed=apply(spec.corruption, shown.processed, seed))
    source, _ = open_source(spec, cfg, split, progress=False)
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(source.labels >= 0)  # rows with a usable label
    per_class = np.array([rng.choice(np.flatnonzero(source.labels == c)) for c in np.unique(source.labels[labelled])])
    shown = np.sort(rng.choice(per_class, size=min(num_images, per_class.size), replace=False))
    raw, shown = _open_decodable(source.take(shown), shown)
    kept = preprocess_images(raw, cfg.image_size, "keep", progress=False)
    processed = preprocess_images(raw, cfg.image_size, cfg.polarity, progress=False)
    sample = labelled[stratified_subset(source.labels[labelled], num_polarity, seed)]
    sample_raw, _ = _open_decodable(source.take(sample), sample)
    _, inverted = normalise_polarity(preprocess_images(sample_raw, cfg.image_size, "keep", progress=False))
    return Preview(name=name, raw=raw, kept=kept, processed=processed, labels=source.labels[shown],
                   label_names=source.label_names, inverted_fraction=float(inverted.mean()),
                   raw_sizes=np.array([img.size for img in sample_raw]))


def load_datasets(cfg: DataConfig, names: Sequence[str], splits: Sequence[str] = ("train", "test"), *,
                  progress: bool = True) -> dict[str, dict[str, ImageSet]]:
    """``{name: {split: ImageSet}}`` for every dataset and split (built and cached where needed)."""
    return {name: {split: load_split(name, split, cfg, progress=progress) for split in splits} for name in names}


def source_status(cfg: DataConfig, names: Sequence[str], split: str = "train") -> list[dict[str, Any]]:
    """Per dataset: hub id, whether a cache and a local copy exist, and which source a build would use."""
    rows = []
    for name in names:
        spec = get_spec(name, cfg)
        cached = _manifest_or_none(name, split) is not None
        if spec.corruption is not None:  # made from its base's cached split
            rows.append({"dataset": name, "hub id": "-", "cached": cached, "local copy": False,
                         "test split": f"as {spec.base}", "next load from": "cache" if cached
                         else f"{spec.base}, then {spec.corruption}"})
            continue
        local = local_source_state(spec, cfg, split, None)
        rows.append({"dataset": name, "hub id": spec.hub_id or "-", "cached": cached,
                     "local copy": bool(local), "test split": "derived from train" if local and local[1]
                     else ("given" if local else "?"),
                     "next load from": "cache" if cached else ("local copy" if local else
                                                                 ("hub" if spec.hub_id and cfg.use_hub else "nowhere"))})
    return rows


def cache_status(names: Sequence[str], splits: Sequence[str] = ("train", "test")) -> list[dict[str, Any]]:
    """Per cached split: file, size, image count, fingerprint and source (what notebook 02 will load)."""
    rows = []
    for name in names:
        for split in splits:
            arrays_path, _ = cache.cache_paths(name, split)
            manifest = _manifest_or_none(name, split)
            rows.append({"dataset": name, "split": split, "cached": manifest is not None,
                         "images": manifest["num_images"] if manifest else 0,
                         "MB": round(arrays_path.stat().st_size / 2**20, 1) if manifest else 0.0,
                         "fingerprint": manifest["fingerprint"] if manifest else "-",
                         "source": manifest["location"] if manifest else "-", "file": str(arrays_path)})
    return rows


def _manifest_or_none(name: str, split: str) -> dict[str, Any] | None:
    """A cached split's manifest, None when missing or unreadable (the next load rebuilds it)."""
    try:
        return cache.read_manifest(name, split)
    except ArtifactError:
        return None


def example_task(image_set: ImageSet, num_classes: int, num_images: int, mode: str = "random",
                 seed: int = 0) -> TaskBatch:
    """One task from ``image_set`` (a TaskBatch of length 1), shrunk if its smallest class cannot fill it."""
    smallest = int(image_set.class_counts()[image_set.class_counts() > 0].min())
    return sample_tasks(image_set.labels, 1, num_classes, min(num_images, num_classes * smallest), mode, seed,
                        where=f"dataset '{image_set.name}' split '{image_set.split}'")


def summary(sets: dict[str, dict[str, ImageSet]]) -> list[dict[str, Any]]:
    """One row per loaded split: images, classes, pixel mean and the fingerprint downstream artifacts record."""
    return [{"dataset": name, "split": split, "images": len(s), "classes": s.num_classes,
             "smallest class": int(s.class_counts().min()), "mean pixel": round(float(s.images.mean()), 1),
             "fingerprint": s.fingerprint} for name, by_split in sets.items() for split, s in by_split.items()]
