"""Run the notebook series headless, in order, and export each executed notebook to HTML.

``hmlib run`` executes ``notebooks/[0-9][0-9]_*.ipynb`` with nbclient in a fresh kernel of the
current interpreter (cwd = the notebooks folder), injecting ``profile`` and ``config_path`` in a
cell placed right after the one tagged ``parameters`` (papermill style). Executed notebooks and
their HTML reports go to ``reports/`` (under ``$HMLIB_HOME`` if set), with ``reports/index.html``.
The run stops at the first failing notebook, naming the cell and the error; that notebook's
partial HTML is still written for debugging. Ctrl-C (SIGINT) or SIGTERM interrupts the running cell,
shuts the kernel down (:mod:`hmlib.notebook_client`), starts no further cell or notebook, records the
notebook as ``interrupted`` with its partial report and ends the command with status 130 (SIGINT) or
143 (SIGTERM). ``HMLIB_HOME`` and ``HMLIB_DATA_DIR`` are resolved once, here, and handed to every kernel as
absolute paths, and so are the entries of ``PYTHONPATH`` (a kernel runs in the notebooks folder, where a relative
path would mean another folder). ``--device`` reaches the kernels as ``HMLIB_DEVICE``, which their
:func:`hmlib.load_config` applies over the config file; a device this machine lacks fails before any kernel starts.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import nbformat

from hmlib import paths, reports
from hmlib.artifacts import check_writable, fingerprint
from hmlib.cli import add_device_option
from hmlib.config import DEVICE_VARIABLE, load_config, resolve_device, settings_of
from hmlib.errors import HmlibError

NOTEBOOK_PATTERN = re.compile(r"^\d\d_.+\.ipynb$")
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
DEFAULT_CELL_TIMEOUT_S = 3600
# lines a notebook prints that `hmlib run` repeats on the terminal: a stage resumed, retrained or set aside, notes
ANNOUNCED = ("Resuming ", "Retraining ", "note: ")
PATH_VARIABLES = ("HMLIB_HOME", "HMLIB_DATA_DIR")  # resolved once by the runner, passed to kernels absolute


class RunnerError(HmlibError, RuntimeError):
    """A notebook selection or setting the runner cannot use."""


@dataclass
class NotebookRun:
    """Outcome of one executed notebook."""

    name: str  # file stem, e.g. "01_data"
    status: str  # "ok", "failed" or "interrupted"
    wall_s: float
    executed_path: Path
    html_path: Path | None
    error: str | None = None  # one paragraph: cell index, first source line, exception (or the interruption)
    cell_index: int | None = None  # index of the failing (or interrupted) cell in the source notebook
    stop_signal: int | None = None  # the signal that interrupted it (SIGINT or SIGTERM)


# ------------------------------------------------------------------------------------ selection

def discover_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The series ``NN_*.ipynb`` in ``folder`` (default: the repository's notebooks/), in run order."""
    folder = Path(folder) if folder is not None else paths.notebooks_dir()
    if not folder.is_dir():
        raise RunnerError(f"notebook folder not found: {folder}")
    return sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))


def _matches(path: Path, selector: str) -> bool:
    """'01', '01_data', '01_data.ipynb' and 'data' all select notebooks/01_data.ipynb."""
    selector = selector.strip()
    stem = path.stem
    return selector in (path.name, stem, stem[:2], stem[3:])


def _find(notebooks: Sequence[Path], selector: str) -> int:
    hits = [i for i, p in enumerate(notebooks) if _matches(p, selector)]
    if not hits:
        names = ", ".join(p.stem for p in notebooks) or "(none)"
        raise RunnerError(f"no notebook matches '{selector}'; available: {names}")
    if len(hits) > 1:
        raise RunnerError(f"'{selector}' matches several notebooks: {', '.join(notebooks[i].stem for i in hits)}")
    return hits[0]


