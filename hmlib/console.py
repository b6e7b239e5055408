"""The ``hmlib`` console script and ``python -m hmlib``: :func:`hmlib.cli.main`, imported here so that a Ctrl-C
while torch and the subcommands load (the first second or two) ends like any other, with ``hmlib: interrupted``
and status 130, not a traceback of the import. This module imports nothing heavy itself."""
from __future__ import annotations

import sys
from typing import Sequence

EXIT_INTERRUPTED = 130  # the same as hmlib.cli.EXIT_INTERRUPTED (tests/test_faults_signals.py checks it)


def main(argv: Sequence[str] | None = None) -> int:
    """Import the command line (torch, the models) and run it; returns the exit code."""
    try:
        from hmlib.cli import main as run  # noqa: PLC0415 (the heavy import, under the interrupt handler)
    except KeyboardInterrupt:
        print("hmlib: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run(argv)
