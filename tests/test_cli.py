"""The hmlib command's error handling: one 'hmlib: error:' line and status 2, tracebacks only for bugs or --debug."""
from __future__ import annotations

import json

import pytest

from hmlib import cli, runner
from hmlib.artifacts import ArtifactError, StaleArtifactError, save_checkpoint
from hmlib.config import ConfigError, config_to_dict, load_config
from hmlib.data.registry import DatasetError
from hmlib.errors import HmlibError
from hmlib.evaluation import EvalError
from hmlib.hyper import MetaTrainingError
from hmlib.reports import ReportError
from hmlib.runner import RunnerError
from hmlib.vae import VAETrainingError


def _one_error_line(capsys, prefix="hmlib: error: "):
    """The single error line on stderr (asserting there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), err
    return lines[0]


@pytest.fixture()
def notebooks(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    return folder  # empty: every case below must fail before a notebook is looked for or a kernel starts


@pytest.fixture()
def checkpoint(tmp_path):
    """A minimal checkpoint carrying what `hmlib eval` reads before evaluating: its config (no weights)."""
    return save_checkpoint(tmp_path / "hyper.pt", {}, {"kind": "hypernet",
                                                       "config": config_to_dict(load_config("smoke"))})


def _write(tmp_path, content, name="cfg.json"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("args_of, expected", [
    (lambda tmp, nbs: ["run", "--profile", "nope", "--notebooks", nbs],
     "hmlib: error: unknown profile 'nope'; choose one of: default, smoke, seed"),
    (lambda tmp, nbs: ["run", "--config", _write(tmp, '{"meta": {"iterations": -1}}'), "--notebooks", nbs],
     "hmlib: error: meta.iterations must be an integer >= 1, got -1"),
    (lambda tmp, nbs: ["run", "--config", _write(tmp, '{"data": {"test_fraction": "0.2"}}'), "--notebooks", nbs],
     "hmlib: error: data.test_fraction must be a number > 0 and < 1, got '0.2' (a string)"),
    (lambda tmp, nbs: ["run", "--config", _write(tmp, '{"task": {"num_imagez": 3}}'), "--notebooks", nbs],
     "hmlib: error: unknown config key 'task.num_imagez'; valid keys here: mode, num_classes, num_images"),
    (lambda tmp, nbs: ["run", "--config", _write(tmp, b'{"task": \xff}'), "--notebooks", nbs],
     "hmlib: error: config file {tmp}/cfg.json is not UTF-8 text (byte 0xff at offset 9); save it as UTF-8 JSON"),
    (lambda tmp, nbs: ["run", "--config", _write(tmp, '{"task": }'), "--notebooks", nbs],
     "hmlib: error: config file {tmp}/cfg.json is not valid JSON: line 1, column 10: Expecting value"),
    (lambda tmp, nbs: ["run", "--config", tmp, "--notebooks", nbs],
     "hmlib: error: config file {tmp} is a directory, not a JSON file"),
    (lambda tmp, nbs: ["run", "--config", tmp / "absent.json", "--notebooks", nbs],
     "hmlib: error: config file not found: {tmp}/absent.json"),
    (lambda tmp, nbs: ["run", "--only", "07", "--notebooks", nbs],
     "hmlib: error: no notebooks named NN_*.ipynb in {tmp}/nbs"),
    (lambda tmp, nbs: ["run", "--notebooks", tmp / "nowhere"],
     "hmlib: error: notebook folder not found: {tmp}/nowhere"),
    (lambda tmp, nbs: ["run", "--timeout", "soon"],
     "hmlib: error: argument --timeout: invalid int value: 'soon' (see: hmlib run --help)"),
    (lambda tmp, nbs: ["frobnicate"],
     "hmlib: error: argument COMMAND: invalid choice: 'frobnicate' (choose from 'run', 'eval', 'benchmark', 'cluster', 'results') (see: hmlib --help)"),
])
def test_run_and_usage_errors_are_one_line_with_status_2(tmp_path, notebooks, capsys, args_of, expected):
    args = [str(a) for a in args_of(tmp_path, notebooks)]
    assert cli.main(args + (["--quiet"] if args[0] == "run" else [])) == 2
    assert _one_error_line(capsys) == expected.format(tmp=tmp_path)


def test_eval_errors_are_one_line_with_status_2(tmp_path, checkpoint, capsys):
    missing = tmp_path / "missing.pt"
    assert cli.main(["eval", "--checkpoint", str(missing), "--dataset", "mnist"]) == 2
    assert _one_error_line(capsys) == f"hmlib: error: checkpoint not found: {missing}"

    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--dataset", "mnist", "--tasks", "0"]) == 2
    assert _one_error_line(capsys) == ("hmlib: error: argument --tasks: expected an integer >= 2, got 0 "
                                       "(see: hmlib eval --help)")

    garbage = _write(tmp_path, b"not a torch file", "garbage.pt")
    assert cli.main(["eval", "--checkpoint", str(garbage), "--dataset", "mnist"]) == 2
    assert "is corrupt or not an hmlib checkpoint" in _one_error_line(capsys)

    bad_utf8 = _write(tmp_path, b'{"eval": {"num_tasks": "\xe9"}}')
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--dataset", "mnist", "--config", str(bad_utf8)]) == 2
    assert "is not UTF-8 text" in _one_error_line(capsys)

    bad_value = _write(tmp_path, json.dumps({"eval": {"num_tasks": 0}}), "value.json")
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--dataset", "mnist", "--config", str(bad_value)]) == 2
    assert "eval.num_tasks must be an integer >= 2, got 0" in _one_error_line(capsys)

    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--dataset", "emnist"]) == 2
    assert "unknown dataset 'emnist'" in _one_error_line(capsys)


@pytest.mark.parametrize("args, expected", [
    (["--shapes", "4by64"], "argument --shapes: expected a task shape KxN such as 4x256, got '4by64' "
                            "(see: hmlib eval --help)"),
    (["--shapes", "4x256", "1x8"], "argument --shapes: a task shape KxN needs K >= 2 and N >= 2K, got '1x8' "
                                   "(see: hmlib eval --help)"),
    (["--shapes", "4x6"], "argument --shapes: a task shape KxN needs K >= 2 and N >= 2K, got '4x6' "
                          "(see: hmlib eval --help)"),
    (["--steps", "-1"], "argument --steps: expected an integer >= 0, got -1 (see: hmlib eval --help)"),
    (["--setting", "few_shot"], "argument --setting: invalid choice: 'few_shot' (choose from 'zero_shot', "
                                "'transductive') (see: hmlib eval --help)"),
    (["--dataset", "mnist", "emnist+rotate"], "unknown dataset 'emnist'; registered: fashion_mnist, hebrew_chars, "
                                              "kmnist, math_shapes, mnist. For a local mirror folder pass --data-dir "
                                              "DIR with DIR/NAME/{train,test}.parquet"),
])
def test_eval_grid_arguments_are_checked_before_any_model_loads(checkpoint, capsys, args, expected):
    """Task shapes, step counts, settings and shifted dataset names are refused in one line (the checkpoint here
    holds no weights: nothing past the arguments may run)."""
    assert cli.main(["eval", "--checkpoint", str(checkpoint), *args]) == 2
    assert _one_error_line(capsys) == f"hmlib: error: {expected}"


def test_an_unknown_corruption_names_the_registered_ones(checkpoint, capsys):
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--dataset", "mnist+nope"]) == 2
    line = _one_error_line(capsys)
    assert "unknown corruption 'nope'" in line and "rotate" in line and "shot_noise" in line


def test_debug_reraises_with_the_traceback(notebooks):
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        cli.main(["--debug", "run", "--profile", "nope", "--notebooks", str(notebooks)])
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):  # after the subcommand too
        cli.main(["run", "--profile", "nope", "--notebooks", str(notebooks), "--debug"])


def _raising(exc):
    def run_notebooks(*args, **kwargs):
        raise exc
    return run_notebooks


def test_multi_line_messages_keep_their_further_lines(monkeypatch, capsys):
    stale = StaleArtifactError("models/vae.pt was made with other settings or inputs:\n"
                               "  latent_dim: recorded 16, expected 32\n  epochs: recorded 1, expected 4")
    monkeypatch.setattr(runner, "run_notebooks", _raising(stale))
    assert cli.main(["run", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["hmlib: error: models/vae.pt was made with other settings or inputs:",
                                "  latent_dim: recorded 16, expected 32", "  epochs: recorded 1, expected 4"]


@pytest.mark.parametrize("exc, expected", [
    (FileNotFoundError(2, "No such file or directory", "/data/x.parquet"),
     "hmlib: error: No such file or directory: /data/x.parquet"),
    (PermissionError(13, "Permission denied", "/root/models"), "hmlib: error: Permission denied: /root/models"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
     "hmlib: error: cannot read text as utf-8: invalid start byte (byte offset 0)"),
    (DatasetError("unknown dataset 'emnist'; registered: mnist"),
     "hmlib: error: unknown dataset 'emnist'; registered: mnist"),
    (MetaTrainingError("meta-training diverged"), "hmlib: error: meta-training diverged"),
    (EvalError(""), "hmlib: error: EvalError"),
])
def test_user_errors_from_anywhere_are_one_line(monkeypatch, capsys, exc, expected):
    monkeypatch.setattr(runner, "run_notebooks", _raising(exc))
    assert cli.main(["run", "--quiet"]) == 2
    assert _one_error_line(capsys) == expected


def test_ctrl_c_outside_a_notebook_is_interrupted_130(monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_notebooks", _raising(KeyboardInterrupt()))
    assert cli.main(["run", "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "hmlib: interrupted"


def test_a_bug_keeps_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_notebooks", _raising(ZeroDivisionError("division by zero")))
    assert cli.main(["run", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError: division by zero" in err
    last = err.strip().splitlines()[-1]
    assert "--debug" in last and "report" in last and "ZeroDivisionError" in last
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "run", "--quiet"])


@pytest.mark.parametrize("error_class", [ConfigError, DatasetError, ArtifactError, StaleArtifactError, EvalError,
                                         RunnerError, MetaTrainingError, VAETrainingError, ReportError])
def test_package_errors_share_the_base_and_keep_their_old_bases(error_class):
    assert issubclass(error_class, HmlibError)
    assert issubclass(error_class, (ValueError, RuntimeError))
