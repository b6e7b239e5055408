"""Raw sources of a dataset split, read with Hugging Face ``datasets``: a local parquet mirror, an image folder, the hub.

A :class:`SourceSplit` exposes the labels at once and decodes nothing until :meth:`SourceSplit.take`
asks for the encoded images of chosen indices, so a subsample is drawn before any image is decoded.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from hmlib.artifacts import file_sha256
from hmlib.config import DataConfig
from hmlib.data.preprocess import describe_error
from hmlib.data.registry import DatasetError, DatasetSpec, repo_relative

IMAGE_NAMES = ("image", "img", "picture", "pixel_values", "png", "jpg")
LABEL_NAMES = ("label", "labels", "target", "targets", "class", "fine_label", "y")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


@dataclass
class SourceSplit:
    """One split of a source: labels, label names, where it came from, and lazy access to encoded images."""

    labels: np.ndarray  # int64 (n,)
    label_names: list[str]
    identity: dict[str, Any]  # what the cache compares: mirror file sha256 or hub id + revision
    location: str  # human-readable origin (path or hub id), recorded but not compared
    table: Any = field(repr=False)  # pyarrow Table or datasets.Dataset holding the image column
    image_column: str = "image"
    bad_rows: dict[int, str] = field(default_factory=dict)  # rows unusable before decoding (missing label...)

    def take(self, indices: np.ndarray) -> list[Any]:
        """Encoded images (bytes, path dicts or PIL images) at ``indices``, in that order."""
        import pyarrow as pa

        column = self.table.column(self.image_column).take(pa.array(np.asarray(indices, dtype=np.int64)))
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        if pa.types.is_struct(column.type):
            names = [column.type.field(i).name for i in range(column.type.num_fields)]
            data = column.field("bytes").to_pylist() if "bytes" in names else [None] * len(column)
            where = column.field("path").to_pylist() if "path" in names else [None] * len(column)
            return [b if b is not None else p for b, p in zip(data, where)]
        return column.to_pylist()


# ---------------------------------------------------------------------------------------------- locating


def mirror_root(cfg: DataConfig) -> Path | None:
    """The mirror folder: ``cfg.data_dir``, else ``$HMLIB_DATA_DIR``, else None (relative: to the repository)."""
    value = cfg.data_dir or os.environ.get("HMLIB_DATA_DIR")
    return repo_relative(value) if value else None


def local_folders(spec: DatasetSpec, cfg: DataConfig) -> list[Path]:
    """Local folders that may hold the dataset, in resolution order: mirror entry, then a custom local folder."""
    folders = []
    root = mirror_root(cfg)
    if root is not None:
        folders.append(root / spec.name)
    if spec.local_dir is not None:
        folders.append(spec.local_dir)
    return folders


def parquet_files(folder: Path) -> dict[str, list[Path]]:
    """``{split: files}`` of a folder in the mirror layout (``<split>.parquet`` or shards ``<split>-*.parquet``)."""
    if not folder.is_dir():
        return {}
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.parquet")):
        found.setdefault(path.stem.split("-")[0], []).append(path)
    return found


def image_folder_splits(folder: Path) -> set[str] | None:
    """Splits of an image folder (``train/``, ``test/`` ... holding class sub-folders), ``{"train"}`` for a flat
    ``<class>/*.png`` folder, or None when ``folder`` holds no images in class sub-folders."""
    if not folder.is_dir():
        return None
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.glob("*/*/*")):
        return {p.name for p in folder.iterdir() if p.is_dir()}
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.glob("*/*")):
        return {"train"}
    return None


