"""Atomic, self-describing artifacts: checkpoints, caches and JSON results.

Every artifact records the settings that made it (``meta``). Loading compares them with what the
caller expects and raises :class:`StaleArtifactError` naming the differing keys, so a stale file is
never silently reused. Writes go to a temporary file in the same folder, then ``os.replace``.

A write that fails because the disk is full, read-only or not writable by us (``ENOSPC``, ``EDQUOT``,
``EROFS``, ``EACCES``, ``EPERM``; also torch's "unexpected pos" when ``torch.save`` runs out of room) is a
:class:`~hmlib.errors.StorageError`: one line naming the path and the fix. :func:`check_writable` finds
such a folder before long work starts.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from hmlib import paths
from hmlib.errors import HmlibError, StorageError

SCHEMA_VERSION = 2  # 2: names carry a settings hash, identities are content hashes of the weights
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the disk", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}
MIN_FREE_BYTES = 16 << 20  # check_writable refuses a folder whose disk has less room than this
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


class ArtifactError(HmlibError, RuntimeError):
    """An artifact is missing, corrupt or unreadable."""


class StaleArtifactError(ArtifactError):
    """An artifact was made with other settings or from other inputs."""


# ------------------------------------------------------------------------------------- storage faults

def storage_fix(path: str | Path, code: int = errno.ENOSPC, elsewhere: str | None = None) -> str:
    """What to do about a path we cannot write, for an errno: free space / fix permissions, or write elsewhere
    (``elsewhere``; by default: another HMLIB_HOME for a path under it, another folder otherwise)."""
    if elsewhere is None:
        try:
            inside_home = Path(path).resolve().is_relative_to(paths.home())
        except (OSError, RuntimeError):
            inside_home = False
        elsewhere = "set HMLIB_HOME to a writable folder with room" if inside_home else \
            "choose a writable folder on a disk with room"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"free space on that disk, or {elsewhere}"
    if code in (errno.EACCES, errno.EPERM):
        return f"make it writable for this user, or {elsewhere}"
    return elsewhere


def storage_error(err: BaseException, path: str | Path, elsewhere: str | None = None) -> StorageError | None:
    """The one-line StorageError for an OSError that means 'cannot write here' (None for any other error)."""
    if not isinstance(err, OSError) or isinstance(err, StorageError) or err.errno not in STORAGE_ERRNOS:
        return None
    name = errno.errorcode.get(err.errno, str(err.errno))
    storage = StorageError(f"cannot write {path}: {STORAGE_ERRNOS[err.errno]} ({name}); "
                           f"{storage_fix(path, err.errno, elsewhere)}")
    storage.errno = err.errno
    return storage


@contextmanager
def storage_errors(path: str | Path, elsewhere: str | None = None) -> Iterator[None]:
    """Turn a disk-full / read-only / permission OSError raised inside the block into a StorageError naming ``path``."""
    try:
        yield
    except OSError as err:
        converted = storage_error(err, path, elsewhere)
        if converted is None:
            raise
        raise converted from err


def check_writable(folder: str | Path, *, what: str = "folder", elsewhere: str | None = None,
                   min_free_bytes: int = MIN_FREE_BYTES) -> Path:
    """``folder`` (created if missing) if a file can be written in it and its disk has room; else a StorageError.

    Commands call it before long work whose results go there (``hmlib run`` for HMLIB_HOME, ``hmlib cluster`` for
    ``--out``), so a full, read-only or foreign disk is reported at once, not after the computation. ``elsewhere``
    is the alternative the message offers (e.g. "choose another --out").
    """
    folder = Path(folder).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise StorageError(f"{what} {folder} is a file, not a folder; {storage_fix(folder, errno.EROFS, elsewhere)}")
    with storage_errors(folder, elsewhere):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # e.g. under /proc: not a storage errno, yet the folder cannot be made
            if storage_error(err, folder, elsewhere) is not None:
                raise
            raise StorageError(f"cannot create {what} {folder} ({err.strerror or type(err).__name__}); "
                               f"{storage_fix(folder, err.errno or 0, elsewhere)}") from err
        fd, probe = tempfile.mkstemp(prefix=".hmlib-write-check-", dir=folder)
        try:
            os.write(fd, b"hmlib")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(folder).free
    if free < min_free_bytes:
        raise StorageError(f"cannot write {folder}: only {free / 2**20:.1f} MiB free on its disk ({what} needs at "
                           f"least {min_free_bytes / 2**20:.0f} MiB); {storage_fix(folder, errno.ENOSPC, elsewhere)}")
    return folder


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    A disk-full, read-only or permission error anywhere in the write (the folder, the temporary file, what the
    block writes into it, the rename) is a StorageError naming ``path``.
    """
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".hmlib-tmp-{path.name}.", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
            os.replace(tmp_path, path)
        except OSError as err:
            own = err.filename is None or str(err.filename) in (str(tmp_path), str(path))  # not a file it read
            converted = storage_error(err, path) if own else None
            if converted is None:
                raise
            raise converted from err
    finally:
        try:
            if tmp_path.exists():
                tmp_path.unlink()
        except OSError:  # a read-only disk: there is nothing we can do about the temporary file
            pass


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


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples: a state dict, an optimiser's state) detached
    and on the CPU, so that a checkpoint written on a GPU loads on any machine."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [on_cpu(v) for v in value]
    if isinstance(value, tuple):
        return tuple(on_cpu(v) for v in value)
    return value


