"""Slow tier: the whole notebook series in the smoke profile, its HTML reports, then a real browser.

One module-scoped ``python -m hmlib run --profile smoke`` with HMLIB_HOME in a temp folder and the
data mirror from HMLIB_DATA_DIR (default ``../shared/data`` beside the repository). Then headless
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


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """Run the whole series once in the smoke profile; return (home, completed process)."""
    if DATA_DIR is None or not Path(DATA_DIR).is_dir():
        _unavailable(f"data mirror not found (HMLIB_DATA_DIR={DATA_DIR!r}, default {DEFAULT_MIRROR})")
    assert discover_notebooks(), "notebooks/ holds no NN_*.ipynb to run"
    home = tmp_path_factory.mktemp("smoke_home")
    env = {**os.environ, "HMLIB_HOME": str(home), "HMLIB_DATA_DIR": str(Path(DATA_DIR).resolve()),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "hmlib", "run", "--profile", "smoke", "--timeout", "1200"],
                          cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return home, proc


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
