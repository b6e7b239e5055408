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
from hmlib.data.corruptions import get_corruption, shift_seed
from hmlib.data.preprocess import PREPROCESS_VERSION, describe_error, preprocess_batch
from hmlib.data.registry import HUB_ONLY, DatasetError, DatasetSpec, get_spec
from hmlib.data.sources import (SourceSplit, comparable, folder_identity, image_folder_splits, local_folders,
                                mirror_identity, mirror_root, parquet_files, read_hub, read_image_folder,
                                read_parquet, split_from_dataset)
from hmlib.data.splits import stratified_split, stratified_subset

MAX_SKIPPED_FRACTION = 0.5  # more unusable rows than this: the file is broken, not a few of its rows
MANIFEST_REASONS = 20  # the manifest lists every skipped row, and the reasons of the first ones


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


def _missing_split(spec: DatasetSpec, folder: Path, parquet: bool, available: set[str], split: str) -> str:
    """The one-line error for a local folder that holds the dataset but not ``split``."""
    wanted = folder / f"{split}.parquet" if parquet else folder / split
    what = wanted.name if parquet else f"{split}/<class>/ image folders"
    hint = " (a missing test split is carved out of train, but train itself must be there)" if split == "train" else ""
    return (f"dataset '{spec.name}': {folder} holds the split(s) {', '.join(sorted(available))} but no {what}; "
            f"add {wanted}{hint}")


def _open_local(spec: DatasetSpec, cfg: DataConfig, split: str, progress: bool, attempts: list[str]
                ) -> tuple[SourceSplit, bool] | None:
    """The split from the first local folder holding the dataset (mirror entry, then a custom local folder).

    A folder that holds the dataset is taken as the source: a missing split, a corrupt file or a missing column
    there is a one-line DatasetError naming the file, not a silent fall-back to the next source.
    """
    for folder in local_folders(spec, cfg):
        files, available = _folder_splits(folder)
        if not available:
            root = mirror_root(cfg)
            if root is not None and folder == root / spec.name and not root.is_dir():
                origin = "data.data_dir" if cfg.data_dir else "HMLIB_DATA_DIR"
                attempts.append(f"mirror: {root} (from {origin}) does not exist")
            elif not folder.is_dir():
                attempts.append(f"local: {folder} (no such folder)")
            else:
                attempts.append(f"local: {folder} (no <split>.parquet files or class image folders there)")
            continue
        resolved = _resolve_split(available, split)
        if resolved is None:
            raise DatasetError(_missing_split(spec, folder, bool(files), available, split))
        wanted, derived = resolved
        location = str(folder)
        if files:
            location = str(files[wanted][0]) if len(files[wanted]) == 1 else f"{folder}/{wanted}-*.parquet"
        try:
            if files:
                dataset, identity = read_parquet(files[wanted], progress=progress), mirror_identity(files[wanted])
            else:
                dataset = read_image_folder(folder, progress=progress)[wanted]
                identity = folder_identity(folder)
            return split_from_dataset(dataset, _derived(identity, derived), location), derived
        except DatasetError:
            raise
        except Exception as err:  # corrupt data pages, unreadable folder: say which file, hide the traceback
            raise DatasetError(f"dataset '{spec.name}': cannot read {location} ({describe_error(err, root=True)}); "
                               "it is corrupt or not in the hub schema: copy it again from its source, or remove "
                               "it") from None
    return None


