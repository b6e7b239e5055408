"""Reports without a kernel: headline tables, index.html, offline export of widgets and hidden inputs."""
from __future__ import annotations

import json
import re

import nbformat
import numpy as np
import pytest

from hmlib import paths, reports
from hmlib.reports import NotebookRecord, ReportError

ROWS = [{"method": "hypernet + TTA", "accuracy": np.float32(0.7125), "n": np.int64(256), "note": None},
        {"method": "k-means", "accuracy": 0.61, "n": 256, "extra": True}]


def test_record_headline_writes_flat_json_under_results(hmlib_home):
    path = reports.record_headline("meta_mnist", ROWS, "Held-out mnist", note="200 tasks")
    assert path == paths.results_dir() / "headlines" / "meta_mnist.json"
    data = json.loads(path.read_text())
    assert data["title"] == "Held-out mnist" and data["note"] == "200 tasks"
    assert data["columns"] == ["method", "accuracy", "n", "note", "extra"]
    assert data["rows"][0] == {"method": "hypernet + TTA", "accuracy": pytest.approx(0.7125), "n": 256, "note": None}
    assert not list(path.parent.glob(".hmlib-tmp-*"))


@pytest.mark.parametrize("key, rows, title, message", [
    ("../evil", ROWS, "t", "must be letters"),
    ("k", [], "t", "non-empty list"),
    ("k", ROWS, "  ", "title"),
    ("k", [{"a": [1, 2]}], "t", "row 0 column 'a'.*flat"),
    ("k", [{"a": np.zeros(3)}], "t", "array"),
    ("k", ["not a dict"], "t", "row 0 is str"),
])
def test_record_headline_rejects_bad_input(hmlib_home, key, rows, title, message):
    with pytest.raises(ReportError, match=message):
        reports.record_headline(key, rows, title)


def test_non_finite_numbers_become_empty_cells(hmlib_home):
    path = reports.record_headline("nan", [{"acc": float("nan")}], "t")
    assert json.loads(path.read_text())["rows"] == [{"acc": None}]


def test_index_lists_reports_wall_times_and_headlines(hmlib_home):
    (paths.reports_dir()).mkdir(parents=True)
    (paths.reports_dir() / "01_data.html").write_text("<html></html>")
    reports.update_run_log([
        NotebookRecord("01_data", "Data", "ok", 12.5, "smoke", "2026-01-01 00:00:00", "01_data.html"),
        NotebookRecord("02_vae", "VAE", "failed", 3.25, "smoke", "2026-01-01 00:01:00", "02_vae.html",
                       error="02_vae.ipynb, cell 4: RuntimeError: <bad>")])
    reports.record_headline("meta_mnist", ROWS, "Held-out mnist")
    (reports.headlines_dir() / "broken.json").write_text("{not json")
    page = reports.write_index(["01_data", "02_vae", "03_meta"]).read_text()
    assert "href='01_data.html'" in page
    assert "href='02_vae.html'" not in page  # its HTML does not exist: no dead link
    assert "12.5" in page and "3.2" in page and "15.8" in page  # per notebook and total
    assert "RuntimeError: &lt;bad&gt;" in page  # errors are escaped
    assert "03_meta" in page and "not run" in page
    assert "Held-out mnist" in page and "0.7125" in page and "hypernet + TTA" in page
    assert "broken" in page and "corrupt" in page  # a corrupt table is shown as such, not silently skipped
    assert "<script" not in page


def test_index_warns_only_where_records_differ_in_profile_or_settings(hmlib_home):
    """Records without a settings fingerprint (older logs) are compared by profile alone."""
    reports.update_run_log([NotebookRecord("01_a", "A", "ok", 1.0, "smoke", "t", None),
                            NotebookRecord("02_b", "B", "ok", 1.0, "smoke", "t", None, settings="abc")])
    assert "different settings" not in reports.write_index().read_text()
    reports.update_run_log([NotebookRecord("03_c", "C", "ok", 1.0, "smoke", "t", None, settings="def")])
    assert "different settings" in reports.write_index().read_text()
    reports.update_run_log([NotebookRecord("03_c", "C", "ok", 1.0, "default", "t", None)])
    page = reports.write_index().read_text()
    assert "different settings" in page and "03_c: default · ?" in page


def test_run_log_merges_records(hmlib_home):
    reports.update_run_log([NotebookRecord("01_a", "A", "ok", 1.0, "smoke", "t", None)])
    reports.update_run_log([NotebookRecord("02_b", "B", "ok", 2.0, "smoke", "t", None)])
    reports.update_run_log([NotebookRecord("01_a", "A", "failed", 3.0, "default", "t", None)])
    log = reports.read_run_log()
    assert sorted(log) == ["01_a", "02_b"] and log["01_a"]["status"] == "failed"


