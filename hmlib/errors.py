"""The common base of the errors hmlib raises on purpose, and the SIGTERM counterpart of Ctrl-C.

Every error the package raises for bad input, settings or artifacts derives from :class:`HmlibError`
(``ConfigError``, ``DatasetError``, ``ArtifactError``, ``EvalError``, ``RunnerError``, ...), so the
``hmlib`` command can print it as one ``hmlib: error: ...`` line instead of a traceback. Anything
else reaching the command is a bug and keeps its traceback. A disk that is full, read-only or not
ours is :class:`StorageError` (also an ``OSError``, so code catching ``OSError`` still sees it).
"""
from __future__ import annotations

import signal
from typing import Any, NoReturn


class HmlibError(Exception):
    """An error with a message meant for the user (bad input, settings or artifact), not a bug."""


class DatasetError(HmlibError, ValueError):
    """A dataset name is unknown or none of its sources could be read (the message says how to fix it).

    Defined here, below every ``hmlib.data`` module, so the corruption registry and the dataset registry that
    reads it can both raise it; ``hmlib.data.DatasetError`` is the same class.
    """


class StorageError(HmlibError, OSError):
    """A file or folder could not be written (disk full, read-only, no permission); the message names it and the fix."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where it lands like Ctrl-C's KeyboardInterrupt, so both unwind the same way (exit 143)."""

    signal = signal.SIGTERM


def raise_terminated(signum: int, frame: Any) -> NoReturn:
    """A SIGTERM handler: raise :class:`Terminated` in the main thread."""
    raise Terminated()


__all__ = ["DatasetError", "HmlibError", "StorageError", "Terminated", "raise_terminated"]