def select_notebooks(notebooks: Sequence[Path], only: Iterable[str] | None = None,
                     start: str | None = None) -> list[Path]:
    """Apply ``--only`` (a list of selectors) and ``--from`` (first notebook to run) to the series."""
    if only is not None and start is not None:
        raise RunnerError("use either --only or --from, not both")
    if only is not None:
        selectors = [s for item in only for s in item.split(",") if s.strip()]
        if not selectors:
            given = " ".join(f"--only {item!r}" for item in only) or "--only"
            example = notebooks[0].stem[:2] if notebooks else "01"
            raise RunnerError(f"{given} selects no notebook; name at least one, e.g. --only {example}")
        picked = sorted({_find(notebooks, s) for s in selectors})
        return [notebooks[i] for i in picked]
    if start is not None:
        if not start.strip():
            raise RunnerError("--from '' names no notebook; give one, e.g. --from 02")
        return list(notebooks[_find(notebooks, start):])
    return list(notebooks)


# ------------------------------------------------------------------------------------ execution

def inject_parameters(nb: nbformat.NotebookNode, parameters: Mapping[str, Any]) -> int:
    """Insert a cell assigning ``parameters`` after the ``parameters``-tagged cell; return its index."""
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in c.get("metadata", {}).get("tags", [])]
    tagged = [i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.get("metadata", {}).get("tags", [])]
    source = "# Parameters injected by hmlib run\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]})
    index = tagged[0] + 1 if tagged else 0
    nb.cells.insert(index, cell)
    return index


def _kernel_manager(socket_dir: str):
    """A kernel manager starting ipykernel with this very interpreter, talking over IPC sockets in ``socket_dir``."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    class CurrentInterpreterSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name=f"Python ({sys.executable})", language="python",
                              name=kernel_name, resource_dir="")

    # IPC (unix sockets) rather than TCP on loopback: nothing listens on a port, and ipykernel does not warn.
    # The async manager (nbclient's default) keeps the event loop free while a cell runs, so Ctrl-C is handled at once.
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=CurrentInterpreterSpecs(), transport="ipc",
                              ip=str(Path(socket_dir) / "kernel"))


def _first_line(cell: nbformat.NotebookNode) -> str:
    return next((ln for ln in cell.source.splitlines() if ln.strip()), "").strip()[:100]


def _describe_interruption(nb: nbformat.NotebookNode, cell_index: int | None, running: bool, injected_at: int,
                           source_name: str, stop_signal: int | None = None) -> tuple[str, int | None]:
    """'interrupted in <notebook>, cell <i> (<first line>)' for the code cell running at the signal ('after cell
    <i>' when it came between cells); 'interrupted by SIGTERM in ...' for a SIGTERM."""
    by_sigint = stop_signal in (None, signal.SIGINT)
    how = "interrupted" if by_sigint else f"interrupted by {signal.Signals(stop_signal).name}"
    if cell_index is None or cell_index >= len(nb.cells):
        return f"{how} in {source_name} while starting the kernel", None
    original = cell_index - 1 if cell_index > injected_at else cell_index
    where = "the injected parameters cell" if cell_index == injected_at else f"cell {original}"
    return f"{how} in {source_name}{',' if running else ' after'} {where} ({_first_line(nb.cells[cell_index])})", \
        original


def _describe_failure(nb: nbformat.NotebookNode, cell_index: int | None, injected_at: int,
                      err: BaseException, source_name: str) -> tuple[str, int | None]:
    """One readable paragraph naming the notebook, the cell (source-notebook index) and the error."""
    if cell_index is None or cell_index >= len(nb.cells):
        return f"{source_name}: {type(err).__name__}: {err}", None
    cell = nb.cells[cell_index]
    original = cell_index - 1 if cell_index > injected_at else cell_index
    first_line = next((ln for ln in cell.source.splitlines() if ln.strip()), "").strip()
    ename = getattr(err, "ename", type(err).__name__)
    evalue = getattr(err, "evalue", None)
    if ename == "CellTimeoutError":  # nbclient's message ends in a row of dashes
        evalue = "the cell ran past the per-cell timeout; raise --timeout (0 for none) and run it again"
    elif evalue is None:
        evalue = str(err).strip().splitlines()[-1] if str(err).strip() else ""
    where = "the injected parameters cell" if cell_index == injected_at else f"cell {original}"
    return f"{source_name}, {where} [first line: {first_line[:100]}]: {ename}: {evalue}", original


def kernel_environment() -> dict[str, str]:
    """The environment of a notebook kernel: this one, with HMLIB_HOME / HMLIB_DATA_DIR made absolute (a kernel's
    cwd is the notebooks folder, where a relative path names another folder): HMLIB_HOME from the working directory,
    HMLIB_DATA_DIR from the repository root, as every hmlib command and a notebook opened in Jupyter read it."""
    from hmlib.data.registry import repo_relative  # how every hmlib command reads a relative HMLIB_DATA_DIR

    env = dict(os.environ)
    for name in PATH_VARIABLES:
        if env.get(name, "").strip():
            absolute = repo_relative(env[name]) if name == "HMLIB_DATA_DIR" else Path(env[name]).expanduser().resolve()
            env[name] = str(absolute)
    if env.get("PYTHONPATH"):  # the same for the kernel's imports ('' or '.' meant this working directory)
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p or ".").expanduser().resolve())
                                            for p in env["PYTHONPATH"].split(os.pathsep))
    return env


