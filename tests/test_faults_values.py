"""Fault pass (issue 19): non-finite numbers in a config are refused with one line naming the key.

A JSON ``1e400`` is infinity: it passed every range rule (``inf > 0``) and an inner lr of 1e400 printed chance as a
normal result. NaN from Python overrides is refused the same way. (Command-line values that mean nothing are in
``test_faults_run`` and ``test_faults_cluster``.)
"""
from __future__ import annotations

import json

import nbformat
import pytest

from hmlib import cli
from hmlib.config import ConfigError, load_config


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


# ------------------------------------------------------------------------------------ config values

@pytest.mark.parametrize("text, message", [
    ('{"adapt": {"inner_lr": 1e400}}', "adapt.inner_lr must be a finite number > 0, got inf"),
    ('{"adapt": {"inner_lr": -1e400}}', "adapt.inner_lr must be a finite number > 0, got -inf"),
    ('{"adapt": {"balance_weight": 1e400}}', "adapt.balance_weight must be a finite number >= 0, got inf"),
    ('{"meta": {"grad_clip": 1e999}}', "meta.grad_clip must be a finite number > 0, got inf"),
    ('{"ablation": {"lr_grid": [0.1, 1e400]}}', "ablation.lr_grid[1] must be a finite number > 0, got inf"),
])
def test_infinite_numbers_in_a_config_file_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config("smoke", path)
    assert str(err.value) == message


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_overrides_are_refused_for_every_float_field(value):
    with pytest.raises(ConfigError, match=r"^vae\.lr must be a finite number > 0, got (-?inf|nan)$"):
        load_config("smoke", overrides={"vae": {"lr": value}})
    with pytest.raises(ConfigError, match=r"^backbone\.weight_decay must be a finite number >= 0, got"):
        load_config("smoke", overrides={"backbone": {"weight_decay": value}})


def test_hmlib_run_refuses_an_infinite_inner_lr_before_any_kernel(tmp_path, series, hmlib_home, capsys):
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"adapt": {"inner_lr": 1e400}}).replace("Infinity", "1e400"))
    assert cli.main(["run", "--config", str(config), "--notebooks", str(series), "--quiet"]) == 2
    assert _one_error_line(capsys) == "hmlib: error: adapt.inner_lr must be a finite number > 0, got inf"
    assert not list(hmlib_home.glob("*.ran"))
