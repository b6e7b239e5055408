"""Atomic, self-describing artifacts: checkpoints, caches and JSON results.

Every artifact records the settings that made it (``meta``). Loading compares them with what the
caller expects and raises :class:`StaleArtifactError` naming the differing keys, so a stale file is
never silently reused. Writes go to a temporary file in the same folder, then ``os.replace``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

SCHEMA_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt or unreadable."""


class StaleArtifactError(ArtifactError):
    """An artifact was made with other settings or from other inputs."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".hmlib-tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (sorted keys, indented)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is corrupt (not valid JSON: {err}); delete it to rebuild") from err


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def fingerprint(*parts: Any) -> str:
    """Short sha256 of JSON-serialisable parts (settings, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Save tensors (``state``) plus primitive ``meta`` atomically; loadable with weights_only=True."""
    payload = {"schema_version": SCHEMA_VERSION, "meta": dict(meta), "state": dict(state)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, expected_meta: Mapping[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(state, meta)`` safely (weights_only=True); check ``expected_meta`` keys if given."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbage/unsafe files
        raise ArtifactError(f"checkpoint {path} is corrupt or not an hmlib checkpoint ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); delete it to retrain") from err
    if not isinstance(payload, dict) or "meta" not in payload or "state" not in payload:
        raise ArtifactError(f"{path} is not an hmlib checkpoint (no meta/state); delete it to retrain")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise StaleArtifactError(f"{path} has schema version {payload.get('schema_version')}, "
                                 f"this hmlib writes {SCHEMA_VERSION}; delete it to retrain")
    meta = payload["meta"]
    if expected_meta is not None:
        check_meta(meta, expected_meta, str(path))
    return payload["state"], meta


def check_meta(meta: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Raise StaleArtifactError listing every key whose recorded value differs from the expected one."""
    diffs = []
    for key, want in expected.items():
        have = meta.get(key, "<absent>")
        if _normalise(have) != _normalise(want):
            diffs.append(f"{key}: recorded {_short(have)}, expected {_short(want)}")
    if diffs:
        raise StaleArtifactError(f"{what} was made with other settings or inputs:\n  " + "\n  ".join(diffs))


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=_json_default)
    return text if len(text) <= limit else text[:limit] + "..."
