"""The preprocessed-image cache: ``data_cache/images/<dataset>/<split>.npz`` plus a JSON manifest.

The manifest records the source identity (mirror file sha256, image-folder digest or hub id + revision),
every preprocessing setting, the rows skipped as undecodable and a sha256 of the cached arrays, which every
read verifies (a cache whose rows or pixels were changed is never used); it is written last, so a cache
without one is incomplete.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from hmlib import paths
from hmlib.artifacts import ArtifactError, atomic_path, read_json, write_json
from hmlib.data.registry import check_name
from hmlib.data.sources import comparable

CACHE_SCHEMA = 2  # 2: the manifest records content_sha256 (caches of schema 1 have none and are rebuilt)


def cache_paths(name: str, split: str) -> tuple[Path, Path]:
    """``(arrays.npz, manifest.json)`` for one dataset split (both names checked: they become file names)."""
    folder = paths.cache_dir() / "images" / check_name(name)
    split = check_name(split, "split name", shifted=False)
    return folder / f"{split}.npz", folder / f"{split}.json"


def content_sha256(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the arrays' dtypes, shapes and bytes (images, then labels)."""
    digest = hashlib.sha256()
    for array in (images, labels):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}\n".encode())
        digest.update(array.reshape(-1).view(np.uint8).data if array.size else b"")
    return digest.hexdigest()


def write_cache(name: str, split: str, images: np.ndarray, labels: np.ndarray, manifest: dict[str, Any]) -> Path:
    """Write arrays, then the manifest (with the arrays' content hash), each atomically; returns the arrays' path."""
    arrays_path, manifest_path = cache_paths(name, split)
    with atomic_path(arrays_path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append '.npz' to a bare name
            np.savez(fh, images=images, labels=labels, fingerprint=np.array(manifest["fingerprint"]))
    write_json(manifest_path, {"schema": CACHE_SCHEMA, **manifest, "content_sha256": content_sha256(images, labels)})
    return arrays_path


def read_manifest(name: str, split: str) -> dict[str, Any] | None:
    """The manifest of a cached split, or None when there is no complete cache (ArtifactError when unreadable)."""
    arrays_path, manifest_path = cache_paths(name, split)
    if not (arrays_path.is_file() and manifest_path.is_file()):
        return None
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path} is corrupt (a JSON {type(manifest).__name__}, not an object)")
    return manifest


def read_arrays(name: str, split: str, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a cached split, checked against its manifest (fingerprint, counts, content hash)."""
    arrays_path, _ = cache_paths(name, split)
    try:
        with np.load(arrays_path, allow_pickle=False) as data:
            images, labels, stored = data["images"], data["labels"], str(data["fingerprint"])
    except Exception as err:  # truncated or foreign file
        raise ArtifactError(f"cache {arrays_path} is corrupt ({type(err).__name__}: {err})") from err
    if stored != manifest.get("fingerprint"):
        raise ArtifactError(f"cache {arrays_path} does not belong to its manifest (fingerprint {stored} vs "
                            f"{manifest.get('fingerprint')})")
    if images.shape[0] != labels.shape[0] or images.shape[0] != manifest.get("num_images"):
        raise ArtifactError(f"cache {arrays_path} holds {images.shape[0]} images and {labels.shape[0]} labels, "
                            f"its manifest says {manifest.get('num_images')}")
    recorded, actual = manifest.get("content_sha256"), content_sha256(images, labels)
    if recorded != actual:
        raise ArtifactError(f"cache {arrays_path} is corrupt: its content hash {actual[:12]}... differs from the "
                            f"{recorded[:12] + '...' if isinstance(recorded, str) else 'missing'} its manifest "
                            "records (rows or pixels were changed after it was written)")
    return images, labels


def stale_reasons(manifest: dict[str, Any], settings: dict[str, Any], identity: dict[str, Any] | None) -> list[str]:
    """Why a cache cannot be reused: another schema, differing settings, or a source other than the recorded one."""
    reasons = []
    if manifest.get("schema") != CACHE_SCHEMA:
        old = " (an older cache, without a content hash)" if manifest.get("schema") == 1 else ""
        reasons.append(f"cache schema {manifest.get('schema')} != {CACHE_SCHEMA}{old}")
    recorded = manifest.get("settings", {})
    for key in sorted(set(recorded) | set(settings)):
        if recorded.get(key, "<absent>") != settings.get(key, "<absent>"):
            reasons.append(f"{key}: cached {recorded.get(key, '<absent>')!r}, now {settings.get(key, '<absent>')!r}")
    if identity is not None and comparable(manifest.get("source", {})) != comparable(identity):
        reasons.append(f"source changed: cached {comparable(manifest.get('source', {}))}, now {comparable(identity)}")
    return reasons
