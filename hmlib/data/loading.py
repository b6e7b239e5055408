"""``load_split``: a dataset split as an :class:`ImageSet`, resolved cache -> local mirror -> hub."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hmlib.artifacts import ArtifactError, fingerprint
from hmlib.config import DataConfig
from hmlib.data import cache
from hmlib.data.preprocess import PREPROCESS_VERSION, preprocess_images
from hmlib.data.registry import HUB_ONLY, DatasetError, DatasetSpec, get_spec
from hmlib.data.sources import (SourceSplit, comparable, folder_identity, image_folder_splits, local_folders,
                                mirror_identity, mirror_root, parquet_files, read_hub, read_image_folder,
                                read_parquet, split_from_dataset)


@dataclass
class ImageSet:
    """One preprocessed dataset split: uint8 images (n, 28, 28), ink bright on dark; int64 labels (n,)."""

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    fingerprint: str  # identifies source + preprocessing settings; downstream artifacts record it

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> np.ndarray:
        """Images per class id, (num_classes,)."""
        return np.bincount(self.labels, minlength=self.num_classes)


def preprocess_settings(spec: DatasetSpec, cfg: DataConfig, derived: bool) -> dict[str, Any]:
    """Every setting that shapes the cached pixels and the chosen images (recorded in the manifest)."""
    return {
        "preprocess_version": PREPROCESS_VERSION,
        "hub_id": spec.hub_id,
        "image_size": cfg.image_size,
        "polarity": cfg.polarity,
        "max_images_per_split": cfg.max_images_per_split,
        "subsample_seed": cfg.split_seed if cfg.max_images_per_split is not None else None,
        "derived_split": {"from": "train", "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed}
        if derived else None,
    }


def _resolve_split(available: set[str], split: str) -> tuple[str, bool] | None:
    """``(split to read, derived)``; without a test split, train and test are both carved out of train."""
    if "test" not in available and "train" in available and split in ("train", "test"):
        return "train", True
    return (split, False) if split in available else None


def _folder_splits(folder: Path) -> tuple[dict[str, list[Path]], set[str]]:
    """``(parquet files by split, available splits)`` of a local folder (parquet mirror or image folder)."""
    files = parquet_files(folder)
    return files, set(files) if files else (image_folder_splits(folder) or set())


def _derived(identity: dict[str, Any], derived: bool) -> dict[str, Any]:
    return identity | {"derived_from": "train"} if derived else identity


def local_source_state(spec: DatasetSpec, cfg: DataConfig, split: str, recorded: dict[str, Any] | None
                       ) -> tuple[dict[str, Any], bool] | None:
    """``(identity, derived)`` of the first local folder that can serve ``split`` (no decoding), or None."""
    for folder in local_folders(spec, cfg):
        files, available = _folder_splits(folder)
        resolved = _resolve_split(available, split)
        if resolved is not None:
            wanted, derived = resolved
            identity = mirror_identity(files[wanted], recorded) if files else folder_identity(folder)
            return _derived(identity, derived), derived
    return None


def _open_local(spec: DatasetSpec, cfg: DataConfig, split: str, progress: bool, attempts: list[str]
                ) -> tuple[SourceSplit, bool] | None:
    """The split from the first local folder that has it (mirror entry, then a custom local folder)."""
    for folder in local_folders(spec, cfg):
        files, available = _folder_splits(folder)
        resolved = _resolve_split(available, split)
        if resolved is None:
            attempts.append(f"local: {folder} (has splits {sorted(available)}, not '{split}')" if available else
                            f"local: {folder} (no <split>.parquet files or class image folders there)")
            continue
        wanted, derived = resolved
        try:
            if files:
                dataset, identity = read_parquet(files[wanted], progress=progress), mirror_identity(files[wanted])
                location = str(files[wanted][0]) if len(files[wanted]) == 1 else f"{folder}/{wanted}-*.parquet"
            else:
                dataset = read_image_folder(folder, progress=progress)[wanted]
                identity, location = folder_identity(folder), str(folder)
            return split_from_dataset(dataset, _derived(identity, derived), location), derived
        except DatasetError:
            raise
        except Exception as err:  # corrupt file, unreadable folder: note it and try the next source
            attempts.append(f"local: {folder} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    return None


def _open_hub(spec: DatasetSpec, split: str, progress: bool, attempts: list[str]) -> tuple[SourceSplit, bool] | None:
    """The split from the Hugging Face hub (all of its splits are fetched; a missing test split is derived)."""
    try:
        loaded, revision = read_hub(spec.hub_id, progress=progress)
    except Exception as err:  # offline, unknown id, network: say what happened
        first = str(err).splitlines()[0] if str(err) else ""
        attempts.append(f"hub: {spec.hub_id} ({type(err).__name__}: {first})")
        return None
    resolved = _resolve_split(set(loaded), split)
    if resolved is None:
        attempts.append(f"hub: {spec.hub_id} (has splits {sorted(loaded)}, not '{split}')")
        return None
    wanted, derived = resolved
    identity = _derived({"kind": "hub", "hub_id": spec.hub_id, "revision": revision}, derived)
    return split_from_dataset(loaded[wanted], identity, f"hub:{spec.hub_id}@{revision}"), derived


def _not_found(spec: DatasetSpec, cfg: DataConfig, split: str, attempts: list[str]) -> DatasetError:
    cache_file = cache.cache_paths(spec.name, split)[0]
    lines = [f"cache: {cache_file} (missing)"]
    if mirror_root(cfg) is None:
        lines.append("mirror: not configured (HMLIB_DATA_DIR unset and data.data_dir is None)")
    lines += attempts
    if spec.hub_id is None:
        lines.append("hub: none (the dataset is a local folder)")
    elif not cfg.use_hub:
        lines.append(f"hub: {spec.hub_id} (not tried: data.use_hub is false)")
    fixes = ["set HMLIB_DATA_DIR (or data.data_dir) to a folder laid out as <dir>/<name>/{train,test}.parquet "
             "in the hub schema, e.g. ../shared/data"]
    if spec.hub_id is not None:
        fixes.append(f"or allow the Hugging Face hub to serve '{spec.hub_id}' (network access, HF_HUB_OFFLINE and "
                     "HF_DATASETS_OFFLINE unset, data.use_hub true)")
    note = f"\nnote: {HUB_ONLY[spec.name]}" if spec.name in HUB_ONLY else ""
    return DatasetError(f"cannot load dataset '{spec.name}' split '{split}'; looked in:\n  " + "\n  ".join(lines)
                        + "\nto fix: " + "; ".join(fixes) + note)


def _select(source: SourceSplit, split: str, derived: bool, cfg: DataConfig) -> np.ndarray:
    """Indices of the source rows that make up ``split`` after any derived split and subsample."""
    from hmlib.data.splits import stratified_split, stratified_subset

    indices = np.arange(source.labels.shape[0])
    if derived:
        keep, held = stratified_split(source.labels, cfg.test_fraction, cfg.split_seed)
        indices = held if split == "test" else keep
    if cfg.max_images_per_split is not None:
        indices = indices[stratified_subset(source.labels[indices], cfg.max_images_per_split, cfg.split_seed)]
    return indices


def load_split(name: str, split: str, cfg: DataConfig, *, rebuild: bool = False, progress: bool = True,
               num_workers: int | None = None) -> ImageSet:
    """A preprocessed split from the cache, else built from the local mirror, else from the hub (then cached).

    ``num_workers``: decoding processes for a build (None: one per core); the pixels do not depend on it.
    """
    spec = get_spec(name, cfg)
    manifest = None if rebuild else _read_manifest_or_none(name, split)
    local_state = local_source_state(spec, cfg, split, manifest.get("source") if manifest else None)
    if manifest is not None:
        derived = local_state[1] if local_state else manifest.get("settings", {}).get("derived_split") is not None
        reasons = cache.stale_reasons(manifest, preprocess_settings(spec, cfg, derived),
                                      local_state[0] if local_state else None)
        if not reasons:
            try:
                images, labels = cache.read_arrays(name, split, manifest)
                return ImageSet(name, split, images, labels, list(manifest["label_names"]), manifest["fingerprint"])
            except ArtifactError as err:
                print(f"[hmlib.data] {err}; rebuilding")
        else:
            print(f"[hmlib.data] cache of {name}/{split} is stale, rebuilding:\n  " + "\n  ".join(reasons))
    return _build(spec, split, cfg, progress, num_workers)


def _read_manifest_or_none(name: str, split: str) -> dict[str, Any] | None:
    try:
        return cache.read_manifest(name, split)
    except ArtifactError as err:
        print(f"[hmlib.data] {err}")
        return None


def open_source(spec: DatasetSpec, cfg: DataConfig, split: str, *, progress: bool = True
                ) -> tuple[SourceSplit, bool]:
    """``(source split, derived)`` from the local mirror / folder, else the hub; DatasetError naming every attempt."""
    attempts: list[str] = []
    opened = _open_local(spec, cfg, split, progress, attempts)
    if opened is None and spec.hub_id is not None and cfg.use_hub:
        opened = _open_hub(spec, split, progress, attempts)
    if opened is None:
        raise _not_found(spec, cfg, split, attempts)
    return opened


def _build(spec: DatasetSpec, split: str, cfg: DataConfig, progress: bool, num_workers: int | None) -> ImageSet:
    """Read the split from the first working source, preprocess the chosen images, write the cache."""
    source, derived = open_source(spec, cfg, split, progress=progress)
    start = time.perf_counter()
    indices = _select(source, split, derived, cfg)
    images = preprocess_images(source.take(indices), cfg.image_size, cfg.polarity, num_workers=num_workers,
                               progress=progress, desc=f"{spec.name}/{split}")
    labels = source.labels[indices]
    settings = preprocess_settings(spec, cfg, derived)
    fp = fingerprint(spec.name, split, comparable(source.identity), settings)
    manifest = {
        "name": spec.name, "split": split, "fingerprint": fp, "settings": settings, "source": source.identity,
        "location": source.location, "label_names": source.label_names, "num_images": int(labels.shape[0]),
        "class_counts": np.bincount(labels, minlength=len(source.label_names)).tolist(),
        "source_rows": int(source.labels.shape[0]),
    }
    cache.write_cache(spec.name, split, images, labels, manifest)
    if progress:
        print(f"[hmlib.data] {spec.name}/{split}: {labels.shape[0]} images from {source.location} "
              f"preprocessed in {time.perf_counter() - start:.1f} s -> {cache.cache_paths(spec.name, split)[0]}")
    return ImageSet(spec.name, split, images, labels, list(source.label_names), fp)
