"""Tests for hmlib.vae: models, loss, beta schedule, training, checkpoints and get_vae scopes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hmlib.data
import hmlib.vae as vae_mod
from hmlib.artifacts import ArtifactError, StaleArtifactError
from hmlib.config import VAEConfig, load_config
from hmlib.data import ImageSet
from fakes import FakeData, synthetic_images
from hmlib.vae import (VAETrainingError, beta_schedule, build_vae, encode_images, get_vae, kl_per_sample,
                       load_vae, select_training_images, ssim, train_vae, vae_for_setting, vae_path)

# Tiny sizes
BATCH = 6
LATENT_DIM = 4
NUM_IMAGES = 40  # per fake dataset split
TINY_VAE = {"latent_dim": LATENT_DIM, "epochs": 1, "batch_size": 16, "max_train_images": 48}


@pytest.fixture
def fake_data(monkeypatch) -> FakeData:
    fake = FakeData(NUM_IMAGES)
    monkeypatch.setattr(hmlib.data, "load_split", fake.load_split)
    return fake


def tiny_cfg(**vae_overrides):
    return load_config("smoke", overrides={"vae": {**TINY_VAE, **vae_overrides}})


@pytest.mark.parametrize("variant", ["conv", "prototype"])
def test_shapes(variant):
    model = build_vae(VAEConfig(variant=variant, latent_dim=LATENT_DIM))
    x = torch.rand(BATCH, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (BATCH, LATENT_DIM)
    logits, mu2, _ = model(x)
    assert logits.shape == (BATCH, 1, 28, 28)
    assert torch.allclose(mu, mu2)
    recon = model.reconstruct(x)
    assert recon.shape == (BATCH, 1, 28, 28) and recon.min() >= 0 and recon.max() <= 1


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="vae.variant"):
        build_vae(VAEConfig(variant="transformer"))


@pytest.mark.parametrize("likelihood", ["bce", "mse_ssim"])
def test_loss_decreases_on_tiny_data(likelihood):
    images, _ = synthetic_images(32, seed=0)
    cfg = VAEConfig(latent_dim=LATENT_DIM, likelihood=likelihood, epochs=25, batch_size=32,
                    beta_start=1.0, beta_end=1.0, lr=2e-3)
    result = train_vae(build_vae(cfg), images, cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 25
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_beta_schedule_is_linear_from_start_to_end():
    assert beta_schedule(0, 11, 0.25, 1.0) == pytest.approx(0.25)
    assert beta_schedule(5, 11, 0.25, 1.0) == pytest.approx(0.625)
    assert beta_schedule(10, 11, 0.25, 1.0) == pytest.approx(1.0)
    assert beta_schedule(0, 1, 0.25, 1.0) == pytest.approx(1.0)
    images, _ = synthetic_images(20, seed=1)
    cfg = VAEConfig(latent_dim=LATENT_DIM, epochs=2, batch_size=8, beta_start=0.1, beta_end=0.7)
    history = train_vae(build_vae(cfg), images, cfg, progress=False).history
    betas = np.array([h["beta"] for h in history])
    assert len(betas) == 6  # 2 epochs x ceil(20 / 8)
    np.testing.assert_allclose(betas, np.linspace(0.1, 0.7, 6))
    assert all({"loss", "recon", "kl", "step", "epoch"} <= set(h) for h in history)


def test_kl_and_ssim_reference_values():
    mu, logvar = torch.zeros(3, LATENT_DIM), torch.zeros(3, LATENT_DIM)
    assert torch.allclose(kl_per_sample(mu, logvar), torch.zeros(3))
    mu = torch.full((1, LATENT_DIM), 2.0)
    logvar = torch.full((1, LATENT_DIM), np.log(0.5))
    expected = 0.5 * LATENT_DIM * (0.5 + 4.0 - 1 - np.log(0.5))
    assert kl_per_sample(mu, logvar).item() == pytest.approx(expected, rel=1e-5)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(x, torch.rand(2, 1, 28, 28)) < 0.5).all()


def test_training_rejects_float_images():
    cfg = VAEConfig(latent_dim=LATENT_DIM)
    with pytest.raises(ValueError, match="uint8"):
        train_vae(build_vae(cfg), np.random.rand(4, 28, 28), cfg, progress=False)


def test_balanced_selection_repeats_small_datasets():
    sets = [ImageSet("big", "train", np.zeros((100, 28, 28), np.uint8), np.zeros(100, np.int64), ["0"], "a"),
            ImageSet("small", "train", np.ones((7, 28, 28), np.uint8), np.zeros(7, np.int64), ["0"], "b")]
    images, counts = select_training_images(sets, 40, seed=0)
    assert counts == {"big": 20, "small": 20}
    assert (images == 1).all(axis=(1, 2)).sum() == 20
    _, counts = select_training_images(sets, None, seed=0)
    assert counts == {"big": 100, "small": 7}


def test_shared_vae_never_sees_held_out_dataset(fake_data):
    cfg = tiny_cfg()
    assert "mnist" in cfg.meta.test_datasets
    _, meta = get_vae(cfg, "shared", progress=False)
    assert sorted(fake_data.loaded) == sorted((d, "train") for d in cfg.meta.train_datasets)
    assert "mnist" not in meta["datasets"] and "mnist" not in meta["train_counts"]
    assert sorted(meta["data_fingerprints"]) == sorted(cfg.meta.train_datasets)
    assert vae_path(cfg, "shared").name == f"shared_vae_head_{LATENT_DIM}.pt"


def test_dataset_scope_trains_on_its_train_split(fake_data):
    _, meta = vae_for_setting(tiny_cfg(), "transductive", "mnist", progress=False)
    assert fake_data.loaded == [("mnist", "train")]
    assert meta["name"] == f"mnist_vae_head_{LATENT_DIM}" and meta["datasets"] == ["mnist"]
    with pytest.raises(ValueError, match="scope"):
        get_vae(tiny_cfg(), "not_a_dataset", progress=False)


def test_checkpoint_round_trip_and_reuse(fake_data, capsys):
    cfg = tiny_cfg()
    model, meta = get_vae(cfg, "mnist", progress=False)
    assert meta["reused"] is False and len(meta["history"]) == 3  # 48 images / batch 16, 1 epoch
    images, _ = synthetic_images(10, seed=5)
    loaded, loaded_meta = load_vae(meta["path"])
    for a, b in zip(encode_images(model, images), encode_images(loaded, images)):
        np.testing.assert_array_equal(a, b)
    again, again_meta = get_vae(cfg, "mnist", progress=False)
    assert again_meta["reused"] is True and again_meta["vae_id"] == meta["vae_id"] == loaded_meta["vae_id"]
    assert "Reusing VAE checkpoint" in capsys.readouterr().out
    np.testing.assert_array_equal(encode_images(again, images)[0], encode_images(model, images)[0])


def test_other_settings_or_data_are_detected(fake_data):
    get_vae(tiny_cfg(), "mnist", progress=False)
    with pytest.raises(StaleArtifactError, match="training"):
        get_vae(tiny_cfg(lr=5e-4, retrain="never"), "mnist", progress=False)
    fake_data.version = 1  # same settings, other images
    with pytest.raises(StaleArtifactError, match="data_fingerprints"):
        get_vae(tiny_cfg(retrain="never"), "mnist", progress=False)
    _, meta = get_vae(tiny_cfg(), "mnist", progress=False)  # "auto" retrains
    assert meta["reused"] is False
    _, meta = get_vae(tiny_cfg(retrain="never"), "mnist", progress=False)
    assert meta["reused"] is True


def test_retrain_never_without_checkpoint_and_always(fake_data):
    with pytest.raises(ArtifactError, match="retrain = 'never'"):
        get_vae(tiny_cfg(retrain="never"), "mnist", progress=False)
    _, first = get_vae(tiny_cfg(), "mnist", progress=False)
    _, second = get_vae(tiny_cfg(retrain="always"), "mnist", progress=False)
    assert second["reused"] is False


def test_shared_checkpoint_of_other_datasets_is_not_overwritten(fake_data):
    get_vae(tiny_cfg(), "shared", progress=False)
    other = load_config("smoke", overrides={"vae": TINY_VAE, "meta": {"train_datasets": ["fashion_mnist"]}})
    with pytest.raises(StaleArtifactError, match="name="):
        get_vae(other, "shared", progress=False)
    _, meta = get_vae(other, "shared", name="shared_fashion_only", progress=False)
    assert meta["datasets"] == ["fashion_mnist"] and meta["path"].endswith("shared_fashion_only.pt")
    _, meta = get_vae(tiny_cfg(retrain="never"), "shared", progress=False)
    assert meta["reused"] is True


def test_corrupt_checkpoint_is_a_clear_error(fake_data):
    path = vae_path(tiny_cfg(), "mnist")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_vae(path)
    with pytest.raises(ArtifactError, match="corrupt"):
        get_vae(tiny_cfg(retrain="never"), "mnist", progress=False)
    _, meta = get_vae(tiny_cfg(), "mnist", progress=False)  # "auto" replaces it
    assert meta["reused"] is False and load_vae(path)[1]["vae_id"] == meta["vae_id"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fake_data, monkeypatch):
    _, good = get_vae(tiny_cfg(), "mnist", progress=False)
    path = vae_path(tiny_cfg(), "mnist")
    before = path.read_bytes()
    real_loss = vae_mod.vae_loss
    calls = {"n": 0}

    def diverging_loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(vae_mod, "vae_loss", diverging_loss)
    with pytest.raises(VAETrainingError, match="step 1"):
        get_vae(tiny_cfg(retrain="always"), "mnist", progress=False)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".hmlib-tmp-*"))
    assert load_vae(path)[1]["vae_id"] == good["vae_id"]


def test_pick_examples_spreads_over_classes():
    from hmlib.plots.vae import pick_examples

    labels = np.repeat(np.arange(5), [3, 10, 1, 7, 2])
    picked = pick_examples(labels, num=5)
    assert sorted(labels[picked]) == [0, 1, 2, 3, 4]
    picked = pick_examples(labels, num=8)
    assert len(set(picked)) == 8 and np.bincount(labels[picked], minlength=5).max() == 2
