"""The notebook runner on tiny throwaway notebooks: injection, order, selection, failures, HTML."""
from __future__ import annotations

import json
import re

import nbformat
import pytest

from hmlib import cli, reports
from hmlib.runner import RunnerError, discover_notebooks, inject_parameters, select_notebooks

PARAMETERS_SOURCE = 'profile = "default"\nconfig_path = None'


def _write_notebook(folder, name, *code_cells, tags=None, markdown="# A tiny notebook"):
    """A notebook with a heading, a tagged parameters cell, then ``code_cells``."""
    v4 = nbformat.v4
    nb = v4.new_notebook()
    nb.cells = [v4.new_markdown_cell(markdown), v4.new_code_cell(PARAMETERS_SOURCE, metadata={"tags": ["parameters"]})]
    for i, source in enumerate(code_cells):
        nb.cells.append(v4.new_code_cell(source, metadata={"tags": (tags or {}).get(i, [])}))
    path = folder / name
    nbformat.write(nb, str(path))
    return path


def _log_cell(name):
    """Code appending this notebook's name and parameters to order.log under HMLIB_HOME."""
    return ("import json, os, pathlib\n"
            "log = pathlib.Path(os.environ['HMLIB_HOME']) / 'order.log'\n"
            f"with log.open('a') as fh: fh.write(json.dumps(['{name}', profile, config_path]) + '\\n')")


@pytest.fixture()
def series(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    for name in ("01_first.ipynb", "02_second.ipynb", "03_third.ipynb"):
        _write_notebook(folder, name, _log_cell(name[:2]))
    (folder / "scratch.ipynb").write_text("{}")  # not part of the series: no NN_ prefix
    (folder / "1_bad.ipynb").write_text("{}")
    return folder


def _order(home):
    path = home / "order.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_discover_keeps_only_numbered_notebooks_in_order(series):
    assert [p.name for p in discover_notebooks(series)] == ["01_first.ipynb", "02_second.ipynb", "03_third.ipynb"]


def test_select_only_and_from(series):
    nbs = discover_notebooks(series)
    assert [p.stem for p in select_notebooks(nbs, only=["02"])] == ["02_second"]
    assert [p.stem for p in select_notebooks(nbs, only=["third,01_first.ipynb"])] == ["01_first", "03_third"]
    assert [p.stem for p in select_notebooks(nbs, only=["second"])] == ["02_second"]
    assert [p.stem for p in select_notebooks(nbs, start="02_second")] == ["02_second", "03_third"]
    assert select_notebooks(nbs) == nbs
    with pytest.raises(RunnerError, match="no notebook matches '07'.*01_first, 02_second, 03_third"):
        select_notebooks(nbs, only=["07"])
    with pytest.raises(RunnerError, match="either --only or --from"):
        select_notebooks(nbs, only=["01"], start="02")


def test_inject_parameters_goes_after_tagged_cell_and_replaces_previous(series):
    nb = nbformat.read(series / "01_first.ipynb", as_version=4)
    index = inject_parameters(nb, {"profile": "smoke", "config_path": None})
    assert index == 2 and nb.cells[1].metadata.tags == ["parameters"]
    assert "profile = 'smoke'" in nb.cells[index].source and "config_path = None" in nb.cells[index].source
    assert inject_parameters(nb, {"profile": "seed", "config_path": "/x.json"}) == 2
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "profile = 'seed'" in injected[0].source


def test_inject_parameters_without_tagged_cell_goes_first():
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1")]
    assert inject_parameters(nb, {"profile": "smoke"}) == 0
    assert nb.cells[0].source.endswith("profile = 'smoke'")


def test_run_injects_profile_and_config_in_order_and_writes_reports(series, hmlib_home, tmp_path, capsys):
    config = tmp_path / "override.json"
    config.write_text(json.dumps({"task": {"num_images": 32}}))
    rc = cli.main(["run", "--profile", "smoke", "--config", str(config), "--notebooks", str(series), "--quiet"])
    assert rc == 0
    assert _order(hmlib_home) == [["01", "smoke", str(config.resolve())], ["02", "smoke", str(config.resolve())],
                                  ["03", "smoke", str(config.resolve())]]
    out = hmlib_home / "reports"
    for stem in ("01_first", "02_second", "03_third"):
        executed = nbformat.read(out / f"{stem}.ipynb", as_version=4)
        assert executed.metadata.hmlib["status"] == "ok"
        assert executed.metadata.hmlib["parameters"] == {"profile": "smoke", "config_path": str(config.resolve())}
        assert (out / f"{stem}.html").is_file()
    index = (out / "index.html").read_text()
    assert all(f"href='{stem}.html'" in index for stem in ("01_first", "02_second", "03_third"))
    log = reports.read_run_log()
    assert set(log) == {"01_first", "02_second", "03_third"} and all(r["wall_s"] > 0 for r in log.values())
    assert "total" in capsys.readouterr().out


def test_only_and_from_run_just_those(series, hmlib_home):
    assert cli.main(["run", "--profile", "smoke", "--only", "02", "--notebooks", str(series), "--quiet"]) == 0
    assert [row[0] for row in _order(hmlib_home)] == ["02"]
    assert cli.main(["run", "--profile", "smoke", "--from", "02", "--notebooks", str(series), "--quiet"]) == 0
    assert [row[0] for row in _order(hmlib_home)] == ["02", "02", "03"]
    assert not (hmlib_home / "reports" / "01_first.html").exists()
    index = (hmlib_home / "reports" / "index.html").read_text()
    assert "not run" in index  # 01_first is listed although it never ran
    assert "different settings" not in index


def test_the_index_says_when_reports_come_from_runs_with_other_settings(series, hmlib_home, tmp_path):
    """Each notebook's record keeps a fingerprint of the settings it ran with; a later run of one notebook with
    another config leaves the series mixed, and index.html says so instead of presenting one run."""
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(series), "--quiet"]) == 0
    log = reports.read_run_log()
    assert len({r["settings"] for r in log.values()}) == 1 and all(r["settings"] for r in log.values())
    assert "different settings" not in (hmlib_home / "reports" / "index.html").read_text()
    config = tmp_path / "other.json"
    config.write_text(json.dumps({"task": {"num_images": 32}}))
    assert cli.main(["run", "--profile", "smoke", "--config", str(config), "--only", "02", "--notebooks", str(series),
                     "--quiet"]) == 0
    log = reports.read_run_log()
    assert log["02_second"]["settings"] != log["01_first"]["settings"] == log["03_third"]["settings"]
    index = (hmlib_home / "reports" / "index.html").read_text()
    assert "different settings" in index and "02_second: smoke · " + log["02_second"]["settings"][:8] in index


