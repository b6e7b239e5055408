"""Slow tier: notebook 04 as users use it, live in JupyterLab, driven by headless Debian Chromium.

A scratch home is a copy of the session's smoke run of the whole series (conftest's ``smoke_series``, which
test_pipeline checks: the artifacts of 01-03 that notebook 04 loads), a copy of notebook 04 with
``profile = "smoke"`` in its parameters cell is written there, and JupyterLab is started headless on localhost (a
free port, a token, ``--no-browser``). Chromium opens the copy, runs every cell, waits for the adaptation explorer,
moves its inner-steps slider with the keyboard (as a user does: focus the handle, press the arrow keys) and checks
what changes: the slider's readout, the figure's pixels, and the explorer's accuracy line ("accuracy <acc>% after
<n> inner steps (<the candidate kept>)", a text Label beside the figure), read from the page as a user reads it.
The kernel is asked once more, only to check that the line shows the explorer's own state. In CI (CI=true) a missing
browser or mirror fails the test instead of skipping it.

Everything that knows notebook 04's structure is in the ``EXPLORER_*`` constants and the ``find_*`` / ``read_*``
helpers at the top.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from hmlib import paths
from test_pipeline import CHROMIUM, CHROMIUM_FLAGS, CHROMEDRIVER, DATA_DIR, DEFAULT_MIRROR, _unavailable

pytestmark = pytest.mark.slow

# ---------------------------------------------------------------------------- what the test knows of notebook 04
EXPLORER_NOTEBOOK = "04_ablations.ipynb"
EXPLORER_PREREQUISITES = "01,02,03"  # the notebooks whose artifacts it loads
EXPLORER_STEPS_LABEL = re.compile(r"\bsteps?\b", re.I)  # description of the steps IntSlider (hmlib.widgets)
# the widget's Label: the accuracy, the steps and the candidate the method keeps
EXPLORER_ACCURACY_LINE = re.compile(r"^accuracy (\d+\.\d)% after (\d+) inner steps \((.+)\)$")
EXPLORER_VARIABLE = "explorer"  # the AdaptationExplorer the widget drives, in the kernel's namespace
# What the explorer itself holds (to check that the page's line is its state, not a stale text).
EXPLORER_STATE_CODE = (f"print(__import__('json').dumps({{'steps': {EXPLORER_VARIABLE}.num_steps, 'accuracy': "
                       f"format(100 * {EXPLORER_VARIABLE}.state.current_accuracy, '.1f'), 'candidate': "
                       f"__import__('hmlib.widgets').widgets.CANDIDATE_LABELS[{EXPLORER_VARIABLE}.state.candidate]}}))")

FIND_STEPS_SLIDER_JS = """
const label = new RegExp(arguments[0], 'i');
for (const slider of document.querySelectorAll('.jp-OutputArea .widget-slider')) {
  const text = (slider.querySelector('.widget-label') || {}).textContent || '';
  if (label.test(text) && !/task/i.test(text)) return slider;
}
return null;"""
READ_LINE_JS = """
const line = new RegExp(arguments[1]);
for (const el of arguments[0].closest('.widget-vbox').querySelectorAll('.widget-label')) {
  const text = el.textContent.trim();
  if (line.test(text)) return text;
}
return null;"""
READ_FIGURE_JS = """
const img = arguments[0].closest('.widget-vbox').querySelector('img');
if (!img || !img.complete || !img.naturalWidth) return null;
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
canvas.getContext('2d').drawImage(img, 0, 0);
return [img.src, canvas.toDataURL('image/png')];"""
KERNEL_PROBE_JS = """
const done = arguments[arguments.length - 1];
const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
let text = '';
const future = kernel.requestExecute({code: arguments[0], silent: false, store_history: false});
future.onIOPub = msg => { if (msg.header.msg_type === 'stream') text += msg.content.text; };
future.done.then(() => done(text), err => done('ERROR ' + err));"""

NOTEBOOK_TIMEOUT_S = 1200


def find_steps_slider(driver):
    """The inner-steps slider of the explorer (found by its label, not its position), or None."""
    return driver.execute_script(FIND_STEPS_SLIDER_JS, EXPLORER_STEPS_LABEL.pattern)


def read_slider(slider) -> str:
    """The slider's readout text (its value as shown)."""
    return slider.find_element("css selector", ".widget-readout").text.strip()


