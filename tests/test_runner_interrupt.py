"""Ctrl-C during `hmlib run`: the running cell is named, the partial report written, no kernel process survives."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from hmlib import reports

REPO = Path(__file__).resolve().parents[1]
LONG_CELL_FIRST_LINE = "import os, pathlib, subprocess, sys, time  # the long cell"


def _long_cell(ignore_sigint: bool) -> str:
    """Start a grandchild process, record both pids under HMLIB_HOME, then sleep far past the test's patience."""
    return "\n".join([
        LONG_CELL_FIRST_LINE,
        *(["import signal", "signal.signal(signal.SIGINT, signal.SIG_IGN)"] if ignore_sigint else []),
        # the grandchild ignores SIGINT (and so prints no traceback of its own): only a kill of the group ends it
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(300)'])",
        "home = pathlib.Path(os.environ['HMLIB_HOME'])",
        "(home / 'pids.tmp').write_text(f'{os.getpid()} {child.pid}')",
        "os.replace(home / 'pids.tmp', home / 'pids')  # atomic: the test never reads half a file",
        "time.sleep(300)",
    ])


def _write_series(folder: Path, ignore_sigint: bool) -> None:
    v4 = nbformat.v4
    nb = v4.new_notebook()
    nb.cells = [v4.new_markdown_cell("# Sleepy"),
                v4.new_code_cell('profile = "default"\nconfig_path = None', metadata={"tags": ["parameters"]}),
                v4.new_code_cell("x = 1"), v4.new_code_cell(_long_cell(ignore_sigint)), v4.new_code_cell("y = 2")]
    nbformat.write(nb, str(folder / "01_sleepy.ipynb"))
    later = v4.new_notebook()
    later.cells = [v4.new_code_cell("import os, pathlib\npathlib.Path(os.environ['HMLIB_HOME'], 'later-ran').touch()")]
    nbformat.write(later, str(folder / "02_later.ipynb"))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow  # 19-25 s per case on a loaded 2-core machine (interpreter and kernel start, HTML export)
@pytest.mark.parametrize("ignore_sigint", [False, True], ids=["cell-stops", "cell-ignores-sigint"])
def test_sigint_interrupts_names_the_cell_and_leaves_no_kernel(tmp_path, hmlib_home, ignore_sigint):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _write_series(folder, ignore_sigint)
    proc = subprocess.Popen([sys.executable, "-m", "hmlib", "run", "--profile", "smoke", "--notebooks", str(folder),
                             "--quiet"], cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids_file = hmlib_home / "pids"
    try:
        deadline = time.monotonic() + 180
        while not pids_file.exists():
            assert proc.poll() is None, f"hmlib run ended before the long cell started: {proc.communicate()}"
            assert time.monotonic() < deadline, "the long cell never started"
            time.sleep(0.2)
        kernel_pid, grandchild_pid = map(int, pids_file.read_text().split())
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert {kernel_pid, grandchild_pid} <= {p.pid for p in descendants}
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        if ignore_sigint:  # the kernel shrugs off the interrupt: a second Ctrl-C stops it at once
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"hmlib run: interrupted in 01_sleepy.ipynb, cell 3 ({LONG_CELL_FIRST_LINE})"), err
    assert "partial report:" in lines[0] and "01_sleepy.html" in lines[0]

    deadline = time.monotonic() + 10
    while not all(_gone(p.pid) for p in descendants) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [(p.pid, p.cmdline()) for p in descendants if not _gone(p.pid)]
    assert not alive, f"processes of the run survived: {alive}"
    assert _gone(kernel_pid) and _gone(grandchild_pid)

    out_dir = hmlib_home / "reports"
    executed = nbformat.read(out_dir / "01_sleepy.ipynb", as_version=4)
    assert executed.metadata.hmlib["status"] == "interrupted"
    assert executed.metadata.hmlib["error"].startswith("interrupted in 01_sleepy.ipynb, cell 3 (")
    long_cell = next(c for c in executed.cells if c.source.startswith(LONG_CELL_FIRST_LINE))
    if not ignore_sigint:  # the interrupt reached the cell: its output shows where it stopped
        assert [o.get("ename") for o in long_cell.outputs if o.output_type == "error"] == ["KeyboardInterrupt"]
    assert (out_dir / "01_sleepy.html").is_file()
    assert reports.read_run_log()["01_sleepy"]["status"] == "interrupted"
    assert not (hmlib_home / "later-ran").exists() and not (out_dir / "02_later.html").exists()
    assert "01_sleepy" in out and "interrupted" in out  # the summary table still lists the run