def mirror_identity(files: list[Path], recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Source identity of a split's parquet file(s): sha256 of the file (of the files' hashes for shards).

    Hashes are reused from ``recorded`` (a cache manifest's source) while path, size and mtime match.
    """
    stats = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if recorded and recorded.get("stat") == stats and "sha256" in recorded and len(files) == 1:
        _SHA_MEMO[tuple(stats[0])] = recorded["sha256"]
    hashes = []
    for stat, path in zip(stats, files):
        if tuple(stat) not in _SHA_MEMO:
            _SHA_MEMO[tuple(stat)] = file_sha256(path)
        hashes.append(_SHA_MEMO[tuple(stat)])
    digest = hashes[0] if len(hashes) == 1 else hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    return {"kind": "file", "sha256": digest, "stat": stats if len(files) > 1 else stats[0]}


def folder_identity(folder: Path) -> dict[str, Any]:
    """Source identity of an image folder: sha256 over its relative file names and sizes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{path.stat().st_size}\n".encode())
    return {"kind": "image_folder", "sha256": digest.hexdigest()}


def comparable(identity: dict[str, Any]) -> dict[str, Any]:
    """The part of an identity that must match for a cache to be reused (not paths or timestamps)."""
    return {k: v for k, v in identity.items() if k not in ("stat", "path")}


# ---------------------------------------------------------------------------------------------- reading


@contextmanager
def _quiet(progress: bool, local: bool = False) -> Iterator[None]:
    """Without ``progress``: no progress bars and no hub retry warnings; ``local``: no ``datasets`` error log
    either (a failure is reported once, by us, naming the file)."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    was_disabled = datasets.utils.are_progress_bars_disabled()
    hub_level, datasets_level = hub_logging.get_verbosity(), datasets.logging.get_verbosity()
    if not progress:
        datasets.disable_progress_bars()
        hub_logging.set_verbosity_error()
    if local:
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        if not progress and not was_disabled:
            datasets.enable_progress_bars()
        hub_logging.set_verbosity(hub_level)
        datasets.logging.set_verbosity(datasets_level)


def _load_local(builder: str, progress: bool, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` of local files, held in memory; its arrow copy goes to a temporary folder
    (our own cache keeps the preprocessed arrays, so a second copy of the raw data would only take space)."""
    import datasets

    with _quiet(progress, local=True), tempfile.TemporaryDirectory(prefix="hmlib-hf-") as tmp:
        return datasets.load_dataset(builder, cache_dir=tmp, keep_in_memory=True, **kwargs)


def check_parquet(path: Path) -> None:
    """DatasetError naming ``path`` when it is not a readable parquet file (truncated, not parquet) or has no rows."""
    import pyarrow.parquet as pq

    try:
        num_rows = pq.read_metadata(path).num_rows
    except Exception as err:  # ArrowInvalid, OSError: the footer is missing or damaged
        raise DatasetError(f"{path} is not a readable parquet file ({describe_error(err)}); it is truncated or "
                           "corrupt: copy it again from its source, or remove it") from None
    if num_rows == 0:
        raise DatasetError(f"{path} holds no rows; fill it, or remove it")


def read_parquet(files: list[Path], *, progress: bool = True) -> Any:
    """The parquet file(s) of one split, in the hub schema -> ``datasets.Dataset`` (each file checked first)."""
    for path in files:
        check_parquet(path)
    return _load_local("parquet", progress, data_files={"train": [str(p) for p in files]}, split="train")


def read_image_folder(folder: Path, *, progress: bool = True) -> Any:
    """An image folder (``<class>/*.png`` or ``train|test/<class>/*.png``) -> ``datasets.DatasetDict``."""
    return _load_local("imagefolder", progress, data_dir=str(folder))


def offline_requested() -> bool:
    """Whether the environment asks for offline mode now (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE true)."""
    return any(os.environ.get(key, "").upper() in ("1", "ON", "YES", "TRUE")
               for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@contextmanager
def _offline_as_now() -> Iterator[None]:
    """Honour an offline mode set after ``datasets`` was imported: both libraries read the variables once, at
    import, and would otherwise retry an unreachable hub for about 25 s. The HF cache is still used offline."""
    import datasets
    from huggingface_hub import constants

    if not offline_requested():
        yield
        return
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


def read_hub(hub_id: str, *, progress: bool = True) -> tuple[Any, str]:
    """A hub dataset -> ``(datasets.DatasetDict, revision)``; revision is the commit sha or 'unknown'."""
    import datasets

    with _quiet(progress), _offline_as_now():  # downloads and arrow files go to the HF cache (HF_HOME), as usual
        loaded = datasets.load_dataset(hub_id)
        return loaded, hub_revision(hub_id)


def hub_revision(hub_id: str) -> str:
    """The hub's current commit sha for ``hub_id``, or 'unknown' when it cannot be asked."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_id).sha or "unknown"
    except Exception:  # offline, rate-limited, or no huggingface_hub: the cache records 'unknown'
        return "unknown"


def _pick(candidates: list[str], preferred: tuple[str, ...], what: str, columns: list[str], where: str) -> str:
    if len(candidates) == 1:
        return candidates[0]
    for name in preferred:
        if name in candidates:
            return name
    if not candidates:
        feature = "Image" if what == "image" else "ClassLabel"
        raise DatasetError(f"{where}: found no {what} column among {columns}; store the {what}s as a "
                           f"datasets.{feature} feature or in a column named one of {list(preferred)}")
    raise DatasetError(f"{where}: ambiguous {what} column, candidates {candidates}; rename the one to use to "
                       f"'{preferred[0]}'")


def detect_columns(features: Any, where: str) -> tuple[str, str]:
    """``(image_column, label_column)``: the Image / ClassLabel features, else conventional names."""
    import datasets

    columns = list(features)
    images = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    if not images:
        images = [k for k in columns if k.lower() in IMAGE_NAMES]
    labels = [k for k, f in features.items() if isinstance(f, datasets.ClassLabel)]
    if not labels:
        labels = [k for k in columns if k.lower() in LABEL_NAMES]
    return _pick(images, IMAGE_NAMES, "image", columns, where), _pick(labels, LABEL_NAMES, "label", columns, where)


def read_labels(column: Any, feature: Any) -> tuple[np.ndarray, list[str], dict[int, str]]:
    """``(labels, names, bad)`` of a label column: int64 labels (-1 where unusable), class names, and
    ``{row: reason}`` of rows whose label is missing or outside the classes."""
    import datasets
    import pyarrow as pa

    null = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if isinstance(feature, datasets.ClassLabel) or pa.types.is_integer(column.type):
        labels = column.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False).copy()
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        else:
            names = [str(i) for i in range(int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0)]
    else:  # string (or other) labels: sorted unique values become the classes
        raw = column.to_numpy(zero_copy_only=False)
        names_arr, inverse = np.unique(raw[~null].astype(str), return_inverse=True)
        names, labels = [str(n) for n in names_arr], np.full(null.shape[0], -1, dtype=np.int64)
        labels[~null] = inverse
    invalid = null | (labels < 0) | (labels >= len(names))
    bad = {int(r): "missing label" if null[r] else f"label {labels[r]} outside 0..{len(names) - 1}"
           for r in np.flatnonzero(invalid)}
    labels[invalid] = -1
    return labels, names, bad


def split_from_dataset(dataset: Any, identity: dict[str, Any], location: str) -> SourceSplit:
    """Wrap one ``datasets.Dataset`` split: detect columns, read labels and names, keep images encoded."""
    import datasets

    image_col, label_col = detect_columns(dataset.features, location)
    if isinstance(dataset.features[image_col], datasets.Image):
        dataset = dataset.cast_column(image_col, datasets.Image(decode=False))
    table = dataset.with_format("arrow")[:]  # pyarrow Table (honours any index mapping)
    if table.num_rows == 0:
        raise DatasetError(f"{location} holds no rows; fill it, or remove it")
    labels, names, bad = read_labels(table.column(label_col), dataset.features[label_col])
    return SourceSplit(labels=labels, label_names=names, identity=identity, location=location, table=table,
                       image_column=image_col, bad_rows=bad)
