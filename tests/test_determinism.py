"""Same settings and seeds, same weights: a stage's result depends on its own seed, not on what ran before it."""
from __future__ import annotations

import pytest
import torch

import hmlib.data
from fakes import FakeData
from hmlib.config import load_config
from hmlib.vae import get_vae
from test_metatrain import _cfg, _fit


def _disturb_global_rng(run: int) -> None:
    """What a notebook kernel does between two stages: leave torch's global random stream in another state."""
    torch.manual_seed(1000 + run)
    torch.randn(77 * (run + 1))


def _assert_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two runs with the same seed"


def test_smoke_vae_trains_to_bit_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(hmlib.data, "load_split", FakeData(40).load_split)
    cfg = load_config("smoke", overrides={"vae": {"latent_dim": 4, "epochs": 2, "batch_size": 16,
                                                   "max_train_images": 64}})
    states = []
    for run in range(2):
        monkeypatch.setenv("HMLIB_HOME", str(tmp_path / f"home{run}"))
        _disturb_global_rng(run)
        model, meta = get_vae(cfg, "shared", progress=False)
        assert not meta["reused"]
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    _assert_identical(*states)


def test_vae_seed_changes_the_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(hmlib.data, "load_split", FakeData(40).load_split)
    states = []
    for seed in (0, 1):
        monkeypatch.setenv("HMLIB_HOME", str(tmp_path / f"seed{seed}"))
        cfg = load_config("smoke", overrides={"vae": {"latent_dim": 4, "epochs": 1, "batch_size": 16,
                                                       "max_train_images": 32, "seed": seed}})
        states.append(get_vae(cfg, "shared", progress=False)[0].state_dict())
    assert not torch.equal(states[0]["to_mu.weight"], states[1]["to_mu.weight"])


def test_smoke_hypernetwork_trains_to_bit_identical_weights(tmp_path):
    cfg = _cfg()
    states = []
    for run in range(2):
        _disturb_global_rng(run)
        result = _fit(cfg, tmp_path / f"h{run}.pt")
        states.append({k: v.clone() for k, v in result.hypernet.state_dict().items()})
        assert result.history["outer_loss"]
    _assert_identical(*states)