def read_figure(driver, slider) -> tuple[str, str] | None:
    """``(src, pixels as a PNG data URL)`` of the explorer's figure beside ``slider``; None while it loads."""
    return driver.execute_script(READ_FIGURE_JS, slider)


def read_accuracy_line(driver, slider) -> str | None:
    """The explorer's accuracy line as the page shows it (the Label in the slider's widget box), or None."""
    return driver.execute_script(READ_LINE_JS, slider, EXPLORER_ACCURACY_LINE.pattern)


def read_explorer_state(driver) -> dict:
    """``{'steps': n, 'accuracy': 'acc' (%, one decimal), 'candidate': its words}`` of the explorer behind the widget,
    asked of the kernel."""
    text = driver.execute_async_script(KERNEL_PROBE_JS, EXPLORER_STATE_CODE)
    assert not text.startswith("ERROR"), text
    return json.loads(text.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- fixtures

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def smoke_home(smoke_series, tmp_path_factory):
    """A scratch HMLIB_HOME holding the smoke artifacts notebook 04 loads (those of notebooks 01-03: a copy of the
    session's smoke run's home, whose own notebook 04 results come along), and a smoke copy of notebook 04."""
    if DATA_DIR is None or not Path(DATA_DIR).is_dir():
        _unavailable(f"data mirror not found (HMLIB_DATA_DIR={DATA_DIR!r}, default {DEFAULT_MIRROR})")
    made, proc = smoke_series
    assert proc.returncode == 0, f"the session's smoke run failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    home = tmp_path_factory.mktemp("live_home") / "home"
    shutil.copytree(made, home, ignore=shutil.ignore_patterns("reports"))  # the run's own reports stay out
    for stage in EXPLORER_PREREQUISITES.split(","):
        assert any(made.joinpath("reports").glob(f"{stage}_*.html")), f"the smoke run made no report of {stage}"
    env = {**os.environ, "HMLIB_HOME": str(home), "HMLIB_DATA_DIR": str(Path(DATA_DIR).resolve()),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(paths.REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    nb = nbformat.read(paths.notebooks_dir() / EXPLORER_NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged, f"{EXPLORER_NOTEBOOK} has no cell tagged 'parameters'"
    source, count = re.subn(r"^profile\s*=.*$", 'profile = "smoke"', tagged[0].source, flags=re.M)
    assert count == 1, f"no `profile = ...` line in the parameters cell: {tagged[0].source!r}"
    tagged[0].source = source
    lab = home / "lab"
    lab.mkdir()
    nbformat.write(nb, str(lab / EXPLORER_NOTEBOOK))
    return home, lab, env


@pytest.fixture(scope="module")
def jupyterlab(smoke_home, tmp_path_factory):
    """JupyterLab headless on a free localhost port with a token; yields its base URL (token in the query)."""
    home, lab, env = smoke_home
    port, token = _free_port(), secrets.token_hex(16)
    jupyter = tmp_path_factory.mktemp("jupyter")
    env = {**env, "JUPYTER_CONFIG_DIR": str(jupyter / "config"), "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(jupyter / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(jupyter / "ws")}
    log = open(jupyter / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={lab}",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=lab, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"JupyterLab exited: {(jupyter / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"JupyterLab did not answer: {(jupyter / 'server.log').read_text()}"
            time.sleep(1)
        yield base, token, jupyter / "server.log"
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def lab_browser(tmp_path_factory):
    """Headless Debian Chromium for a live JupyterLab page (the flags of test_pipeline's browser)."""
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
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium_lab_profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    yield driver
    driver.quit()


# ---------------------------------------------------------------------------------------------- the test

def _wait(condition, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def _kernel_busy(driver) -> bool:
    return bool(driver.execute_script(
        "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        "const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
        "return !k || k.status !== 'idle' || "
        "Array.from(document.querySelectorAll('.jp-InputPrompt')).some(p => p.textContent.includes('[*]'));"))


def click_into_view(driver, element, attempts: int = 5) -> None:
    """Scroll ``element`` to the middle of the page and click it, as a user would.

    JupyterLab may lay something over it for a moment (a toast, the status bar while the notebook re-flows): the
    user closes it (Escape) or waits and clicks again. The last attempt's error, naming the element in the way,
    is raised if it never clears.
    """
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.common.keys import Keys

    for attempt in range(attempts):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'});", element)
        try:
            element.click()
            return
        except ElementClickInterceptedException:
            if attempt == attempts - 1:
                raise
            driver.find_element("css selector", "body").send_keys(Keys.ESCAPE)
            time.sleep(1 + attempt)


def test_the_inner_steps_slider_redraws_the_figure_live(jupyterlab, lab_browser):
    from selenium.webdriver.common.keys import Keys

    base, token, server_log = jupyterlab
    driver = lab_browser
    driver.get(f"{base}/lab/tree/{EXPLORER_NOTEBOOK}?token={token}")
    _wait(lambda: driver.execute_script(
        "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel &&"
        " w.sessionContext.session.kernel.status === 'idle');"), 180, "the notebook and its kernel")
    driver.execute_script("return window.jupyterapp.commands.execute('notebook:run-all-cells')")
    slider = _wait(lambda: find_steps_slider(driver), NOTEBOOK_TIMEOUT_S, "the explorer's inner-steps slider", 2)
    _wait(lambda: not _kernel_busy(driver), NOTEBOOK_TIMEOUT_S, "every cell to finish", 2)
    errors = driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type="
        "\"application/vnd.jupyter.stderr\"], .jp-RenderedText[data-mime-type=\"application/vnd.jupyter.error\"]'))"
        ".map(e => e.textContent).filter(t => /Error|Traceback/.test(t));")
    assert not errors, f"cells failed: {[e[-500:] for e in errors]}\n(server log: {server_log})"

    slider = find_steps_slider(driver)
    before_value, before_figure = read_slider(slider), _wait(lambda: read_figure(driver, slider), 60, "the figure")
    before_line = _wait(lambda: read_accuracy_line(driver, slider), 60, "the accuracy line beside the figure")
    assert EXPLORER_ACCURACY_LINE.match(before_line).group(2) == before_value, (before_line, before_value)

    handle = slider.find_element("css selector", ".noUi-handle, [role='slider']")
    click_into_view(driver, handle)  # focus the handle, as a user scrolling to it and clicking it would
    key = Keys.ARROW_LEFT if int(before_value) > 0 else Keys.ARROW_RIGHT
    handle.send_keys(key, key)
    after_value = _wait(lambda: read_slider(slider) if read_slider(slider) != before_value else None, 30,
                        "the slider readout to change")
    after_figure = _wait(lambda: (lambda fig: fig if fig and fig[1] != before_figure[1] else None)(
        read_figure(driver, slider)), 120, "the figure to be redrawn")
    after_line = _wait(lambda: (lambda line: line if line and line != before_line else None)(
        read_accuracy_line(driver, slider)), 120, "the accuracy line to change")
    _wait(lambda: not _kernel_busy(driver), 120, "the redraw to finish", 0.5)

    assert after_value != before_value and abs(int(after_value) - int(before_value)) == 2
    assert after_figure[0] != before_figure[0] and after_figure[1] != before_figure[1]  # new image, new pixels
    shown = EXPLORER_ACCURACY_LINE.match(read_accuracy_line(driver, slider))
    assert shown and shown.group(2) == after_value, (read_accuracy_line(driver, slider), after_value)
    state = read_explorer_state(driver)  # the page shows the explorer's own state, not a stale text
    assert state["steps"] == int(after_value) and state["accuracy"] == shown.group(1), (state, shown.group(0))
    assert state["candidate"] == shown.group(3), (state, shown.group(0))  # the candidate the method keeps, named
