"""The images ``hmlib cluster`` reads: a folder of image files, a parquet mirror folder (hub schema) or a hub id.

Every image goes through hmlib's own preprocessing (:func:`hmlib.data.preprocess.preprocess_image`, then
:func:`~hmlib.data.preprocess.normalise_polarity`), so the model sees what it saw in meta-training. Decoding
streams in chunks (over worker processes for large inputs) and keeps only the uint8 arrays.

Folder input: searched recursively in sorted order of relative path; hidden files and folders (a name starting
with ``.``) are left out. Only regular files (or links to them) are read: a named pipe, socket or device
(which would block or never end) and a broken link are *skipped* with their kind as the reason, never opened.
Every regular file is offered to Pillow whatever its extension. A file Pillow does not
recognise and whose extension is not an image format Pillow reads (``notes.txt``, ``labels.csv``) is *ignored*
(counted and listed, not an error); an image that fails to decode (truncated, corrupt, unreadable, or a file
with an image extension that is not an image) is *skipped* and listed with a one-line reason.

Parquet / hub input: the split ``split`` if given, else ``test`` if present, else ``train``, else the only one.
Names are row indices within that split.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from hmlib.cluster.decode import chunks, collect, one_line, worker_count
from hmlib.config import DataConfig
from hmlib.data.loading import preprocess_settings
from hmlib.data.preprocess import normalise_polarity
from hmlib.data.registry import DatasetSpec
from hmlib.data.sources import IMAGE_NAMES, SourceSplit, parquet_files, read_hub, read_parquet
from hmlib.errors import HmlibError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ClusterInputError(HmlibError, ValueError):
    """The input to ``hmlib cluster`` cannot be used; the message is one line saying why and what to do."""


@dataclass
class ImageCollection:
    """Preprocessed images to cluster, their names, and what was left out."""

    images: np.ndarray  # uint8 (n, size, size), ink bright on dark
    names: list[str]  # relative paths (folder) or row indices (parquet / hub), in the order of ``images``
    source: str  # 'folder' | 'parquet' | 'hub'
    location: str  # the resolved folder / file(s) or hub id it came from
    preprocessing: dict[str, Any]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, one-line reason): images that failed
    ignored: list[str] = field(default_factory=list)  # files that are not images (folder input)
    split: str | None = None  # parquet / hub split used
    inverted: int = 0  # images whose polarity was flipped (dark ink on a light ground)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def input_name(path: str | Path) -> str:
    """A file-name-safe name for the input (folder name, parquet stem or hub id with '/' as '__')."""
    text = str(path)
    if not Path(text).expanduser().exists() and HUB_ID.match(text):
        name = text.replace("/", "__")
    else:
        resolved = Path(text).expanduser().resolve()
        name = resolved.stem if resolved.is_file() else resolved.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "input"


def load_images(path: str | Path, *, progress: bool = True, limit: int | None = None, split: str | None = None,
                cfg: DataConfig | None = None, num_workers: int | None = None) -> ImageCollection:
    """Read and preprocess every image of a folder, parquet mirror folder/file or hub id (see the module doc)."""
    cfg = cfg or DataConfig()
    if limit is not None and limit < 1:
        raise ClusterInputError(f"limit must be at least 1, got {limit}")
    kind = input_kind(path)
    if kind == "hub":
        return _from_hub(str(path), split, limit, cfg, progress)
    local = Path(path).expanduser().resolve()
    if kind == "parquet":
        files = {local.stem.split("-")[0]: [local]} if local.is_file() else parquet_files(local)
        return _from_parquet(local, files, split, limit, cfg, progress)
    if split is not None:
        raise ClusterInputError(f"--split applies to parquet or hub input; {local} holds no *.parquet files")
    return _from_folder(local, limit, cfg, progress, num_workers)


def input_kind(path: str | Path) -> str:
    """What PATH is, without decoding anything: 'folder', 'parquet' (folder or file) or 'hub' (an 'org/name' id)."""
    text = str(path)
    local = Path(text).expanduser()
    if not local.exists():
        if HUB_ID.match(text):
            return "hub"
        raise ClusterInputError(f"{text} does not exist (expected a folder of images, a parquet mirror folder "
                                "or a hub id such as 'org/name')")
    if local.is_file():
        if local.suffix.lower() == ".parquet":
            return "parquet"
        raise ClusterInputError(f"{local.resolve()} is a file; pass the folder that holds the images")
    return "parquet" if parquet_files(local.resolve()) else "folder"


# ---------------------------------------------------------------------------------------------- folders


NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path) -> str | None:
    """Why ``path`` is not read (a pipe, socket, device or broken link: opening one can block forever), else None."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to an image is read, a link to a pipe is not
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "vanished while the folder was listed"
    except OSError as err:
        return one_line(err)
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in NOT_REGULAR if test(mode)), "not a regular file")
    return f"not a regular file ({kind}); not read"