def execute_notebook(source: Path, parameters: Mapping[str, Any], out_dir: Path, *,
                     timeout: int | None = DEFAULT_CELL_TIMEOUT_S, progress: bool = True,
                     env: Mapping[str, str] | None = None) -> NotebookRun:
    """Execute one notebook (cwd = its folder, environment ``env``: default :func:`kernel_environment`), write the
    executed .ipynb and its HTML to ``out_dir``."""
    from tqdm.auto import tqdm

    from hmlib.notebook_client import InterruptibleClient

    try:
        nb = nbformat.read(source, as_version=4)
    except Exception as err:  # invalid JSON or notebook schema
        raise RunnerError(f"cannot read notebook {source}: {type(err).__name__}: {err}") from err
    injected_at = inject_parameters(nb, parameters)
    code_cells = sum(1 for c in nb.cells if c.cell_type == "code")
    state: dict[str, Any] = {"cell_index": None}
    bar = tqdm(total=code_cells, desc=source.stem, unit="cell", disable=not progress, leave=False, file=sys.stderr)

    def on_cell_start(cell: Any, cell_index: int, **_: Any) -> None:
        state["cell_index"] = cell_index

    def on_cell_executed(cell: Any, cell_index: int, **_: Any) -> None:
        if cell.cell_type == "code":
            bar.update(1)

    def on_stdout_line(line: str) -> None:  # what the terminal should hear of, not only the HTML report
        if progress and (line.startswith(ANNOUNCED) or "cannot be reused" in line):
            bar.write(f"  {source.stem}: {line.strip()}", file=sys.stderr)

    started = time.perf_counter()
    error = cell_index = None
    interrupted = False
    early_signal: int | None = None
    previous_sigterm = _sigterm_handler()
    with tempfile.TemporaryDirectory(prefix="hmlib-kernel-") as socket_dir:
        client = InterruptibleClient(nb, km=_kernel_manager(socket_dir), timeout=timeout, allow_errors=False,
                                     resources={"metadata": {"path": str(source.parent)}},
                                     on_cell_start=on_cell_start, on_cell_executed=on_cell_executed,
                                     on_stdout_line=on_stdout_line)
        try:  # we own the kernel manager: shut the kernel down here
            client.execute(cleanup_kc=True, env=dict(kernel_environment() if env is None else env))
        except (Exception, asyncio.CancelledError, KeyboardInterrupt) as err:  # CellExecutionError, timeouts, ...
            interrupted = client.interrupted or isinstance(err, KeyboardInterrupt)
            if isinstance(err, KeyboardInterrupt) and client.stop_signal is None:  # before the client's handlers
                early_signal = getattr(err, "signal", signal.SIGINT)  # hmlib.errors.Terminated carries SIGTERM
            if not interrupted:
                error, cell_index = _describe_failure(nb, state["cell_index"], injected_at, err, source.name)
        finally:
            interrupted = interrupted or client.interrupted  # also a Ctrl-C after the last cell: stop the series
            if interrupted:
                client.reap_kernel()  # whatever is left of the kernel's process group
            _restore_sigterm(previous_sigterm)  # asyncio leaves SIGTERM at its default (death) when it lets go
            bar.close()
    stop_signal = int(client.stop_signal or early_signal or signal.SIGINT) if interrupted else None
    if interrupted:
        signalled = client.stop_signal is not None  # else a KeyboardInterrupt before the client's handlers were set
        at = client.interrupted_cell if signalled else client.current_cell
        running = client.cell_was_running if signalled else True
        error, cell_index = _describe_interruption(nb, at, running, injected_at, source.name, stop_signal)
    wall_s = time.perf_counter() - started
    status = "interrupted" if interrupted else "ok" if error is None else "failed"
    nb.metadata["hmlib"] = {"parameters": dict(parameters), "status": status, "wall_s": round(wall_s, 3),
                            "error": error, "python": sys.executable}
    out_dir.mkdir(parents=True, exist_ok=True)
    executed_path = out_dir / source.name
    reports.write_text_file(executed_path, nbformat.writes(nb))
    html_path: Path | None = out_dir / f"{source.stem}.html"
    try:
        reports.export_html(nb, html_path)
    except Exception as err:  # the report must not hide the notebook's own outcome
        html_path = None
        export_error = f"HTML export of {source.name} failed: {type(err).__name__}: {err}"
        error = export_error if error is None else f"{error}\n{export_error}"
        status = "interrupted" if interrupted else "failed"
    return NotebookRun(source.stem, status, wall_s, executed_path, html_path, error, cell_index, stop_signal)


