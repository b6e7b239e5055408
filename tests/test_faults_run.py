"""Fault pass (issue 19) on ``hmlib run``: values that mean nothing, disks it cannot write, relative paths.

A negative ``--timeout`` meant no timeout and ``--only ''`` ran nothing and exited 0; a read-only or full
``HMLIB_HOME`` was found out only when the first report was written (a traceback labelled a bug), a full disk
inside a notebook showed torch's internal "unexpected pos"; a relative HMLIB_HOME meant another folder in the
kernels (whose working directory is the notebooks folder) than in the runner. Read-only and full disks are
simulated by monkeypatching (root ignores chmod), and also real where a tmpfs can be mounted.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import nbformat
import pytest

from hmlib import artifacts, cli
from hmlib.data.registry import repo_relative
from hmlib.paths import REPO_ROOT
from hmlib.runner import RunnerError, discover_notebooks, kernel_environment, run_notebooks, select_notebooks
from test_faults_storage import _fail_under, tiny_disk  # noqa: F401  (tiny_disk is a fixture used by name)

KERNEL_CELL = """import json, os, pathlib
from hmlib import paths
paths.home().mkdir(parents=True, exist_ok=True)
(paths.home() / 'from-kernel.json').write_text(json.dumps({
    'home': str(paths.home()), 'HMLIB_HOME': os.environ['HMLIB_HOME'],
    'HMLIB_DATA_DIR': os.environ['HMLIB_DATA_DIR'], 'cwd': os.getcwd()}))"""


def _one_error_line(capsys, prefix="hmlib: error: ") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


@pytest.fixture()
def series(tmp_path):
    """Two notebooks that each leave a mark under HMLIB_HOME when they run."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    for name in ("01_first", "02_second"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(
            f"import os, pathlib; pathlib.Path(os.environ['HMLIB_HOME'], '{name}.ran').touch()")]
        nbformat.write(nb, str(folder / f"{name}.ipynb"))
    return folder


# ------------------------------------------------------------------------------------ hmlib run values

@pytest.mark.parametrize("argv, expected", [
    (["--timeout", "-5"], "argument --timeout: must be 0 (no timeout) or a positive number of seconds, got -5"),
    (["--only", ""], "--only '' selects no notebook; name at least one, e.g. --only 01"),
    (["--only", " , "], "--only ' , ' selects no notebook; name at least one, e.g. --only 01"),
    (["--from", ""], "--from '' names no notebook; give one, e.g. --from 02"),
    (["--config", ""], "--config '' names no file; give the path of a JSON file or leave --config out"),
])
def test_run_values_that_mean_nothing_are_refused(series, hmlib_home, capsys, argv, expected):
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(series), "--quiet", *argv]) == 2
    assert _one_error_line(capsys).startswith(f"hmlib: error: {expected}")
    assert not list(hmlib_home.glob("*.ran")) and not (hmlib_home / "reports").exists()


def test_run_api_refuses_negative_timeouts_and_empty_selections(series):
    with pytest.raises(RunnerError, match="--timeout must be a positive number of seconds, or 0"):
        run_notebooks("smoke", timeout=-1, notebooks_dir=series, progress=False)
    with pytest.raises(RunnerError, match="selects no notebook"):
        select_notebooks(discover_notebooks(series), only=[])
    with pytest.raises(RunnerError, match="names no notebook"):
        select_notebooks(discover_notebooks(series), start=" ")


def test_timeout_zero_still_means_none():
    args = cli.build_parser().parse_args(["run", "--timeout", "0"])
    assert args.timeout == 0


# ------------------------------------------------------------------------------------ disks

def _marker_series(folder: Path) -> Path:
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, pathlib; pathlib.Path(os.environ['MARKER']).touch()")]
    nbformat.write(nb, str(folder / "01_marker.ipynb"))
    return folder


def test_hmlib_run_refuses_a_read_only_home_before_any_kernel_starts(tmp_path, hmlib_home, monkeypatch, capsys):
    series = _marker_series(tmp_path / "nbs")
    monkeypatch.setenv("MARKER", str(tmp_path / "ran"))
    _fail_under(monkeypatch, hmlib_home, errno.EROFS)
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(series), "--quiet"]) == 2
    assert _one_error_line(capsys) == (f"hmlib: error: cannot write {hmlib_home}: the file system is read-only "
                                       "(EROFS); set HMLIB_HOME to a writable folder with room")
    assert not (tmp_path / "ran").exists()


