"""The base of every error hmlib raises on purpose: the CLI prints its message as one line."""
from __future__ import annotations


class HmlibError(Exception):
    """An error whose message says what went wrong and how to fix it (no traceback needed)."""
