"""Streaming, fault-tolerant decoding for ``hmlib cluster``: chunks of files or encoded rows -> uint8 arrays.

Each item goes through :func:`hmlib.data.preprocess.preprocess_image`; an item that fails is reported with a
one-line reason instead of stopping the run. Chunks run in order (over worker processes when there are many),
with few in flight, so memory holds the encoded chunk being decoded plus the small arrays kept so far.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from hmlib.data.preprocess import preprocess_image

CHUNK = 512  # items per decoding job; also the granularity of the progress bar
Job = tuple[str, list[tuple[str, Any]], int]  # ('files' | 'items', [(name, path or encoded image)], image size)


def image_extensions() -> set[str]:
    """Lower-case file extensions of every format Pillow can open."""
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def one_line(err: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _decode_file(path: Path, extensions: set[str], image_size: int) -> tuple[str, Any]:
    """``('ok', array)``, ``('ignored', None)`` for a non-image file or ``('skipped', reason)``."""
    try:
        with Image.open(path) as img:
            return "ok", preprocess_image(img, image_size)
    except UnidentifiedImageError:
        if path.suffix.lower() in extensions:
            return "skipped", f"not a readable {path.suffix.lower()} image (Pillow cannot identify it)"
        return "ignored", None
    except Exception as err:  # truncated, corrupt, unreadable, decompression bomb: skip it, keep going
        return "skipped", one_line(err)


def _decode_chunk(job: Job) -> tuple[np.ndarray, list[tuple[str, str, str]]]:
    """Decode one chunk: ``(ok images, outcomes in order)``; outcomes are ``(kind, name, reason)``."""
    kind, items, image_size = job
    extensions = image_extensions()
    arrays, outcomes = [], []
    for name, item in items:
        if kind == "files":
            status, value = _decode_file(Path(item), extensions, image_size)
        else:
            try:
                status, value = "ok", preprocess_image(item, image_size)
            except Exception as err:  # a corrupt row: skip it, keep going
                status, value = "skipped", one_line(err)
        if status == "ok":
            arrays.append(value)
        outcomes.append((status, name, value if status == "skipped" else ""))
    stacked = np.stack(arrays) if arrays else np.empty((0, image_size, image_size), dtype=np.uint8)
    return stacked, outcomes


def _run_jobs(jobs: Iterable[Job], num_workers: int) -> Iterator[tuple[np.ndarray, list]]:
    """Results of ``_decode_chunk`` in order; with workers, at most ``2 * num_workers`` chunks in flight."""
    if num_workers <= 1:
        yield from map(_decode_chunk, jobs)
        return
    with ProcessPoolExecutor(max_workers=num_workers) as pool:
        pending: list = []
        try:
            for job in jobs:
                pending.append(pool.submit(_decode_chunk, job))
                if len(pending) >= 2 * num_workers:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:  # stopped early (limit reached) or failed: drop the chunks not started yet
            for future in pending:
                future.cancel()


def collect(jobs: Iterable[Job], total: int, limit: int | None, num_workers: int, progress: bool, desc: str,
            image_size: int) -> tuple[np.ndarray, list[str], list, list]:
    """Decode chunk by chunk, stopping after ``limit`` images: ``(images, names, skipped, ignored)``."""
    parts, names, skipped, ignored = [], [], [], []
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    results = _run_jobs(jobs, num_workers)
    try:
        for images, outcomes in results:
            taken = 0
            for status, name, reason in outcomes:
                if limit is not None and len(names) >= limit:
                    break
                if status == "ok":
                    names.append(name)
                    taken += 1
                elif status == "skipped":
                    skipped.append((name, reason))
                else:
                    ignored.append(name)
                bar.update(1)
            parts.append(images[:taken])
            if limit is not None and len(names) >= limit:
                break
    finally:
        results.close()  # shuts the worker pool down when stopping early
        bar.close()
    images = np.concatenate(parts) if parts else np.empty((0, image_size, image_size), dtype=np.uint8)
    return images, names, skipped, ignored


def chunks(count: int) -> Iterator[range]:
    """Consecutive index ranges of at most ``CHUNK`` items covering ``range(count)``."""
    return (range(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK))


def worker_count(num_workers: int | None, total: int) -> int:
    """Decoding processes for ``total`` items: ``num_workers`` (None: a core each, up to 8), one per chunk at most."""
    if num_workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        num_workers = min(cores, 8)
    return max(1, min(num_workers, -(-total // CHUNK)))