def _open_hub(spec: DatasetSpec, split: str, progress: bool, attempts: list[str]) -> tuple[SourceSplit, bool] | None:
    """The split from the Hugging Face hub (all of its splits are fetched; a missing test split is derived)."""
    try:
        loaded, revision = read_hub(spec.hub_id, progress=progress)
    except Exception as err:  # offline, unknown id, network: say what happened
        attempts.append(f"hub: {spec.hub_id} ({describe_error(err)})")
        return None
    resolved = _resolve_split(set(loaded), split)
    if resolved is None:
        attempts.append(f"hub: {spec.hub_id} (has splits {sorted(loaded)}, not '{split}')")
        return None
    wanted, derived = resolved
    identity = _derived({"kind": "hub", "hub_id": spec.hub_id, "revision": revision}, derived)
    location = f"hub:{spec.hub_id}@{revision}"
    try:
        return split_from_dataset(loaded[wanted], identity, location), derived
    except DatasetError:
        raise
    except Exception as err:  # an unexpected schema
        raise DatasetError(f"dataset '{spec.name}': cannot read split '{wanted}' of {location} "
                           f"({describe_error(err, root=True)})") from None


def _not_found(spec: DatasetSpec, cfg: DataConfig, split: str, attempts: list[str], cache_state: str | None
               ) -> DatasetError:
    arrays_path, manifest_path = cache.cache_paths(spec.name, split)
    corrupt = cache_state is not None and cache_state.startswith("corrupt")
    lines = [f"cache: {arrays_path} ({cache_state or 'missing'})"]
    if mirror_root(cfg) is None:
        lines.append("mirror: not configured (HMLIB_DATA_DIR unset and data.data_dir is None; make sets "
                     "HMLIB_DATA_DIR to ../shared/data beside the repository where that folder exists)")
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
    if corrupt:
        fixes.append(f"the corrupt cache is then rebuilt (or delete {arrays_path} and {manifest_path} yourself)")
    head = f"cannot load dataset '{spec.name}' split '{split}'"
    head += ": its cache is corrupt and no source can rebuild it" if corrupt else ""
    note = f"\nnote: {HUB_ONLY[spec.name]}" if spec.name in HUB_ONLY else ""
    return DatasetError(f"{head}; looked in:\n  " + "\n  ".join(lines) + "\nto fix: " + "; ".join(fixes) + note)


def _select(source: SourceSplit, split: str, derived: bool, cfg: DataConfig) -> np.ndarray:
    """Indices of the source rows that make up ``split`` after any derived split and subsample (rows without a
    usable label are left out first)."""
    indices = np.flatnonzero(source.labels >= 0)
    if derived and indices.size:
        keep, held = stratified_split(source.labels[indices], cfg.test_fraction, cfg.split_seed)
        indices = indices[held if split == "test" else keep]
    if cfg.max_images_per_split is not None:
        indices = indices[stratified_subset(source.labels[indices], cfg.max_images_per_split, cfg.split_seed)]
    return indices