def list_files(folder: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """``(files, skipped)``: relative posix paths of the non-hidden regular files under ``folder``, sorted, and
    ``(path, reason)`` for unreadable folders and entries that are not regular files (pipes, sockets, devices).
    Links to folders are followed, each folder listed once: a link back to a folder already listed (a loop, or a
    second way into it) is skipped and listed."""
    found: list[str] = []
    errors: list[tuple[str, str]] = []
    seen = {os.path.realpath(folder)}

    def on_error(err: OSError) -> None:
        where = Path(err.filename).relative_to(folder).as_posix() if err.filename else "."
        errors.append((where + "/", one_line(err)))

    for root, dirs, names in os.walk(folder, onerror=on_error, followlinks=True):
        base = Path(root).relative_to(folder)
        kept = []
        for name in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, name))
            if real in seen:
                errors.append(((base / name).as_posix() + "/", "a link to a folder listed already; not read twice"))
            else:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept
        for name in names:
            if name.startswith("."):
                continue
            reason = _not_regular(Path(root) / name)
            if reason is None:
                found.append((base / name).as_posix())
            else:
                errors.append(((base / name).as_posix(), reason))
    return sorted(found), sorted(errors)


def _from_folder(folder: Path, limit: int | None, cfg: DataConfig, progress: bool,
                 num_workers: int | None) -> ImageCollection:
    files, unreadable = list_files(folder)
    if not files and not unreadable:
        raise ClusterInputError(f"{folder} is empty: no files to cluster (hidden files are left out)")
    jobs = (("files", [(files[i], str(folder / files[i])) for i in part], cfg.image_size)
            for part in chunks(len(files)))
    total = len(files) if limit is None else min(len(files), limit)
    images, names, skipped, ignored = collect(jobs, total, limit, worker_count(num_workers, len(files)), progress,
                                               "decode", cfg.image_size)
    skipped = unreadable + skipped
    if not names:
        mirrored = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and parquet_files(p)]
        if mirrored:
            raise ClusterInputError(f"{folder} is a mirror folder holding the datasets {mirrored}; pass one of them, "
                                    f"e.g. {folder / mirrored[0]}")
        first = f"; first skipped: {skipped[0][0]} ({skipped[0][1]})" if skipped else ""
        raise ClusterInputError(f"{folder} holds no images Pillow can read ({len(files)} files: {len(ignored)} not "
                                f"images, {len(skipped)} unreadable{first})")
    spec = DatasetSpec(name=folder.name, local_dir=folder)
    return _finish(images, names, "folder", str(folder), spec, cfg, skipped, ignored, None)


# ---------------------------------------------------------------------------------------------- tables


def choose_split(available: Iterable[str], split: str | None, where: str) -> str:
    """The split to read: ``split`` if given, else 'test', else 'train', else the only one."""
    available = sorted(available)
    if split is not None:
        if split not in available:
            raise ClusterInputError(f"{where} has splits {available}, not '{split}'")
        return split
    for preferred in ("test", "train"):
        if preferred in available:
            return preferred
    if len(available) == 1:
        return available[0]
    raise ClusterInputError(f"{where} has splits {available}; choose one with --split")


def image_column(features: Any, where: str) -> str:
    """The column holding the images: the one ``datasets.Image`` feature, else a conventional name."""
    import datasets

    candidates = [k for k, f in features.items() if isinstance(f, datasets.Image)]
    candidates = candidates or [k for k in features if k.lower() in IMAGE_NAMES]
    if len(candidates) == 1:
        return candidates[0]
    preferred = [name for name in IMAGE_NAMES if name in candidates]
    if preferred:
        return preferred[0]
    raise ClusterInputError(f"{where}: no image column among {list(features)} (expected a datasets.Image feature "
                            f"or a column named one of {list(IMAGE_NAMES)})")


