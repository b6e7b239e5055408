"""Fault pass (issue 19): an interrupted first ``make`` leaves a ``.venv`` without pip; the next ``make`` repairs it.

Each test points ``VENV`` at a scratch folder, so nothing is downloaded: ``make setup-venv`` only (re)creates the
virtual environment, and ``make -n setup`` shows whether the install would run (a dry run executes nothing).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args, f"PYTHON={sys.executable}"],
                          capture_output=True, text=True, env=env, timeout=300)


def has_pip(venv: Path) -> bool:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--version"], capture_output=True).returncode == 0


@pytest.fixture
def broken_venv(tmp_path) -> Path:
    """What a first make interrupted while creating .venv leaves: a python, no pip."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert (venv / "bin" / "python").exists() and not has_pip(venv)
    return venv


def test_a_venv_without_pip_is_recreated(broken_venv):
    result = make("setup-venv", f"VENV={broken_venv}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is missing or broken (no working" in result.stdout and "creating it afresh" in result.stdout
    assert has_pip(broken_venv)
    again = make("setup-venv", f"VENV={broken_venv}")  # a working one is left alone, silently
    assert again.returncode == 0 and again.stdout.strip() == "", again.stdout + again.stderr


def test_a_venv_without_python_is_recreated(broken_venv):
    for python in (broken_venv / "bin").glob("python*"):
        python.unlink()
    result = make("setup-venv", f"VENV={broken_venv}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert has_pip(broken_venv)


def test_a_folder_that_is_not_a_venv_is_never_deleted(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    result = make("setup-venv", f"VENV={folder}")
    assert result.returncode != 0
    assert f"{folder} exists but is not a virtual environment; move it away or set VENV=" in result.stderr
    assert (folder / "thesis.tex").read_text() == "precious"


def test_a_stamp_does_not_hide_a_broken_venv(broken_venv):
    """The install runs again when the venv cannot run pip, even if a (stale) stamp says it was done."""
    stamp = broken_venv / ".hmlib-installed"
    stamp.touch()  # newer than pyproject.toml
    dry = make("-n", "setup", f"VENV={broken_venv}")
    assert dry.returncode == 0, dry.stderr
    assert "creating it afresh" in dry.stdout and "-m pip install" in dry.stdout
    assert dry.stdout.rstrip().splitlines()[-1] == f"touch {stamp}"  # the stamp comes last, after the check
    assert not has_pip(broken_venv)  # a dry run changed nothing


def test_a_working_venv_with_its_stamp_is_up_to_date(broken_venv):
    assert make("setup-venv", f"VENV={broken_venv}").returncode == 0
    (broken_venv / ".hmlib-installed").touch()
    dry = make("-n", "setup", f"VENV={broken_venv}")
    assert dry.returncode == 0 and "pip install" not in dry.stdout, dry.stdout


def test_a_bad_profile_or_config_is_refused_before_anything_is_installed(broken_venv, tmp_path):
    """`make run PROFILE=nope` used to install the environment (minutes, gigabytes) before hmlib refused it."""
    for target in ("run", "benchmark", "benchmark-transductive", "folds"):
        result = make(target, "PROFILE=nope", f"VENV={broken_venv}")
        assert result.returncode != 0 and "PROFILE=nope is not a profile; choose one of: default smoke seed" in \
            result.stderr, result.stdout + result.stderr
        assert "creating it afresh" not in result.stdout and not has_pip(broken_venv)  # nothing repaired or installed
    result = make("run", f"CONFIG={tmp_path / 'missing.json'}", f"VENV={broken_venv}")
    assert result.returncode != 0 and "missing.json is not a file" in result.stderr and not has_pip(broken_venv)


def test_the_makefile_knows_the_profiles_of_the_package():
    from hmlib.config import PROFILES
    line = next(line for line in (REPO / "Makefile").read_text().splitlines() if line.startswith("PROFILES = "))
    assert line.split("=", 1)[1].split() == list(PROFILES)