def save_checkpoint(path: str | Path, state: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Save tensors (``state``, moved to the CPU whatever device they are on) plus primitive ``meta`` atomically;
    loadable with weights_only=True on any machine."""
    payload = {"schema_version": SCHEMA_VERSION, "meta": dict(meta), "state": on_cpu(dict(state))}
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as fh:  # a file object: a failed write can surface as OSError(ENOSPC)
                torch.save(payload, fh)
        except RuntimeError as err:  # torch's own writer failed part-way ("unexpected pos"): a full disk, mostly
            if not any(text in str(err) for text in _TORCH_WRITE_FAILURES):
                raise
            raise _torch_write_error(err, Path(path), Path(tmp), state) from err
    return Path(path)


def _torch_write_error(err: RuntimeError, path: Path, tmp: Path, state: Mapping[str, Any]) -> StorageError:
    """The StorageError for a torch.save that failed writing: ENOSPC when the disk has less room than the tensors."""
    free = shutil.disk_usage(tmp.parent).free
    needed = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    if free < needed + (1 << 20):
        return StorageError(f"cannot write {path}: {STORAGE_ERRNOS[errno.ENOSPC]} (ENOSPC: {free / 2**20:.1f} MiB "
                            f"free, the checkpoint needs {needed / 2**20:.1f} MiB); {storage_fix(path)}")
    return StorageError(f"cannot write {path}: torch.save failed part-way ({str(err).strip().splitlines()[0]}; "
                        f"{free / 2**20:.1f} MiB free on the disk); {storage_fix(path)}")


def load_checkpoint(path: str | Path, expected_meta: Mapping[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(state, meta)`` safely (weights_only=True) onto ``map_location`` (the CPU by default: a checkpoint
    written on any device loads here; models are moved to the chosen device after they are rebuilt); check
    ``expected_meta`` keys if given."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint not found: {path}")
    # an artifact of this home may be deleted and made again; a user's own file (or the manifest) never
    remedy = "; delete it to retrain" if path.suffix == ".pt" and _under(path, paths.models_dir()) else ""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/garbage/unsafe files
        text = str(err).splitlines()[0] if str(err) else ""
        if "weights_only" in str(err):  # torch's advice to load it unsafely is not ours to give
            text = "it holds objects other than tensors and plain values, which hmlib never writes"
        raise ArtifactError(f"checkpoint {path} is corrupt or not an hmlib checkpoint ({type(err).__name__}: "
                            f"{text}){remedy}") from err
    if not isinstance(payload, dict) or "meta" not in payload or "state" not in payload:
        raise ArtifactError(f"{path} is not an hmlib checkpoint (no meta/state){remedy}")
    if payload.get("schema_version") != SCHEMA_VERSION:
        raise StaleArtifactError(f"{path} has schema version {payload.get('schema_version')}, "
                                 f"this hmlib writes {SCHEMA_VERSION}{remedy or '; re-make it with this hmlib'}")
    meta = payload["meta"]
    if expected_meta is not None:
        check_meta(meta, expected_meta, str(path))
    return payload["state"], meta


def _under(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (resolved; False where either cannot be resolved)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def load_named_kind(path: str | Path, kind: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of a checkpoint that must be of ``kind``; meta gains its 'path' and 'name' (file stem)."""
    state, meta = load_checkpoint(path)
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path} is not a {what} checkpoint (kind={meta.get('kind')!r})")
    return state, {**meta, "path": str(path), "name": Path(path).stem}


def check_meta(meta: Mapping[str, Any], expected: Mapping[str, Any], what: str) -> None:
    """Raise StaleArtifactError listing every setting whose recorded value differs from the expected one."""
    diffs = settings_diff(meta, expected)
    if diffs:
        raise StaleArtifactError(f"{what} was made with other settings or inputs:\n  " + "\n  ".join(diffs))


def settings_diff(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """'key.sub: recorded X, expected Y' for every leaf of ``expected`` that differs (JSON-normalised).

    The one stale-artifact comparison: caches, checkpoints and results all describe themselves with
    nested dicts of primitives, and a difference anywhere in them is named by its dotted key.
    """
    have = _flatten({k: recorded.get(k, "<absent>") for k in expected})
    want = _flatten(dict(expected))
    diffs = []
    for key in sorted(set(have) | set(want)):
        a, b = _normalise(have.get(key, "<absent>")), _normalise(want.get(key, "<absent>"))
        if a != b:
            diffs.append(f"{key}: recorded {_short(a)}, expected {_short(b)}")
    return diffs


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {'a.b.c': leaf}; an empty mapping is a leaf."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=_json_default))


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True, default=_json_default)
    return text if len(text) <= limit else text[:limit] + "..."


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Short sha256 of a state dict's tensors (names, dtypes, shapes, bytes): the identity of trained weights.

    Unlike the file's sha256 it ignores run metadata such as timings, so retraining with the same settings
    and seeds gives the same identity and every downstream cache stays valid.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()[:16]