def _from_table(dataset: Any, source: str, location: str, split: str, spec: DatasetSpec, limit: int | None,
                cfg: DataConfig, progress: bool) -> ImageCollection:
    """Decode the image column of one ``datasets.Dataset`` split, chunk by chunk (rows stay encoded until then)."""
    import datasets

    column = image_column(dataset.features, location)
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    rows = len(dataset)
    if rows == 0:
        raise ClusterInputError(f"{location} has no rows in split '{split}'")
    # SourceSplit.take reads encoded images (bytes or path structs) from the arrow table; labels are not used.
    table = SourceSplit(np.zeros(rows, dtype=np.int64), [], {}, location, dataset.with_format("arrow")[:], column)
    jobs = (("items", list(zip(map(str, part), table.take(np.asarray(part)))), cfg.image_size)
            for part in chunks(rows))  # lazy: rows are taken from the table chunk by chunk
    total = rows if limit is None else min(rows, limit)
    images, names, skipped, _ = collect(jobs, total, limit, 1, progress, f"decode {split}", cfg.image_size)
    if not names:
        raise ClusterInputError(f"no image of {location} split '{split}' could be decoded (first: row "
                                f"{skipped[0][0]}: {skipped[0][1]})")
    return _finish(images, names, source, location, spec, cfg, skipped, [], split)


def _from_parquet(where: Path, files: dict[str, list[Path]], split: str | None, limit: int | None, cfg: DataConfig,
                  progress: bool) -> ImageCollection:
    chosen = choose_split(files, split, str(where))
    try:
        dataset = read_parquet(files[chosen], progress=progress)
    except Exception as err:  # corrupt or foreign parquet file
        raise ClusterInputError(f"cannot read {files[chosen][0]} as a parquet split ({one_line(err)})") from err
    location = str(files[chosen][0]) if len(files[chosen]) == 1 else f"{where}/{chosen}-*.parquet"
    name = where.stem if where.is_file() else where.name
    return _from_table(dataset, "parquet", location, chosen, DatasetSpec(name=name, local_dir=where), limit, cfg,
                       progress)


def _from_hub(hub_id: str, split: str | None, limit: int | None, cfg: DataConfig, progress: bool) -> ImageCollection:
    try:
        loaded, revision = read_hub(hub_id, progress=progress)
    except Exception as err:  # offline, unknown id, network
        raise ClusterInputError(
            f"{hub_id} is not a local path and the Hugging Face hub could not load it as a dataset id "
            f"({one_line(err)}); pass an existing folder, or allow network access (HF_HUB_OFFLINE and "
            "HF_DATASETS_OFFLINE unset)") from err
    chosen = choose_split(loaded, split, f"hub dataset {hub_id}")
    spec = DatasetSpec(name=input_name(hub_id), hub_id=hub_id)
    return _from_table(loaded[chosen], "hub", f"hub:{hub_id}@{revision}", chosen, spec, limit, cfg, progress)


def _finish(images: np.ndarray, names: list[str], source: str, location: str, spec: DatasetSpec, cfg: DataConfig,
            skipped: list, ignored: list, split: str | None) -> ImageCollection:
    """Apply the batch polarity step and record the preprocessing settings."""
    inverted = 0
    if cfg.polarity == "auto":
        images, flipped = normalise_polarity(images)
        inverted = int(flipped.sum())
    settings = preprocess_settings(spec, cfg, derived=False)
    return ImageCollection(images=images, names=names, source=source, location=location, preprocessing=settings,
                           skipped=skipped, ignored=ignored, split=split, inverted=inverted)


def export_image_folder(images: np.ndarray, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write uint8 images (N, H, W) as ``folder/00000.png ...`` (sorted order = row order): an unlabeled folder
    of the kind ``hmlib cluster`` reads, for demonstrations and benchmarks."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ClusterInputError(f"{folder} exists and is not empty; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(images))))
    for i, image in enumerate(np.asarray(images, dtype=np.uint8)):
        Image.fromarray(image, mode="L").save(folder / f"{i:0{width}d}.png")
    return folder
