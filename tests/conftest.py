"""Shared fixtures: every test runs with artifacts (data_cache/, models/, reports/) in a temp folder."""
from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits

torch.set_num_threads(1)
threadpool_limits(limits=1)  # numpy/scikit-learn BLAS and OpenMP pools too: tiny problems, a shared CPU


@pytest.fixture(autouse=True)
def hmlib_home(tmp_path, monkeypatch):
    """Point HMLIB_HOME at a fresh folder and hide any real mirror, so tests never touch the repo's artifacts."""
    home = tmp_path / "hmlib_home"
    home.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(home))
    monkeypatch.delenv("HMLIB_DATA_DIR", raising=False)
    monkeypatch.delenv("HMLIB_DEVICE", raising=False)  # `hmlib run --device` sets it for kernels; tests choose their own
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from hmlib.backbone import transductive

    monkeypatch.setattr(transductive, "_DECISIONS", {})  # the transductive gate's per-process memo: per test
    return home


@pytest.fixture(scope="session")
def _tiny_mirror_root(tmp_path_factory):
    from datafactory import write_tiny_mirror

    return write_tiny_mirror(tmp_path_factory.mktemp("tiny_mirror"))


@pytest.fixture
def tiny_mirror(_tiny_mirror_root, monkeypatch):
    """A tiny offline mirror (mnist, fashion_mnist, hebrew_chars, math_shapes: 6 classes, 120 train / 60 test
    synthetic 28x28 images each, hub schema; read-only, shared by the session) with HMLIB_DATA_DIR pointing at
    it; returns its root."""
    monkeypatch.setenv("HMLIB_DATA_DIR", str(_tiny_mirror_root))
    return _tiny_mirror_root


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A private mirror (the test may rewrite it) holding a tiny 'mnist' (3 classes, 30 train / 15 test images),
    with HMLIB_DATA_DIR pointing at it; returns its root."""
    from datafactory import write_tiny_dataset

    root = tmp_path / "mirror"
    write_tiny_dataset(root, "mnist", num_classes=3, splits={"train": 30, "test": 15})
    monkeypatch.setenv("HMLIB_DATA_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def smoke_series(tmp_path_factory):
    """The slow tier's one smoke run of the whole notebook series, (home, completed process): test_pipeline checks
    it, test_live_notebook starts from a copy of its home (tests must not write into it)."""
    from test_pipeline import run_smoke_series

    return run_smoke_series(tmp_path_factory.mktemp("smoke_home"))
