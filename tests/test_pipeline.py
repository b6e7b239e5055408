"""Slow tier: the whole notebook series in the smoke profile, its HTML reports, then a real browser.

One ``python -m hmlib run --profile smoke`` per test session (conftest's ``smoke_series``) with HMLIB_HOME in a temp
folder and the data mirror from HMLIB_DATA_DIR (default ``../shared/data`` beside the repository). Then headless
Debian Chromium opens every exported report and index.html from disk: the page renders (non-blank
screenshot), every <img> loaded, and the console shows no errors. In CI (CI=true) a missing
browser or mirror fails the test instead of skipping it.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from hmlib import paths
from hmlib.runner import discover_notebooks

pytestmark = pytest.mark.slow

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DEFAULT_MIRROR = paths.REPO_ROOT.parent / "shared" / "data"
DATA_DIR = os.environ.get("HMLIB_DATA_DIR") or (str(DEFAULT_MIRROR) if DEFAULT_MIRROR.is_dir() else None)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1600")
RUN_TIMEOUT_S = 1800
PNG_PATTERN = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]{40})")


def _unavailable(what: str) -> None:
    """Fail in CI, skip elsewhere: CI must exercise the whole chain."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: this must be installed by .ci/run)")
    pytest.skip(what)


def run_smoke_series(home: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the whole series once in the smoke profile into ``home``; return (home, completed process). The
    session's one run (conftest's ``smoke_series``): these tests read it, test_live_notebook copies its home."""
    if DATA_DIR is None or not Path(DATA_DIR).is_dir():
        _unavailable(f"data mirror not found (HMLIB_DATA_DIR={DATA_DIR!r}, default {DEFAULT_MIRROR})")
    assert discover_notebooks(), "notebooks/ holds no NN_*.ipynb to run"
    env = {**os.environ, "HMLIB_HOME": str(home), "HMLIB_DATA_DIR": str(Path(DATA_DIR).resolve()),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hmlib", "run", "--profile", "smoke", "--timeout", "1200"],
                          cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return home, proc


@pytest.fixture
def smoke_run(smoke_series):
    """(home, completed process) of the session's smoke run of the whole series."""
    return smoke_series


