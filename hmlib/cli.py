"""The ``hmlib`` command: subcommands come from modules that expose ``add_cli(subparsers)``.

Each module registers its parser and sets ``func`` (``args -> exit code``): ``hmlib.runner``
gives ``hmlib run``, ``hmlib.evaluation.cli`` gives ``hmlib eval``, ``hmlib.evaluation.benchmark`` gives
``hmlib benchmark``, ``hmlib.cluster.command`` gives
``hmlib cluster`` and ``hmlib.results`` gives ``hmlib results``.

Errors the user can fix (an :class:`~hmlib.errors.HmlibError` such as a bad config value, a bad
command line, a missing or unreadable file) are printed as one ``hmlib: error: ...`` line (plus
the further lines of a message that lists several items) and end with status 2; so does a disk
that is full, read-only or not writable (an ``OSError`` ENOSPC, EROFS, EACCES, ...: the path and the
fix). Ctrl-C ends with ``hmlib: interrupted`` and status 130, SIGTERM with ``hmlib: terminated`` and
status 143, wherever they land. Any other exception is a bug: its traceback is shown, then a line
asking to report it. ``--debug`` re-raises every exception with its full traceback.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn, Sequence

from hmlib import __version__
from hmlib.artifacts import storage_error
from hmlib.config import device_name
from hmlib.errors import HmlibError, Terminated, raise_terminated

SUBCOMMAND_MODULES: tuple[str, ...] = ("hmlib.runner", "hmlib.evaluation.cli", "hmlib.evaluation.benchmark",
                                       "hmlib.cluster.command", "hmlib.results")
USER_ERRORS: tuple[type[BaseException], ...] = (
    HmlibError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError)
EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 1, 130, 143
MAX_MESSAGE_LINES = 40
# argparse's own complaints about the command line (as opposed to a handler calling parser.error on bad input)
ARGPARSE_MESSAGES = ("argument ", "the following arguments are required", "unrecognized arguments",
                     "one of the arguments", "ambiguous option", "expected one argument", "not allowed with argument")


class UsageError(HmlibError):
    """A command line that argparse rejected; ``prog`` names the (sub)command for the help hint."""

    def __init__(self, message: str, prog: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (and subcommand parsers, which inherit the class) raising UsageError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered (imports each module for real)."""
    parser = Parser(
        prog="hmlib", description="Meta-trained hypernetworks that cluster unseen unlabeled image datasets.")
    parser.add_argument("--version", action="version", version=f"hmlib {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_cli(subparsers)
    for sub in {id(p): p for p in subparsers.choices.values()}.values():  # also `hmlib eval ... --debug`
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of any error")
    return parser


def add_device_option(parser: argparse.ArgumentParser, what: str, default: str = "the config's device") -> None:
    """``--device``: where ``what`` computes, checked like the config field ``device`` (None when not given)."""
    parser.add_argument("--device", type=_device_value, default=None, metavar="DEVICE",
                        help=f"where {what} runs: auto, cpu, cuda, cuda:N or mps (default: {default})")


def _device_value(text: str) -> str:
    try:
        return device_name(text)
    except HmlibError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hmlib`` console script and ``python -m hmlib``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[:argv.index("--")] if "--" in argv else "--debug" in argv
    try:
        with sigterm_as_interrupt():
            parser = build_parser()
            args = parser.parse_args(argv)
            debug = bool(args.debug)
            if getattr(args, "func", None) is None:
                parser.print_help(sys.stderr)
                return EXIT_ERROR
            return int(args.func(args) or 0)
    except KeyboardInterrupt as err:
        if debug:
            raise
        terminated = isinstance(err, Terminated)
        print("hmlib: terminated (SIGTERM)" if terminated else "hmlib: interrupted", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug:
            raise
        print("\n".join(error_lines(err)), file=sys.stderr)
        return EXIT_ERROR
    except OSError as err:  # a full, read-only or foreign disk met outside hmlib's own writers: not a bug either
        storage = storage_error(err, err.filename if err.filename is not None else "a file")
        if debug or storage is None:
            raise
        print("\n".join(error_lines(storage)), file=sys.stderr)
        return EXIT_ERROR
    except Exception as err:  # a bug: keep the traceback
        if debug:
            raise
        traceback.print_exc()
        print(f"hmlib: internal error: {type(err).__name__} (a bug in hmlib, not in your input); re-run with "
              "--debug for the full traceback and please report it", file=sys.stderr)
        return EXIT_BUG


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`~hmlib.errors.Terminated` (a KeyboardInterrupt) like Ctrl-C does."""
    installed = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM")
    previous: Any = signal.signal(signal.SIGTERM, raise_terminated) if installed else None
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def error_lines(err: BaseException) -> list[str]:
    """The lines printed for a user error: 'hmlib: error: <first line>', then the message's further lines."""
    if isinstance(err, UnicodeDecodeError):
        text = f"cannot read text as {err.encoding}: {err.reason} (byte offset {err.start})"
    elif isinstance(err, OSError) and err.filename is not None:
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    else:
        text = str(err).strip() or type(err).__name__
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    if isinstance(err, UsageError) and lines[0].startswith(ARGPARSE_MESSAGES):
        lines[0] += f" (see: {err.prog} --help)"
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[:MAX_MESSAGE_LINES] + [f"  ... {len(lines) - MAX_MESSAGE_LINES} more line(s); --debug shows all"]
    return [f"hmlib: error: {lines[0]}", *lines[1:]]


if __name__ == "__main__":
    raise SystemExit(main())
