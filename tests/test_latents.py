"""Tests for hmlib.latents: LatentSet, encoding, the latent cache and its staleness checks."""
from __future__ import annotations

import numpy as np
import pytest

import hmlib.data
import hmlib.latents as latents_mod
from hmlib.artifacts import StaleArtifactError
from hmlib.config import load_config
from fakes import FakeData
from hmlib.latents import LatentSet, get_latents, kmeans_task_accuracy, latent_cache_path, read_latents

# Tiny sizes
LATENT_DIM = 3
NUM_IMAGES = 40
TINY_VAE = {"latent_dim": LATENT_DIM, "epochs": 1, "batch_size": 16, "max_train_images": 32}


@pytest.fixture
def fake_data(monkeypatch) -> FakeData:
    fake = FakeData(NUM_IMAGES, extra_test=5)
    monkeypatch.setattr(hmlib.data, "load_split", fake.load_split)
    return fake


def tiny_cfg(**vae_overrides):
    return load_config("smoke", overrides={"vae": {**TINY_VAE, **vae_overrides}})


def test_get_latents_matches_contract_and_is_cached(fake_data, monkeypatch):
    latents = get_latents(tiny_cfg(), "mnist", "test", "zero_shot", progress=False)
    assert isinstance(latents, LatentSet) and (latents.name, latents.split) == ("mnist", "test")
    assert latents.mu.shape == latents.logvar.shape == (NUM_IMAGES + 5, LATENT_DIM)
    assert latents.mu.dtype == latents.logvar.dtype == np.float32 and latents.labels.dtype == np.int64
    assert latents.distribution.shape == (NUM_IMAGES + 5, 2 * LATENT_DIM)
    path = latent_cache_path(f"shared_vae_head_{LATENT_DIM}", "mnist", "test")
    assert path.is_file() and path.with_suffix(".json").is_file()

    def must_not_encode(*args, **kwargs):
        raise AssertionError("fresh cache must be read, not re-encoded")

    monkeypatch.setattr(latents_mod, "encode_split", must_not_encode)
    cached = get_latents(tiny_cfg(), "mnist", "test", "zero_shot", progress=False)
    np.testing.assert_array_equal(cached.mu, latents.mu)
    np.testing.assert_array_equal(cached.labels, latents.labels)
    assert cached.vae_id == latents.vae_id


def test_settings_pick_their_vae(fake_data):
    zero_shot = get_latents(tiny_cfg(), "mnist", "train", "zero_shot", progress=False)
    transductive = get_latents(tiny_cfg(), "mnist", "train", "transductive", progress=False)
    assert zero_shot.vae_id != transductive.vae_id
    assert latent_cache_path(f"mnist_vae_head_{LATENT_DIM}", "mnist", "train").is_file()
    with pytest.raises(ValueError, match="zero_shot"):
        get_latents(tiny_cfg(), "mnist", "train", "few_shot", progress=False)


def test_stale_latents_are_detected_and_reencoded(fake_data, capsys):
    first = get_latents(tiny_cfg(), "mnist", "test", "transductive", progress=False)
    path = latent_cache_path(f"mnist_vae_head_{LATENT_DIM}", "mnist", "test")
    manifest = latents_mod.read_json(path.with_suffix(".json"))
    with pytest.raises(StaleArtifactError, match="vae_id"):
        read_latents(path, {**manifest, "vae_id": "0" * 16})

    retrained = get_latents(tiny_cfg(seed=1), "mnist", "test", "transductive", progress=False)  # new VAE
    assert retrained.vae_id != first.vae_id
    assert "stale" in capsys.readouterr().out
    assert not np.allclose(retrained.mu, first.mu)

    manifest = latents_mod.read_json(path.with_suffix(".json"))
    with pytest.raises(StaleArtifactError, match="image_fingerprint"):
        read_latents(path, {**manifest, "image_fingerprint": "other images"})


def test_corrupt_latent_cache_is_reencoded(fake_data):
    first = get_latents(tiny_cfg(), "mnist", "test", "zero_shot", progress=False)
    path = latent_cache_path(f"shared_vae_head_{LATENT_DIM}", "mnist", "test")
    path.write_bytes(b"garbage")
    again = get_latents(tiny_cfg(), "mnist", "test", "zero_shot", progress=False)
    np.testing.assert_allclose(again.mu, first.mu, rtol=1e-5, atol=1e-6)


def test_kmeans_task_accuracy_on_separated_latents():
    labels = np.repeat(np.arange(6), 30)
    centres = np.eye(6, 5, dtype=np.float32) * 10
    mu = centres[labels] + np.random.default_rng(0).normal(0, 0.1, (len(labels), 5)).astype(np.float32)
    latents = LatentSet("toy", "test", mu, np.zeros_like(mu), labels.astype(np.int64), "id")
    scores = kmeans_task_accuracy(latents, num_tasks=3, num_classes=4, num_images=40, n_init=2)
    assert scores.shape == (3,) and np.all(scores == 1.0)
    noise = LatentSet("toy", "test", np.random.default_rng(1).normal(size=mu.shape).astype(np.float32),
                      np.zeros_like(mu), labels.astype(np.int64), "id")
    assert kmeans_task_accuracy(noise, num_tasks=3, num_classes=4, num_images=40, n_init=2).mean() < 0.7