def test_failure_names_notebook_cell_and_error_and_stops(tmp_path, hmlib_home, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    _write_notebook(folder, "01_ok.ipynb", _log_cell("01"))
    _write_notebook(folder, "02_broken.ipynb", "x = 1", "y = 2  # the culprit\nraise ValueError('boom ' + str(x + y))")
    _write_notebook(folder, "03_never.ipynb", _log_cell("03"))
    rc = cli.main(["run", "--profile", "smoke", "--notebooks", str(folder), "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "02_broken.ipynb" in err and "cell 3" in err and "y = 2  # the culprit" in err
    assert "ValueError: boom 3" in err
    assert [row[0] for row in _order(hmlib_home)] == ["01"]  # 03 never ran
    out = hmlib_home / "reports"
    assert (out / "02_broken.html").is_file() and "boom 3" in (out / "02_broken.html").read_text()
    assert not (out / "03_never.html").exists()
    assert reports.read_run_log()["02_broken"]["status"] == "failed"


def test_a_cell_past_the_timeout_says_so_and_how_to_raise_it(tmp_path, hmlib_home, capsys):
    """nbclient's CellTimeoutError message ends in a row of dashes, which used to be all the user was told."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    _write_notebook(folder, "01_slow.ipynb", "import time\ntime.sleep(30)")
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(folder), "--quiet", "--timeout", "2"]) != 0
    err = capsys.readouterr().err
    assert "01_slow.ipynb, cell 2 [first line: import time]: CellTimeoutError: the cell ran past the per-cell " \
           "timeout; raise --timeout (0 for none)" in err and "----" not in err


def test_bad_profile_or_config_fails_before_any_kernel(series, hmlib_home, tmp_path, capsys):
    assert cli.main(["run", "--profile", "nope", "--notebooks", str(series), "--quiet"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"task": {"num_imagez": 3}}))
    assert cli.main(["run", "--config", str(bad), "--notebooks", str(series), "--quiet"]) == 2
    assert "num_imagez" in capsys.readouterr().err
    assert cli.main(["run", "--only", "9", "--notebooks", str(series), "--quiet"]) == 2
    assert _order(hmlib_home) == []


def test_html_is_offline_hides_tagged_inputs_and_shows_each_figure_once(tmp_path, hmlib_home):
    folder = tmp_path / "nbs"
    folder.mkdir()
    setup = ("import matplotlib.pyplot as plt  # SETUP-SECRET\nimport hmlib.plots\nhmlib.plots.set_style()\n"
             "def plot():\n    fig, ax = plt.subplots()\n    ax.plot([0, 1])\n    return fig")
    _write_notebook(folder, "01_fig.ipynb", setup, "plot()", "plot();\nprint('visible output')",
                    tags={0: ["hide-input"]})
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(folder), "--quiet"]) == 0
    executed = nbformat.read(hmlib_home / "reports" / "01_fig.ipynb", as_version=4)
    images = [sum("image/png" in out.get("data", {}) for out in cell.outputs) for cell in executed.cells[-2:]]
    assert images == [1, 1], "a returned figure must be shown once, not again by the inline backend's flush"
    page = (hmlib_home / "reports" / "01_fig.html").read_text()
    assert "SETUP-SECRET" not in page and "visible output" in page
    assert page.count('src="data:image/png;base64,') == 2  # the template's CSS holds one more data: PNG
    assert not re.search(r"<script[^>]+src=", page), "report loads an external script"
    assert not re.search(r"""(src|href)=["']https?://""", page), "report references a remote resource"
    assert "<title>A tiny notebook</title>" in page


def test_unreadable_notebook_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "nbs"
    folder.mkdir()
    (folder / "01_broken.ipynb").write_text("{ not json")
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(folder), "--quiet"]) == 2
    assert "cannot read notebook" in capsys.readouterr().err


def test_cli_registers_run_and_eval_subcommands(capsys):
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"run", "eval"} <= set(commands)
    args = parser.parse_args(["run", "--profile", "smoke", "--only", "01", "--only", "03", "--timeout", "5"])
    assert (args.profile, args.only, args.timeout, args.start) == ("smoke", ["01", "03"], 5, None)
    assert cli.main([]) == 2 and "COMMAND" in capsys.readouterr().err


