"""Shared fixtures: every test runs with artifacts (data_cache/, models/, reports/) in a temp folder."""
from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def hmlib_home(tmp_path, monkeypatch):
    """Point HMLIB_HOME at a fresh folder and hide any real mirror, so tests never touch the repo's artifacts."""
    home = tmp_path / "hmlib_home"
    home.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(home))
    monkeypatch.delenv("HMLIB_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return home