def _sigterm_handler() -> Any:
    try:
        return signal.getsignal(signal.SIGTERM)
    except (ValueError, AttributeError):  # no SIGTERM on this platform
        return None


def _restore_sigterm(handler: Any) -> None:
    if handler is None:
        return
    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, TypeError):  # not the main thread: asyncio could not have changed it either
        pass


def run_notebooks(profile: str = "default", config_path: str | Path | None = None, *,
                  only: Iterable[str] | None = None, start: str | None = None,
                  timeout: int | None = DEFAULT_CELL_TIMEOUT_S, notebooks_dir: str | Path | None = None,
                  progress: bool = True, device: str | None = None) -> list[NotebookRun]:
    """Execute the selected notebooks in order, stopping at the first failure; update reports/index.html.
    ``device`` (default: the config's) is where every stage computes, handed to the kernels as ``HMLIB_DEVICE``."""
    if timeout is not None and timeout < 0:
        raise RunnerError(f"--timeout must be a positive number of seconds, or 0 for no timeout (got {timeout})")
    timeout = timeout or None  # 0: no timeout
    if config_path is not None:
        if not str(config_path).strip():
            raise RunnerError("--config '' names no file; give the path of a JSON file or leave --config out")
        config_path = str(Path(config_path).expanduser().resolve())
    cfg = load_config(profile, config_path, {"device": device} if device is not None else None)  # fail fast, before
    resolve_device(cfg.device)  # any kernel starts, on a bad profile, file or device, or a GPU this machine lacks
    if notebooks_dir is not None and not str(notebooks_dir).strip():
        raise RunnerError("--notebooks '' names no folder; give the folder of the series or leave --notebooks out")
    series = discover_notebooks(notebooks_dir)
    if not series:
        raise RunnerError(f"no notebooks named NN_*.ipynb in {notebooks_dir or paths.notebooks_dir()}")
    selected = select_notebooks(series, only, start)
    env = kernel_environment()  # HMLIB_HOME and HMLIB_DATA_DIR resolved once, here, for every kernel
    if device is not None:
        env[DEVICE_VARIABLE] = device  # every kernel's load_config applies it over the config file
    check_writable(paths.home(), what="the artifact folder (HMLIB_HOME)")  # before hours of work, not after
    out_dir = paths.reports_dir()
    parameters = {"profile": profile, "config_path": config_path}
    settings = fingerprint(settings_of(cfg))  # recorded per notebook: index.html says when reports mix settings
    runs: list[NotebookRun] = []
    _say(f"hmlib run: profile={profile!r} config={config_path!r} device={cfg.device!r}; {len(selected)} notebook(s) "
         f"-> {out_dir}", progress)
    for position, source in enumerate(selected, 1):
        _say(f"[{position}/{len(selected)}] {source.name} ...", progress)
        run = execute_notebook(source, parameters, out_dir, timeout=timeout, progress=progress, env=env)
        runs.append(run)
        record = reports.NotebookRecord(
            name=run.name, title=_title(run.executed_path) or run.name, status=run.status,
            wall_s=round(run.wall_s, 2), profile=profile, finished_at=reports.utc_now(),
            html=run.html_path.name if run.html_path else None, error=run.error, settings=settings)
        reports.update_run_log([record])
        _say(f"[{position}/{len(selected)}] {source.name}: {run.status} in {run.wall_s:.1f} s", progress)
        if run.status != "ok":
            break
    reports.write_index(p.stem for p in series)
    return runs