def named_path(folder: Path, stem: str, identity: Any, suffix: str = ".pt") -> Path:
    """``folder/<stem>-<8 hex>.pt``: every setting that makes two artifacts incompatible is in the name's hash,
    so artifacts of other settings never share a file and nothing good is ever overwritten."""
    return Path(folder) / f"{stem}-{fingerprint(identity)[:8]}{suffix}"


def set_aside(path: Path, reason: str) -> Path | None:
    """Rename an artifact that cannot be reused (corrupt, or replaced on request) to ``<name>.<reason>-<n><suffix>``,
    keeping it on disk; returns the new path (None if there was nothing to move)."""
    path = Path(path)
    if not path.exists():
        return None
    for n in range(1, 1000):
        target = path.with_name(f"{path.stem}.{reason}-{n}{path.suffix}")
        if not target.exists():
            with storage_errors(path):
                os.replace(path, target)
            return target
    raise ArtifactError(f"too many set-aside copies of {path}; delete some")


def set_aside_unless_same(path: Path, same: Callable[[dict], bool], what: str, also: tuple[str, ...] = ()
                          ) -> Path | None:
    """Set the JSON result at ``path`` (and its siblings with the suffixes ``also``) aside as
    ``<name>.replaced-<n><suffix>`` unless ``same(old)`` says it was made by the same inputs, so that a run with other
    settings never destroys a finished result (a file that is not a JSON object is not a result: nothing to keep);
    the old file's new path, or None."""
    if not path.is_file():
        return None
    try:
        old = read_json(path)
    except ArtifactError:
        return None
    if not isinstance(old, dict) or same(old):
        return None
    moved = set_aside(path, "replaced")
    for suffix in also:
        set_aside(path.with_suffix(suffix), "replaced")
    print(f"note: {path.name} held a result of {what}; it is kept as {moved.name}")
    return moved


def refuse_overwrite(path: str | Path, overwrite: bool, what: str = "output") -> Path:
    """``path`` if it may be written: a file that exists is replaced only with ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{what} {path} exists; choose another path or pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise ArtifactError(f"{what} {path} is a folder, not a file")
    return path


class MissingArtifactError(ArtifactError):
    """An upstream artifact is needed but absent, and this step may not make it (the message says how to)."""


def load_or_build(path: Path, expected: Mapping[str, Any], build: Callable[[], None], *, retrain: str = "auto",
                  allow_build: bool = True, what: str = "artifact", how_to_make: str = "",
                  verbose: bool = True) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """``(state, meta, reused)`` of the checkpoint at ``path``, reused when its recorded settings match ``expected``.

    Otherwise ``build()`` writes it (unless ``allow_build`` is False or ``retrain`` is "never": then a
    MissingArtifactError names the file and ``how_to_make``). Nothing is destroyed: a checkpoint that is
    corrupt, made with other settings, or replaced on request (``retrain="always"``) is renamed aside first; if a
    rebuild on request fails, the previous checkpoint is put back in place.
    """
    path = Path(path)
    if path.exists() and retrain != "always":
        try:
            state, meta = load_checkpoint(path, expected)
            if verbose:
                print(f"Reusing {what} {path.name} (its settings and inputs match).")
            return state, meta, True
        except StaleArtifactError as err:
            lines = str(err).splitlines()  # a settings diff has one line per key; a schema mismatch one line only
            detail = lines[1].strip() + " ..." if len(lines) > 1 else lines[0]
            reason, note = "stale", f"made with other settings ({detail})"
        except ArtifactError as err:
            reason, note = "corrupt", str(err).splitlines()[0]
        if allow_build and retrain != "never":
            moved = set_aside(path, reason)
            print(f"{what} {path.name} cannot be reused: {note}; kept it as {moved.name} and building a new one.")
    if not allow_build or retrain == "never":
        hint = f"; make it with: {how_to_make}" if how_to_make else ""
        state_note = "cannot be reused" if path.exists() else "not found"
        raise MissingArtifactError(f"{what} {path} {state_note}{hint}")
    moved = None
    if path.exists():  # retrain == "always": keep the previous one beside the new one
        moved = set_aside(path, "previous")
        print(f"Retraining {what} on request (retrain='always'); the previous one is kept as {moved.name}.")
    try:
        build()
    except BaseException:
        if moved is not None and not path.exists():  # the rebuild failed: the previous one stays in use
            os.replace(moved, path)
        raise
    state, meta = load_checkpoint(path, expected)
    return state, meta, False