def test_a_resumed_or_retrained_stage_is_announced_on_the_terminal(tmp_path, hmlib_home, capsys):
    """A notebook's "Resuming ..." line used to reach only its HTML report; now `hmlib run` repeats resumes,
    retrains, set-aside artifacts and notes on stderr as they are printed, and nothing else of the cells' output."""
    folder = tmp_path / "nbs"
    folder.mkdir()
    _write_notebook(folder, "01_stage.ipynb",
                    "import sys\nprint('epoch 1 of 3, a routine line')\n"
                    "print('Resuming meta-training from hypernet_seed0-x.pt at iteration 3/10.', end='')\n"
                    "sys.stdout.flush()\nprint(' ')\nprint('backbone_seed0-y.pt cannot be reused: made with other "
                    "settings; kept it as backbone_seed0-y.stale-1.pt and building a new one.')\n"
                    "print('Resuming on stderr is not announced', file=sys.stderr)")
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(folder)]) == 0
    err = capsys.readouterr().err
    assert "  01_stage: Resuming meta-training from hypernet_seed0-x.pt at iteration 3/10." in err
    assert "  01_stage: backbone_seed0-y.pt cannot be reused: made with other settings" in err
    assert "a routine line" not in err and "on stderr is not announced" not in err
    assert cli.main(["run", "--profile", "smoke", "--notebooks", str(folder), "--quiet"]) == 0
    assert "Resuming" not in capsys.readouterr().err  # --quiet: nothing