def _title(executed: Path) -> str | None:
    try:
        return reports.notebook_title(nbformat.read(executed, as_version=4))
    except Exception:  # a title is cosmetic
        return None


def _say(message: str, progress: bool) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- CLI

def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hmlib run``."""
    parser = subparsers.add_parser(
        "run", help="execute the notebook series headless and write HTML reports",
        description="Execute notebooks/NN_*.ipynb in order (fresh kernel each, cwd notebooks/), injecting the "
                    "profile and config path; write executed notebooks, HTML reports and index.html to reports/.")
    parser.add_argument("--profile", default="default", help="config profile: smoke, default or seed (default: %(default)s)")
    parser.add_argument("--config", default=None, metavar="PATH", help="JSON file overriding config fields")
    parser.add_argument("--only", action="append", metavar="NB",
                        help="run only these notebooks ('01', '01_data' or 'data'; repeat or comma-separate)")
    parser.add_argument("--from", dest="start", metavar="NB", help="start the series at this notebook")
    parser.add_argument("--timeout", type=_timeout_value, default=DEFAULT_CELL_TIMEOUT_S, metavar="S",
                        help="per-cell timeout in whole seconds; 0 for none (default: %(default)s)")
    parser.add_argument("--notebooks", default=None, metavar="DIR",
                        help="folder holding the series (default: the repository's notebooks/)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    add_device_option(parser, "every stage of every notebook")
    parser.set_defaults(func=_run_command)


def _timeout_value(text: str) -> int:
    """``--timeout``: whole seconds, 0 for none; a negative value is refused (it would silently mean none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no timeout) or a positive number of seconds, got {value}")
    return value


def _run_command(args: argparse.Namespace) -> int:
    """Handler of ``hmlib run``: 0 if every notebook ran, 1 if one failed, 130 / 143 if interrupted by SIGINT /
    SIGTERM (errors: hmlib.cli)."""
    runs = run_notebooks(args.profile, args.config, only=args.only, start=args.start,
                         timeout=args.timeout or None, notebooks_dir=args.notebooks, progress=not args.quiet,
                         device=args.device)
    total = sum(r.wall_s for r in runs)
    print("\n".join(f"{r.name:<24} {r.status:<7} {r.wall_s:8.1f} s   {r.html_path or '-'}" for r in runs))
    print(f"{'total':<24} {'':<7} {total:8.1f} s   {paths.reports_dir() / 'index.html'}")
    stopped = [r for r in runs if r.status == "interrupted"]
    if stopped:
        first = stopped[0].error.splitlines()[0] if stopped[0].error else f"interrupted in {stopped[0].name}"
        print(f"hmlib run: {first}; partial report: {stopped[0].html_path or stopped[0].executed_path}",
              file=sys.stderr)
        return 128 + (stopped[0].stop_signal or signal.SIGINT)
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        print(f"hmlib run: FAILED: {failed[0].error}\n(partial report: {failed[0].html_path or 'not written'}; "
              f"executed notebook: {failed[0].executed_path})", file=sys.stderr)
        return 1
    return 0


__all__ = ["RunnerError", "NotebookRun", "discover_notebooks", "select_notebooks", "inject_parameters",
           "execute_notebook", "run_notebooks", "add_cli"]