def test_hmlib_run_refuses_a_full_home_before_any_kernel_starts(tmp_path, hmlib_home, monkeypatch, capsys):
    series = _marker_series(tmp_path / "nbs")
    monkeypatch.setenv("MARKER", str(tmp_path / "ran"))
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(series), "--quiet"]) == 2
    assert "only 0.0 MiB free on its disk (the artifact folder (HMLIB_HOME) needs" in _one_error_line(capsys)
    assert not (tmp_path / "ran").exists()


def test_real_read_only_home_in_hmlib_run(tiny_disk, tmp_path, monkeypatch, capsys):
    series = _marker_series(tmp_path / "nbs")
    monkeypatch.setenv("MARKER", str(tmp_path / "ran"))
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    monkeypatch.setenv("HMLIB_HOME", str(tiny_disk))
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(series), "--quiet"]) == 2
    assert _one_error_line(capsys).startswith(f"hmlib: error: cannot write {tiny_disk}: the file system is read-only")
    assert not (tmp_path / "ran").exists()


def test_real_full_disk_inside_a_notebook_names_the_file_not_torch_internals(tiny_disk, tmp_path, monkeypatch,
                                                                             capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import os, pathlib, torch\nfrom hmlib.artifacts import save_checkpoint\n"
        "save_checkpoint(pathlib.Path(os.environ['HMLIB_HOME'], 'models', 'big.pt'), "
        "{'w': torch.zeros(12 << 20)}, {'kind': 'test'})")]
    nbformat.write(nb, str(folder / "01_big.ipynb"))
    monkeypatch.setenv("HMLIB_HOME", str(tiny_disk))
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(folder), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "StorageError: cannot write" in err and "big.pt: no space left on the disk (ENOSPC" in err
    assert "unexpected pos" not in err


# ------------------------------------------------------------------------------------ relative paths

def test_relative_home_is_the_same_folder_in_the_kernel(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(KERNEL_CELL)]
    nbformat.write(nb, str(folder / "01_where.ipynb"))
    work = tmp_path / "work"
    (work / "mirror").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HMLIB_HOME", "rel/home")
    monkeypatch.setenv("HMLIB_DATA_DIR", "mirror")
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(folder), "--quiet"]) == 0, capsys.readouterr()
    home = work / "rel" / "home"
    seen = json.loads((home / "from-kernel.json").read_text())
    assert seen["home"] == seen["HMLIB_HOME"] == str(home)
    # a relative HMLIB_DATA_DIR is taken from the repository root, as `hmlib eval`, `hmlib cluster` and a notebook
    # opened in Jupyter take it (the kernels used to take it from the cwd: one setting, two folders)
    assert seen["HMLIB_DATA_DIR"] == str(repo_relative("mirror")) and seen["cwd"] == str(folder)  # the notebooks'
    assert (home / "reports" / "01_where.html").is_file()  # the runner's own writes: the same folder
    assert not (folder / "rel").exists()  # nothing under the notebooks folder


def test_kernel_environment_makes_paths_absolute_and_leaves_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HMLIB_HOME", "~/h")
    monkeypatch.setenv("HMLIB_DATA_DIR", "../data")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["src", "", "/abs/lib"]))
    monkeypatch.setenv("OTHER", "relative/kept")
    env = kernel_environment()
    assert env["HMLIB_HOME"] == os.path.expanduser("~/h")
    assert env["HMLIB_DATA_DIR"] == str(repo_relative("../data")) == str((REPO_ROOT.parent / "data").resolve())
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "src"), str(tmp_path), "/abs/lib"]
    assert env["OTHER"] == "relative/kept"
    monkeypatch.delenv("HMLIB_HOME")
    monkeypatch.setenv("HMLIB_DATA_DIR", "")
    env = kernel_environment()
    assert "HMLIB_HOME" not in env and env["HMLIB_DATA_DIR"] == ""  # unset stays unset: the repository root


def test_make_clean_reports_removes_the_artifact_homes_reports(tmp_path):
    """A second first-hour audit: with HMLIB_HOME set, `make clean-reports` removed reports/ of the repository and
    left the home's, which every command had written to."""
    import shutil

    from hmlib.paths import REPO_ROOT
    if shutil.which("make") is None:
        pytest.fail("make is needed to run the README's commands")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under make test
    for home, removed in ((str(tmp_path), f'rm -rf "{tmp_path}/reports"'), ("", 'rm -rf "./reports"')):
        proc = subprocess.run(["make", "--no-print-directory", "-n", "clean-reports"], cwd=REPO_ROOT,
                              env={**env, "HMLIB_HOME": home}, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == removed
