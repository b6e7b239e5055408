"""Fault pass (issue 19): SIGTERM and SIGINT are interruptions wherever they land.

SIGTERM during a cell was a failed cell with an empty AssertionError and a ZMQ traceback; a Ctrl-C that never
reached Python in the kernel (a figure rendered in code that ignores SIGINT, as C extensions may, or a kernel
between two requests) let the cell finish "ok" and the later cells run and write until a 10 s grace period
ran out, and the message named whatever cell had started last, a markdown cell included; SIGTERM outside a
notebook killed the process without a word. Now: exit 143 (SIGTERM) / 130 (SIGINT), the running code cell
named, the kernel gone, no later cell or notebook started.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from hmlib import reports
from test_runner_interrupt import LONG_CELL_FIRST_LINE, _gone, _write_series

REPO = Path(__file__).resolve().parents[1]
FIGURE_CELL_FIRST_LINE = "import os, pathlib, time  # the figure cell"
FIGURE_CELL = f"""{FIGURE_CELL_FIRST_LINE}
import matplotlib.pyplot as plt
from matplotlib.artist import Artist

class SlowArtist(Artist):  # the figure is rendered after the cell's code, by the inline backend's post-execute hook
    def draw(self, renderer):  # a render that the interrupt does not reach (ignored here, as in some C code)
        import signal
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        home = pathlib.Path(os.environ['HMLIB_HOME'])
        (home / 'drawing.tmp').write_text(str(os.getpid()))
        os.replace(home / 'drawing.tmp', home / 'drawing')
        time.sleep(1.5)  # (matplotlib may draw twice: for draw_all and for the PNG)
        signal.signal(signal.SIGINT, previous)

fig, ax = plt.subplots()
ax.add_artist(SlowArtist())"""
LATER_CELL = "import os, pathlib\npathlib.Path(os.environ['HMLIB_HOME'], 'later-cell-ran').touch()"


def _start(folder: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hmlib", "run", "--profile", "smoke", "--notebooks", str(folder),
                             "--quiet"], cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"hmlib run ended before {path.name} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=300)  # a hang guard only (a loaded machine is slow)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _assert_gone(processes: list[psutil.Process]) -> None:
    deadline = time.monotonic() + 10
    while not all(_gone(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p.pid) for p in processes), "processes of the run survived"


@pytest.mark.slow  # ~20 s: an interpreter, a kernel, the HTML export
def test_sigterm_in_a_cell_is_an_interruption_exit_143(tmp_path, hmlib_home):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _write_series(folder, ignore_sigint=False)
    proc = _start(folder)
    try:
        _wait_for(hmlib_home / "pids", proc)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "AssertionError" not in err and "ZMQ" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hmlib run: interrupted by SIGTERM in 01_sleepy.ipynb, cell 3 ({LONG_CELL_FIRST_LINE})")
    _assert_gone(descendants)
    executed = nbformat.read(hmlib_home / "reports" / "01_sleepy.ipynb", as_version=4)
    assert executed.metadata.hmlib["status"] == "interrupted"
    assert reports.read_run_log()["01_sleepy"]["status"] == "interrupted"
    assert not (hmlib_home / "later-ran").exists() and not (hmlib_home / "reports" / "02_later.html").exists()


@pytest.mark.slow  # ~25 s: an interpreter, a kernel with matplotlib, the HTML export
def test_ctrl_c_while_a_figure_renders_stops_the_notebook_and_names_the_code_cell(tmp_path, hmlib_home):
    folder = tmp_path / "nbs"
    folder.mkdir()
    v4 = nbformat.v4
    nb = v4.new_notebook()
    nb.cells = [v4.new_markdown_cell("# Figures"),
                v4.new_code_cell('profile = "default"\nconfig_path = None', metadata={"tags": ["parameters"]}),
                v4.new_code_cell(FIGURE_CELL), v4.new_markdown_cell("## What the figure shows"),
                v4.new_code_cell(LATER_CELL), v4.new_markdown_cell("## The end")]
    nbformat.write(nb, str(folder / "01_figures.ipynb"))
    later = v4.new_notebook()
    later.cells = [v4.new_code_cell("import os, pathlib\npathlib.Path(os.environ['HMLIB_HOME'], 'later-ran').touch()")]
    nbformat.write(later, str(folder / "02_later.ipynb"))
    proc = _start(folder)
    try:
        _wait_for(hmlib_home / "drawing", proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hmlib run: interrupted in 01_figures.ipynb, cell 2 ({FIGURE_CELL_FIRST_LINE})"), err
    assert not (hmlib_home / "later-cell-ran").exists(), "a cell ran after the Ctrl-C"
    assert not (hmlib_home / "later-ran").exists(), "a notebook ran after the Ctrl-C"
    executed = nbformat.read(hmlib_home / "reports" / "01_figures.ipynb", as_version=4)
    assert executed.metadata.hmlib["status"] == "interrupted"
    assert executed.cells[5].get("outputs", []) == [] and executed.cells[5].get("execution_count") is None


SIGTERM_OUTSIDE_A_NOTEBOOK = textwrap.dedent("""
    import os, signal, sys, time
    from hmlib import cli, runner

    def run_notebooks(*args, **kwargs):  # stands in for long work outside any kernel (loading, exporting)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        raise SystemExit('SIGTERM was not delivered')

    runner.run_notebooks = run_notebooks
    before = signal.getsignal(signal.SIGTERM)
    code = cli.main(['run', '--quiet'])
    assert signal.getsignal(signal.SIGTERM) is before, 'cli.main must restore the SIGTERM handler'
    sys.exit(code)
""")


def test_sigterm_outside_a_notebook_is_terminated_143(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SIGTERM_OUTSIDE_A_NOTEBOOK], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})  # a hang guard only
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == "hmlib: terminated (SIGTERM)"


INTERRUPT_AT_TORCH = """
import sys

class CtrlC:  # a Ctrl-C that lands while torch loads: the first second of every hmlib command
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
{call}
"""


@pytest.mark.parametrize("call", ["from hmlib.console import main; raise SystemExit(main(['--version']))",
                                  "import runpy; runpy.run_module('hmlib', run_name='__main__')"])
def test_ctrl_c_while_hmlib_loads_is_an_interruption_not_a_traceback(call):
    """The console script and `python -m hmlib` import the command line under the interrupt handler: a Ctrl-C in
    the first second (torch loading) used to print the import's traceback."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_AT_TORCH.format(call=call)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 130 and proc.stderr.strip() == "hmlib: interrupted", proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_console_script_is_the_light_entry_point():
    """pyproject's script is hmlib.console:main, which loads neither torch nor numpy before its handler is in place,
    and exits as hmlib.cli does on an interruption."""
    from hmlib import cli, console

    assert 'hmlib = "hmlib.console:main"' in (REPO / "pyproject.toml").read_text()
    assert console.EXIT_INTERRUPTED == cli.EXIT_INTERRUPTED
    proc = subprocess.run([sys.executable, "-c", "import sys, hmlib.console; print(sorted({'torch', 'numpy'} & "
                           "set(sys.modules)))"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