def test_smoke_series_runs_and_exports_every_notebook(smoke_run):
    home, proc = smoke_run
    assert proc.returncode == 0, f"hmlib run failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    reports = home / "reports"
    for source in discover_notebooks():
        html_path = reports / f"{source.stem}.html"
        executed = nbformat.read(reports / source.name, as_version=4)
        assert executed.metadata.hmlib["status"] == "ok"
        assert executed.metadata.hmlib["parameters"]["profile"] == "smoke"
        assert html_path.is_file(), f"no report for {source.name}"
        page = html_path.read_text()
        figures = [out["data"]["image/png"] for cell in executed.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
        assert figures, f"{source.name} produced no figure"
        for png in figures:
            assert "".join(png).strip()[:200] in page, f"a figure of {source.name} is missing from its report"
        errors = [out for cell in executed.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
        assert not errors
    index = (reports / "index.html").read_text()
    assert all(f"href='{p.stem}.html'" in index for p in discover_notebooks())


@pytest.fixture
def in_smoke_home(smoke_run, monkeypatch):
    """The smoke run's home as HMLIB_HOME (to read its artifacts with hmlib's own loaders); returns (home, cfg)."""
    from hmlib.config import load_config

    home, proc = smoke_run
    assert proc.returncode == 0, f"hmlib run failed:\n{proc.stderr[-4000:]}"
    monkeypatch.setenv("HMLIB_HOME", str(home))
    monkeypatch.setenv("HMLIB_DATA_DIR", str(Path(DATA_DIR).resolve()))
    return home, load_config("smoke")


def test_smoke_run_evaluates_every_condition_of_the_grid(in_smoke_home):
    """Notebook 03 scores every registered method on every condition of the smoke grid (clean and shifted
    datasets x task shapes), one cached file per condition; the table and the heatmap reach the report and the
    index shows a row per condition."""
    from hmlib.evaluation import grid, load_results, summary_markdown
    from hmlib.evaluation.evaluate import condition_path, default_results_path
    from hmlib.evaluation.methods import baselines

    home, cfg = in_smoke_home
    expected = grid(cfg, verbose=False)
    assert {c.shift for c in expected} >= {"clean", "rotate"} and len({c.num_classes for c in expected}) > 1
    for setting, datasets in (("zero_shot", cfg.meta.test_datasets),
                              ("transductive", cfg.transductive.datasets or cfg.meta.test_datasets)):
        result = load_results(setting)
        conditions = [c for c in expected if c.dataset in datasets]
        assert [b["condition"]["key"] for b in result["conditions"]] == [c.key for c in conditions]
        assert result["profile"] == "smoke" and result["seeds"] == list(cfg.seeds)
        for condition, block in zip(conditions, result["conditions"]):
            assert condition_path(default_results_path(setting), condition).is_file()
            assert set(block["methods"]) == {"hypernet", *(m.name for m in baselines())}
        assert summary_markdown(result) in default_results_path(setting).with_suffix(".md").read_text()
    report = (home / "reports" / "03_meta_training.html").read_text()
    index = (home / "reports" / "index.html").read_text()
    for condition in expected:
        assert condition.label in report and condition.label in index
    executed = nbformat.read(home / "reports" / "03_meta_training.ipynb", as_version=4)
    heatmaps = [cell for cell in executed.cells if cell.cell_type == "code" and "difference_heatmap(" in cell.source
                and "import" not in cell.source]
    assert heatmaps and all(any("image/png" in out.get("data", {}) for out in cell.outputs) for cell in heatmaps)


def test_smoke_run_ablations_and_their_checkpoints(in_smoke_home):
    """Notebook 04 caches every ablation over its grid; re-trained variants live in models/ablations/ and the
    pipeline's checkpoint stays the one `hmlib cluster` takes; the exported explorer shows its accuracy line."""
    from hmlib.ablations import ablation_grid, define_ablations
    from hmlib.ablations.report import AblationResult
    from hmlib.artifacts import read_json
    from hmlib.cluster.estimator import default_checkpoint
    from hmlib.hyper.metatrain import pipeline_checkpoints

    home, cfg = in_smoke_home
    for spec in define_ablations(cfg):
        result = AblationResult.from_json(read_json(home / "results" / "ablations" / f"{spec.key}.json"))
        assert result.conditions == [c.key for c in ablation_grid(cfg, spec)]
        assert {v["label"] for v in result.variants} == set(result.acc) == {v.label for v in spec.variants}
    models = home / "models"
    assert list((models / "ablations").glob("variant_seed0-*.pt"))
    pipeline = pipeline_checkpoints()
    assert sorted(models.glob("hypernet_seed*-*.pt")) == sorted(pipeline) and len(pipeline) == len(cfg.seeds)
    assert default_checkpoint() == pipeline[0]
    page = (home / "reports" / "04_ablations.html").read_text()
    assert re.search(r"accuracy \d+\.\d% after \d+ inner steps", page)


# ------------------------------------------------------------------------------------------ browser

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium driven by selenium + chromedriver, fresh profile, no network."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _unavailable(f"Debian chromium/chromium-driver not installed ({CHROMIUM}, {CHROMEDRIVER})")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _check_page(driver, path: Path, min_images: int = 0) -> None:
    """Open ``path`` from disk; assert it rendered, every image loaded and the console has no error."""
    from PIL import Image
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop messages from earlier pages
    driver.get(path.resolve().as_uri())
    try:  # get() may return while the page is still 'interactive' (subresources such as images loading)
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    except TimeoutException:
        pytest.fail(f"{path.name}: still {driver.execute_script('return document.readyState')!r} after 30 s")
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.src.slice(0, 60)])")
    broken = [src for ok, src in images if not ok]
    assert not broken, f"{path.name}: images that did not load: {broken}"
    assert len(images) >= min_images, f"{path.name}: {len(images)} images, expected at least {min_images}"
    errors = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
    assert not errors, f"{path.name}: console errors: {errors}"
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"), dtype=np.float32)
    inked = float((shot < 200).mean())
    assert shot.std() > 5 and inked > 0.002, f"{path.name}: screenshot looks blank (std {shot.std():.1f}, ink {inked:.4f})"


def test_browser_renders_a_synthetic_report(browser, tmp_path):
    """The export pipeline alone (no kernel, no data): a report with a real figure and a widget."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    from hmlib import reports

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [0, 1, 4])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    png = base64.b64encode(buffer.getvalue()).decode()
    v4 = nbformat.v4
    nb = v4.new_notebook()
    cell = v4.new_code_cell("plot()")
    cell.outputs = [v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"}),
                    v4.new_output("display_data", data={reports.WIDGET_VIEW: {"model_id": "s"}, "text/plain": "IntSlider()"})]
    nb.metadata["widgets"] = {reports.WIDGET_STATE: {"state": {
        "s": {"model_name": "IntSliderModel", "state": {"description": "steps", "value": 4}}}}}
    nb.cells = [v4.new_markdown_cell("# Synthetic report\n\nWith $x^2$ inline maths and a table:\n\n| a | b |\n|---|---|\n| 1 | 2 |"),
                cell]
    _check_page(browser, reports.export_html(nb, tmp_path / "synthetic.html"), min_images=1)


def test_browser_opens_every_report_and_the_index(smoke_run, browser):
    home, proc = smoke_run
    assert proc.returncode == 0, f"hmlib run failed:\n{proc.stderr[-4000:]}"
    reports = home / "reports"
    for source in discover_notebooks():
        _check_page(browser, reports / f"{source.stem}.html", min_images=1)
    _check_page(browser, reports / "index.html")