def _widget_notebook() -> nbformat.NotebookNode:
    """An executed-looking notebook: a slider + dropdown + output widget tree with stored state."""
    v4 = nbformat.v4
    nb = v4.new_notebook()
    state = {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_slider", "IPY_MODEL_pick", "IPY_MODEL_out",
                                                                 "IPY_MODEL_done_bar", "IPY_MODEL_img"]}},
        "img": {"model_name": "ImageModel", "state": {"format": "png"},
                "buffers": [{"path": ["value"], "encoding": "base64", "data": "WIDGETPNGDATA"}]},
        "done_bar": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_done_label"], "layout": "IPY_MODEL_hidden"}},
        "done_label": {"model_name": "HTMLModel", "state": {"value": "FINISHED-BAR 0%"}},
        "hidden": {"model_name": "LayoutModel", "state": {"visibility": "hidden"}},
        "slider": {"model_name": "IntSliderModel", "state": {"description": "inner steps", "value": 8}},
        "pick": {"model_name": "DropdownModel", "state": {"description": "inner loss", "index": 1,
                                                           "_options_labels": ["geometry", "entropy", "infomax"]}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [
            {"output_type": "stream", "name": "stdout", "text": "accuracy 0.71"},
            {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}}]}},
    }
    nb.metadata["widgets"] = {reports.WIDGET_STATE: {"state": state, "version_major": 2, "version_minor": 0}}
    cell = v4.new_code_cell("interactive_explorer()  # HIDDEN-SETUP", metadata={"tags": ["hide-input"]})
    cell.outputs = [v4.new_output("display_data", data={
        reports.WIDGET_VIEW: {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "VBox(children=(IntSlider(...)))"}),
        v4.new_output("display_data", data={reports.WIDGET_VIEW: {"model_id": "missing"}, "text/plain": "Dropped()"})]
    nb.cells = [v4.new_markdown_cell("# Widgets report\n\nSome *prose*."), cell]
    return nb


def test_export_degrades_widgets_to_static_html_offline(hmlib_home, tmp_path):
    path = reports.export_html(_widget_notebook(), tmp_path / "w.html")
    page = path.read_text()
    assert "inner steps" in page and "<b>8</b>" in page
    assert "inner loss" in page and "<b>entropy</b>" in page
    assert "accuracy 0.71" in page and "data:image/png;base64,iVBORw0KGgo=" in page
    assert "Dropped()" not in page and "VBox(children" not in page
    assert 'src="data:image/png;base64,WIDGETPNGDATA"' in page  # an Image widget keeps its last picture
    assert "FINISHED-BAR" not in page  # hidden by its layout (a closed tqdm bar with leave=False)
    assert "HIDDEN-SETUP" not in page and "<title>Widgets report</title>" in page
    assert "widget-state" not in page  # the state blob is not shipped
    assert not re.search(r"<script[^>]+src=", page)
    assert "cdnjs" not in page and "unpkg" not in page and "jsdelivr" not in page


def test_a_label_widget_keeps_its_text_escaped(hmlib_home, tmp_path):
    """The explorer's accuracy readout is a Label: the exported report shows its last text, as text (not HTML)."""
    nb = _widget_notebook()
    state = nb.metadata["widgets"][reports.WIDGET_STATE]["state"]
    state["readout"] = {"model_name": "LabelModel", "state": {"value": "accuracy 71.9% after 2 inner steps <b>"}}
    state["box"]["state"]["children"].append("IPY_MODEL_readout")
    page = reports.export_html(nb, tmp_path / "label.html").read_text()
    assert "accuracy 71.9% after 2 inner steps &lt;b&gt;" in page and "steps <b>" not in page


def test_report_files_follow_the_umask_not_the_temp_file_mode(hmlib_home, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = reports.write_index()
        exported = reports.export_html(_widget_notebook(), tmp_path / "w.html")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and exported.stat().st_mode & 0o777 == 0o644


def test_headline_floats_share_decimals_within_a_column(hmlib_home):
    reports.record_headline("acc", [{"acc": 44.4, "p": 1e-9}, {"acc": 43.0, "p": 0.5}], "Accuracy")
    page = reports.write_index().read_text()
    assert "<td class='num'>43.0</td>" in page and "<td class='num'>44.4</td>" in page
    assert "1e-09" in page  # tiny values keep significant digits
