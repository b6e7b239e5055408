"""The ``hmlib`` command: subcommands come from modules that expose ``add_cli(subparsers)``.

Each module registers its parser and sets ``func`` (``args -> exit code``): ``hmlib.runner``
gives ``hmlib run``, ``hmlib.evaluation.cli`` gives ``hmlib eval``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from hmlib import __version__

SUBCOMMAND_MODULES: tuple[str, ...] = ("hmlib.runner", "hmlib.evaluation.cli", "hmlib.cluster.command", "hmlib.results")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered (imports each module for real)."""
    parser = argparse.ArgumentParser(
        prog="hmlib", description="Meta-trained hypernetworks that cluster unseen unlabeled image datasets.")
    parser.add_argument("--version", action="version", version=f"hmlib {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_cli(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmlib`` console script and ``python -m hmlib``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
