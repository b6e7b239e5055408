"""The common base of the errors hmlib raises on purpose.

Every error the package raises for bad input, settings or artifacts derives from :class:`HmlibError`
(``ConfigError``, ``DatasetError``, ``ArtifactError``, ``EvalError``, ``RunnerError``, ...), so the
``hmlib`` command can print it as one ``hmlib: error: ...`` line instead of a traceback. Anything
else reaching the command is a bug and keeps its traceback.
"""
from __future__ import annotations


class HmlibError(Exception):
    """An error with a message meant for the user (bad input, settings or artifact), not a bug."""


class DatasetError(HmlibError, ValueError):
    """A dataset name is unknown or none of its sources could be read (the message says how to fix it).

    Defined here, below every ``hmlib.data`` module, so the corruption registry and the dataset registry that
    reads it can both raise it; ``hmlib.data.DatasetError`` is the same class.
    """


__all__ = ["DatasetError", "HmlibError"]
