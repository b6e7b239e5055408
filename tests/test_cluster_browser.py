"""Slow tier: ``clusters.html`` from ``hmlib cluster`` opened in headless Debian Chromium.

The page must render (non-blank screenshot), every thumbnail must load and the console must show no error. The
browser fixture and page check are those of ``test_pipeline`` (skip locally without chromium, fail when CI=true).
The MODEL IS REPLACED by the brightness-quantile stand-in of ``cluster_fakes``: this checks the page, not the model.
"""
from __future__ import annotations

import pytest

from cluster_fakes import install_estimator, write_checkpoint, write_mixed_folder
from hmlib import cli
from test_pipeline import _check_page, browser  # noqa: F401  (browser is a fixture used by name)

pytestmark = pytest.mark.slow


def test_browser_renders_the_contact_sheet(browser, tmp_path, monkeypatch, capsys):  # noqa: F811
    install_estimator(monkeypatch, write_checkpoint(tmp_path / "zero_shot.pt"))
    root = tmp_path / "images"
    files = write_mixed_folder(root)
    out = tmp_path / "out"
    assert cli.main(["cluster", str(root), "--k", "3", "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    page = out / "clusters.html"
    _check_page(browser, page, min_images=3)
    titles = browser.execute_script("return Array.from(document.images).map(i => i.title)")
    # 14 images in 3 clusters, 12 thumbnails per row: every image is shown once, its file name as its tooltip
    assert sorted(t.rsplit(" (confidence ", 1)[0] for t in titles) == files["images"]
    sections = browser.execute_script("return document.querySelectorAll('section.cluster').length")
    assert sections == 3