def _cached_manifest(name: str, split: str, rebuild: bool) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest, cache state)`` of a cached split: None when missing, unreadable (said) or ``rebuild``."""
    if rebuild:
        return None, None
    try:
        return cache.read_manifest(name, split), None
    except ArtifactError as err:
        print(f"[hmlib.data] {err}; rebuilding")
        return None, f"corrupt: {err}"


def _reuse(name: str, split: str, manifest: dict[str, Any], settings: dict[str, Any],
           identity: dict[str, Any] | None) -> tuple[ImageSet | None, str | None]:
    """``(the cached split, None)`` when its settings and source match and its arrays verify, else ``(None, why)``
    (said in one message)."""
    reasons = cache.stale_reasons(manifest, settings, identity)
    if reasons:
        print(f"[hmlib.data] cache of {name}/{split} is stale, rebuilding:\n  " + "\n  ".join(reasons))
        return None, "stale: " + "; ".join(reasons)
    try:
        images, labels = cache.read_arrays(name, split, manifest)
    except ArtifactError as err:
        print(f"[hmlib.data] {err}; rebuilding from its source")
        return None, f"corrupt: {err}"
    return ImageSet(name, split, images, labels, list(manifest["label_names"]), manifest["fingerprint"]), None


def load_split(name: str, split: str, cfg: DataConfig, *, rebuild: bool = False, progress: bool = True,
               num_workers: int | None = None) -> ImageSet:
    """A preprocessed split from the cache, else built from the local mirror, else from the hub (then cached).

    A cache is used only when its settings, source and content hash match; otherwise it is rebuilt with a
    one-line message. ``num_workers``: decoding processes for a build (None: one per core). A shifted dataset
    ('base+corruption') is its base's split with the corruption applied, cached the same way.
    """
    spec = get_spec(name, cfg)
    if spec.corruption is not None:
        return _load_shifted(spec, split, cfg, rebuild, progress, num_workers)
    manifest, cache_state = _cached_manifest(name, split, rebuild)
    local_state = local_source_state(spec, cfg, split, manifest.get("source") if manifest else None)
    if manifest is not None:
        derived = local_state[1] if local_state else manifest.get("settings", {}).get("derived_split") is not None
        cached, cache_state = _reuse(name, split, manifest, preprocess_settings(spec, cfg, derived),
                                     local_state[0] if local_state else None)
        if cached is not None:
            return cached
    return _build(spec, split, cfg, progress, num_workers, cache_state)


def _load_shifted(spec: DatasetSpec, split: str, cfg: DataConfig, rebuild: bool, progress: bool,
                  num_workers: int | None) -> ImageSet:
    """The base dataset's split (loaded as usual) with the corruption applied, seeded by (corruption, base, split);
    cached under the shifted name and rebuilt when the base, the corruption or its severity changes (``rebuild``
    rebuilds the shifted cache, not the base's)."""
    base = load_split(spec.base, split, cfg, progress=progress, num_workers=num_workers)
    corruption = get_corruption(spec.corruption)
    settings = {**corruption.record(), "base": base.name, "base_fingerprint": base.fingerprint,
                "seed": shift_seed(corruption.name, base.name, split)}
    manifest, _ = _cached_manifest(spec.name, split, rebuild)
    if manifest is not None:
        cached, _ = _reuse(spec.name, split, manifest, settings, None)
        if cached is not None:
            return cached
    start = time.perf_counter()
    images = corruption(base.images, np.random.default_rng(settings["seed"]))
    fp = fingerprint(spec.name, split, settings)
    manifest = {"name": spec.name, "split": split, "fingerprint": fp, "settings": settings,
                "location": f"{base.name}/{split} + {corruption.name}", "label_names": base.label_names,
                "num_images": len(base), "class_counts": base.class_counts().tolist()}
    arrays_path = cache.write_cache(spec.name, split, images, base.labels, manifest)
    if progress:
        print(f"[hmlib.data] {spec.name}/{split}: {len(base)} images of {base.name}/{split} corrupted by "
              f"{corruption.name} in {time.perf_counter() - start:.1f} s -> {arrays_path}")
    return ImageSet(spec.name, split, images, base.labels, list(base.label_names), fp)


def open_source(spec: DatasetSpec, cfg: DataConfig, split: str, *, progress: bool = True,
                cache_state: str | None = None) -> tuple[SourceSplit, bool]:
    """``(source split, derived)`` from the local mirror / folder, else the hub; DatasetError naming every attempt
    (``cache_state``: why the cache was not used, for that message)."""
    attempts: list[str] = []
    opened = _open_local(spec, cfg, split, progress, attempts)
    if opened is None and spec.hub_id is not None and cfg.use_hub:
        opened = _open_hub(spec, split, progress, attempts)
    if opened is None:
        raise _not_found(spec, cfg, split, attempts, cache_state)
    return opened


def _rows_text(skipped: dict[int, str], shown: int = 5) -> str:
    """'rows 3, 17 (row 3: reason)' for the first ``shown`` skipped rows."""
    rows = sorted(skipped)
    if len(rows) == 1:
        return f"row {rows[0]} ({skipped[rows[0]]})"
    listed = ", ".join(map(str, rows[:shown])) + (f", ... ({len(rows) - shown} more)" if len(rows) > shown else "")
    return f"rows {listed} (row {rows[0]}: {skipped[rows[0]]})"


def _check_rows(name: str, split: str, location: str, skipped: dict[int, str], considered: int,
               labels: np.ndarray, label_names: list[str], share: float | None = None) -> None:
    """DatasetError when the rows left after skipping cannot make a usable split: none left, more than
    ``MAX_SKIPPED_FRACTION`` of them unusable (``share``; default: the skipped among ``considered``), or fewer than
    two classes."""
    where = f"dataset '{name}' split '{split}'"
    share = len(skipped) / max(considered, 1) if share is None else share
    if skipped and (labels.shape[0] == 0 or share > MAX_SKIPPED_FRACTION):
        amount = "none" if labels.shape[0] == 0 else f"only {labels.shape[0]}"
        raise DatasetError(f"{where}: {amount} of the {considered} rows of {location} can be used; "
                           f"skipped {_rows_text(skipped)}; fix or replace the file (is it the right image and "
                           "label column?)")
    present = np.flatnonzero(np.bincount(labels, minlength=len(label_names)))
    if present.size < 2:
        which = f"class '{label_names[present[0]]}'" if present.size else "no class"
        after = f" after skipping {len(skipped)} unusable rows" if skipped else ""
        raise DatasetError(f"{where}: the {labels.shape[0]} images of {location} hold only {which}{after}; "
                           "clustering needs at least 2 classes (check the label column, or use another dataset)")


def _build(spec: DatasetSpec, split: str, cfg: DataConfig, progress: bool, num_workers: int | None,
           cache_state: str | None = None) -> ImageSet:
    """Read the split from the first working source, preprocess the chosen images (skipping undecodable rows,
    listed in the manifest), check that a usable split is left, write the cache."""
    source, derived = open_source(spec, cfg, split, progress=progress, cache_state=cache_state)
    start = time.perf_counter()
    indices = _select(source, split, derived, cfg)
    images, failed = preprocess_batch(source.take(indices), cfg.image_size, cfg.polarity, num_workers=num_workers,
                                      progress=progress, desc=f"{spec.name}/{split}")
    skipped = {**source.bad_rows, **{int(indices[p]): reason for p, reason in failed.items()}}
    chosen = indices.shape[0]
    if failed:
        indices = np.delete(indices, sorted(failed))
    labels = source.labels[indices]
    considered = indices.shape[0] + len(skipped)
    share = None
    if cfg.max_images_per_split is not None:  # rows without a label are left out of the whole source before the
        total = int(source.labels.shape[0])   # sample is drawn, undecodable ones are found in the sample only
        considered, label_share = total, len(source.bad_rows) / max(total, 1)
        share = label_share + (1 - label_share) * len(failed) / max(chosen, 1)
    _check_rows(spec.name, split, source.location, skipped, considered, labels, source.label_names, share)
    settings = preprocess_settings(spec, cfg, derived)
    fp = fingerprint(spec.name, split, comparable(source.identity), settings)
    rows = sorted(skipped)
    manifest = {
        "name": spec.name, "split": split, "fingerprint": fp, "settings": settings, "source": source.identity,
        "location": source.location, "label_names": source.label_names, "num_images": int(labels.shape[0]),
        "class_counts": np.bincount(labels, minlength=len(source.label_names)).tolist(),
        "source_rows": int(source.labels.shape[0]), "skipped_rows": rows,
        "skipped_reasons": {str(r): skipped[r] for r in rows[:MANIFEST_REASONS]},
    }
    arrays_path = cache.write_cache(spec.name, split, images, labels, manifest)
    if skipped:
        print(f"[hmlib.data] warning: {spec.name}/{split}: skipped {len(skipped)} of {considered} rows of "
              f"{source.location} that cannot be used: {_rows_text(skipped)}; all are listed in "
              f"{arrays_path.with_suffix('.json')}")
    if progress:
        print(f"[hmlib.data] {spec.name}/{split}: {labels.shape[0]} images from {source.location} "
              f"preprocessed in {time.perf_counter() - start:.1f} s -> {arrays_path}")
    return ImageSet(spec.name, split, images, labels, list(source.label_names), fp)
