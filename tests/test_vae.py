"""The VAE stage: models, loss, beta schedule, training, checkpoints via get_vae, and the latent cache."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import hmlib.data
import hmlib.vae.latents as latents_mod
import hmlib.vae.train as train_mod
from fakes import FakeData, install_fake_data, synthetic_images
from hmlib.artifacts import ArtifactError, MissingArtifactError, StaleArtifactError, read_json, save_checkpoint
from hmlib.config import ConfigError, VAEConfig, load_config
from hmlib.data import ImageSet
from hmlib.evaluation.quality import kmeans_quality
from hmlib.features import cache_path, read_features
from hmlib.plots.vae import pick_examples
from hmlib.vae import (LatentSet, VAETrainingError, beta_schedule, build_vae, encode_images, encode_split,
                       get_all_vaes, get_latents, get_vae, kl_per_sample, load_vae, select_training_images, ssim,
                       train_vae)

# Tiny sizes
BATCH = 6
LATENT_DIM = 4
NUM_IMAGES = 40  # per fake dataset split
EXTRA_TEST = 5  # test splits hold NUM_IMAGES + EXTRA_TEST images
TINY_VAE = {"latent_dim": LATENT_DIM, "epochs": 1, "batch_size": 16, "max_train_images": 48}
STEPS = 3  # 48 images / batch 16, one epoch
MAKE_IT = "hmlib run --profile smoke --only 02"


@pytest.fixture
def fake_data(monkeypatch) -> FakeData:
    """Synthetic ImageSets in place of hmlib.data.load_split; records what was loaded."""
    return install_fake_data(monkeypatch, NUM_IMAGES, EXTRA_TEST)


def tiny_cfg(**vae_overrides):
    return load_config("smoke", overrides={"vae": {**TINY_VAE, **vae_overrides}})


def _files(meta) -> list[str]:
    """Names of every file in the folder of the checkpoint ``meta`` describes."""
    return sorted(p.name for p in Path(meta["path"]).parent.iterdir())


# ------------------------------------------------------------------------------------ model and loss

@pytest.mark.parametrize("variant", ["conv", "prototype"])
def test_shapes(variant):
    """encode gives (B, d) twice, forward (B, 1, 28, 28) logits, reconstruct images in [0, 1]."""
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
    """A variant that is not built is a ConfigError naming vae.variant."""
    with pytest.raises(ConfigError, match="vae.variant"):
        build_vae(VAEConfig(variant="transformer"))


@pytest.mark.parametrize("likelihood", ["bce", "mse_ssim"])
def test_loss_decreases_on_tiny_data(likelihood):
    """Fifteen full-batch steps on 16 images lower the loss by a fifth (from a seeded initialisation: the ratio is
    0.58-0.72 for bce and 0.35-0.50 for mse_ssim over seeds 0-9, so the test does not hang on the global RNG's state
    that earlier tests leave)."""
    images, _ = synthetic_images(16, seed=0)
    torch.manual_seed(0)
    cfg = VAEConfig(latent_dim=LATENT_DIM, likelihood=likelihood, epochs=15, batch_size=16,
                    beta_start=1.0, beta_end=1.0, lr=2e-3)
    result = train_vae(build_vae(cfg), images, cfg, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 15
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert result.metrics["num_steps"] == 15 and result.metrics["num_train_images"] == 16


def test_beta_schedule_is_linear_from_start_to_end():
    """Beta goes linearly from beta_start at the first step to beta_end at the last; training records it."""
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
    assert [h["epoch"] for h in history] == [0, 0, 0, 1, 1, 1]


def test_kl_and_ssim_reference_values():
    """KL of N(0, I) is 0 and matches the closed form otherwise; SSIM of an image with itself is 1."""
    mu, logvar = torch.zeros(3, LATENT_DIM), torch.zeros(3, LATENT_DIM)
    assert torch.allclose(kl_per_sample(mu, logvar), torch.zeros(3))
    mu = torch.full((1, LATENT_DIM), 2.0)
    logvar = torch.full((1, LATENT_DIM), np.log(0.5))
    expected = 0.5 * LATENT_DIM * (0.5 + 4.0 - 1 - np.log(0.5))
    assert kl_per_sample(mu, logvar).item() == pytest.approx(expected, rel=1e-5)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(x, torch.rand(2, 1, 28, 28)) < 0.5).all()


def test_training_rejects_float_images_and_no_images():
    """Training needs uint8 (n, 28, 28) images, at least one."""
    cfg = VAEConfig(latent_dim=LATENT_DIM)
    with pytest.raises(ValueError, match="uint8"):
        train_vae(build_vae(cfg), np.random.rand(4, 28, 28), cfg, progress=False)
    with pytest.raises(ValueError, match="no training images"):
        train_vae(build_vae(cfg), np.zeros((0, 28, 28), np.uint8), cfg, progress=False)


def test_balanced_selection_repeats_small_datasets():
    """Each dataset gets an equal share, small ones repeated; None takes every image."""
    sets = [ImageSet("big", "train", np.zeros((100, 28, 28), np.uint8), np.zeros(100, np.int64), ["0"], "a"),
            ImageSet("small", "train", np.ones((7, 28, 28), np.uint8), np.zeros(7, np.int64), ["0"], "b")]
    images, counts = select_training_images(sets, 40, seed=0)
    assert counts == {"big": 20, "small": 20}
    assert (images == 1).all(axis=(1, 2)).sum() == 20
    _, counts = select_training_images(sets, None, seed=0)
    assert counts == {"big": 100, "small": 7}


# ------------------------------------------------------------------------------------ NaN guard

def _diverge_after_first_step(monkeypatch) -> None:
    """Make the VAE loss NaN from the second training step on."""
    real_loss = train_mod.vae_loss
    calls = {"n": 0}

    def diverging_loss(*args, **kwargs):
        terms = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 2:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(train_mod, "vae_loss", diverging_loss)


def test_nan_loss_stops_training_and_writes_nothing(fake_data, monkeypatch, hmlib_home):
    """A NaN loss stops training with a clear error; no checkpoint or temporary file is written."""
    _diverge_after_first_step(monkeypatch)
    with pytest.raises(VAETrainingError, match="step 1 .*no checkpoint was written.*vae.lr"):
        get_vae(tiny_cfg(), "mnist", 0, progress=False)
    models = hmlib_home / "models"
    assert not models.exists() or not list(models.iterdir())


def test_nan_loss_on_retrain_keeps_the_last_good_checkpoint(fake_data, monkeypatch):
    """A diverging retrain on request leaves the good checkpoint in place, unchanged, and still reused."""
    _, good = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    path = Path(good["path"])
    before = path.read_bytes()
    _diverge_after_first_step(monkeypatch)
    with pytest.raises(VAETrainingError, match="step 1"):
        get_vae(tiny_cfg(retrain="always"), "mnist", 0, progress=False)
    assert path.read_bytes() == before and _files(good) == [path.name]
    _, again = get_vae(tiny_cfg(retrain="never"), "mnist", 0, progress=False)
    assert again["reused"] and again["vae_id"] == good["vae_id"]


# ------------------------------------------------------------------------------------ get_vae and checkpoints

def test_shared_vae_never_sees_held_out_dataset(fake_data):
    """The shared VAE loads and trains on the meta-training datasets' train splits only."""
    cfg = tiny_cfg()
    assert "mnist" in cfg.meta.test_datasets
    _, meta = get_vae(cfg, "shared", 0, progress=False)
    assert sorted(fake_data.loaded) == sorted((d, "train") for d in cfg.meta.train_datasets)
    assert sorted(meta["train_counts"]) == sorted(meta["data_fingerprints"]) == sorted(cfg.meta.train_datasets)
    assert meta["scope"] == "shared" and meta["seed"] == 0 and meta["kind"] == "vae"
    assert sum(meta["train_counts"].values()) == TINY_VAE["max_train_images"]
    assert meta["name"].startswith(f"vae_shared_d{LATENT_DIM}_seed0-") and meta["path"].endswith(".pt")


def test_dataset_scope_trains_on_its_train_split(fake_data):
    """A dataset's own VAE reads that dataset's train split only; an unknown scope is refused."""
    _, meta = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    assert fake_data.loaded == [("mnist", "train")]
    assert meta["name"].startswith(f"vae_mnist_d{LATENT_DIM}_seed0-") and list(meta["train_counts"]) == ["mnist"]
    with pytest.raises(ConfigError, match="scope"):
        get_vae(tiny_cfg(), "not_a_dataset", 0, progress=False)


def test_checkpoint_round_trip_and_reuse(fake_data, capsys):
    """A trained VAE is saved, loads back to the same encoder, and is reused (same vae_id) when settings match."""
    cfg = tiny_cfg()
    model, meta = get_vae(cfg, "mnist", 0, progress=False)
    assert meta["reused"] is False and len(meta["history"]) == STEPS
    images, _ = synthetic_images(10, seed=5)
    loaded, loaded_meta = load_vae(meta["path"])
    for a, b in zip(encode_images(model, images), encode_images(loaded, images)):
        np.testing.assert_array_equal(a, b)
    capsys.readouterr()
    again, again_meta = get_vae(cfg, "mnist", 0, progress=False)
    assert again_meta["reused"] is True and again_meta["vae_id"] == meta["vae_id"] == loaded_meta["vae_id"]
    assert again_meta["path"] == meta["path"]
    assert "Reusing VAE" in capsys.readouterr().out
    np.testing.assert_array_equal(encode_images(again, images)[0], encode_images(model, images)[0])


def test_load_vae_refuses_other_kinds(tmp_path):
    """load_vae refuses a checkpoint that is not a VAE's."""
    path = save_checkpoint(tmp_path / "b.pt", {}, {"kind": "backbone"})
    with pytest.raises(ArtifactError, match="not a VAE checkpoint"):
        load_vae(path)


def test_other_settings_or_data_get_another_file(fake_data):
    """Other settings, seeds or images give another checkpoint; the first is never overwritten and is reused again."""
    _, first = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    before = Path(first["path"]).read_bytes()
    _, other_lr = get_vae(tiny_cfg(lr=5e-4), "mnist", 0, progress=False)
    _, other_seed = get_vae(tiny_cfg(), "mnist", 1, progress=False)
    fake_data.version = 1  # same settings, other images
    _, other_images = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    paths = {first["path"], other_lr["path"], other_seed["path"], other_images["path"]}
    assert len(paths) == 4 and not any(m["reused"] for m in (other_lr, other_seed, other_images))
    assert len({first["vae_id"], other_lr["vae_id"], other_seed["vae_id"], other_images["vae_id"]}) == 4
    assert Path(first["path"]).read_bytes() == before
    fake_data.version = 0
    _, back = get_vae(tiny_cfg(retrain="never"), "mnist", 0, progress=False)
    assert back["reused"] and back["path"] == first["path"] and back["vae_id"] == first["vae_id"]


def test_shared_checkpoint_of_other_datasets_is_not_overwritten(fake_data):
    """A shared VAE of other meta-training datasets gets its own file; both stay usable."""
    _, first = get_vae(tiny_cfg(), "shared", 0, progress=False)
    other = load_config("smoke", overrides={"vae": TINY_VAE, "meta": {"train_datasets": ["fashion_mnist"]}})
    _, meta = get_vae(other, "shared", 0, progress=False)
    assert meta["path"] != first["path"] and list(meta["data_fingerprints"]) == ["fashion_mnist"]
    _, meta = get_vae(tiny_cfg(retrain="never"), "shared", 0, progress=False)
    assert meta["reused"] is True and meta["vae_id"] == first["vae_id"]


def test_retrain_never_and_train_false_refuse_to_train(fake_data, hmlib_home):
    """Without a checkpoint, retrain='never' and train=False raise MissingArtifactError naming file and command."""
    for cfg, kwargs in ((tiny_cfg(retrain="never"), {}), (tiny_cfg(), {"train": False})):
        with pytest.raises(MissingArtifactError) as err:
            get_vae(cfg, "mnist", 0, progress=False, **kwargs)
        text = str(err.value)
        assert f"vae_mnist_d{LATENT_DIM}_seed0-" in text and "not found" in text and MAKE_IT in text
    assert not (hmlib_home / "models").exists() or not list((hmlib_home / "models").iterdir())
    _, meta = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    _, again = get_vae(tiny_cfg(), "mnist", 0, train=False, progress=False)
    assert again["reused"] and again["vae_id"] == meta["vae_id"]


def test_retrain_always_keeps_the_previous_beside(fake_data):
    """retrain='always' trains again and keeps the previous checkpoint as '.previous-1'."""
    _, first = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    path = Path(first["path"])
    before = path.read_bytes()
    _, second = get_vae(tiny_cfg(retrain="always"), "mnist", 0, progress=False)
    assert second["reused"] is False and second["path"] == first["path"]
    assert (path.parent / f"{path.stem}.previous-1.pt").read_bytes() == before
    assert second["vae_id"] == first["vae_id"]  # same settings and seed: the same weights again


def test_corrupt_checkpoint_is_set_aside_and_retrained(fake_data, capsys):
    """A corrupt checkpoint is refused by load_vae and 'never'; 'auto' renames it aside (kept) and retrains."""
    _, first = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    path = Path(first["path"])
    path.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_vae(path)
    with pytest.raises(MissingArtifactError, match=f"cannot be reused.*{MAKE_IT}"):
        get_vae(tiny_cfg(retrain="never"), "mnist", 0, progress=False)
    assert path.read_bytes() == b"definitely not a checkpoint"
    _, meta = get_vae(tiny_cfg(), "mnist", 0, progress=False)
    assert meta["reused"] is False and load_vae(path)[1]["vae_id"] == meta["vae_id"] == first["vae_id"]
    assert (path.parent / f"{path.stem}.corrupt-1.pt").read_bytes() == b"definitely not a checkpoint"
    assert "corrupt" in capsys.readouterr().out


def test_get_all_vaes_covers_every_seed(fake_data):
    """One shared VAE (it conditions the hypernetwork in both settings) for every replicate seed."""
    cfg = load_config("smoke", overrides={"vae": TINY_VAE, "seeds": [0, 1], "ablation": {"num_seeds": 1},
                                          "meta": {"train_datasets": ["fashion_mnist"]}})
    vaes = get_all_vaes(cfg, progress=False)
    assert sorted(vaes) == [("shared", 0), ("shared", 1)]
    assert all(meta["scope"] == scope and meta["seed"] == seed for (scope, seed), (_, meta) in vaes.items())


# ------------------------------------------------------------------------------------ latents

def _latent_path(cfg, scope: str, dataset: str, split: str):
    _, meta = get_vae(cfg, scope, 0, train=False, progress=False, verbose=False)
    return cache_path("latents", meta["name"], dataset, split)


def test_get_latents_matches_contract_and_is_cached(fake_data, monkeypatch):
    """Latents are float32 (n, d) pairs with int64 labels, written once and then read from the cache."""
    latents = get_latents(tiny_cfg(), "mnist", "test", 0, progress=False)
    assert isinstance(latents, LatentSet) and (latents.name, latents.split) == ("mnist", "test")
    assert latents.mu.shape == latents.logvar.shape == (NUM_IMAGES + EXTRA_TEST, LATENT_DIM)
    assert latents.mu.dtype == latents.logvar.dtype == np.float32 and latents.labels.dtype == np.int64
    assert latents.distribution.shape == (NUM_IMAGES + EXTRA_TEST, 2 * LATENT_DIM) and len(latents) == 45
    path = _latent_path(tiny_cfg(), "shared", "mnist", "test")
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert read_json(path.with_suffix(".json"))["vae_id"] == latents.vae_id

    def must_not_encode(*args, **kwargs):
        raise AssertionError("a fresh cache must be read, not re-encoded")

    monkeypatch.setattr(latents_mod, "encode_images", must_not_encode)
    cached = get_latents(tiny_cfg(), "mnist", "test", 0, progress=False)
    np.testing.assert_array_equal(cached.mu, latents.mu)
    np.testing.assert_array_equal(cached.labels, latents.labels)
    assert cached.vae_id == latents.vae_id


def test_latents_come_from_the_shared_vae(fake_data):
    """Latents of any split are encoded by the shared VAE of the replicate (never a dataset's own)."""
    latents = get_latents(tiny_cfg(), "mnist", "train", 0, progress=False)
    _, meta = get_vae(tiny_cfg(), "shared", 0, train=False, progress=False, verbose=False)
    assert latents.vae_id == meta["vae_id"]
    assert _latent_path(tiny_cfg(), "shared", "mnist", "train").is_file()


def test_latents_are_reencoded_when_the_vae_changes(fake_data, capsys):
    """A cache made by another VAE (other vae_id) under the same name is stale: re-encoded, and says so."""
    cfg = tiny_cfg()
    vae, meta = get_vae(cfg, "mnist", 0, progress=False)
    image_set = hmlib.data.load_split("mnist", "test", cfg.data)
    first = encode_split(vae, meta, image_set)
    path = cache_path("latents", meta["name"], "mnist", "test")
    manifest = read_json(path.with_suffix(".json"))
    with pytest.raises(StaleArtifactError, match="vae_id"):
        read_features(path, {**manifest, "vae_id": "0" * 16})
    other, other_meta = get_vae(cfg, "mnist", 1, progress=False)  # other weights, same cache name below
    capsys.readouterr()
    again = encode_split(other, {**other_meta, "name": meta["name"]}, image_set)
    out = capsys.readouterr().out
    assert "stale" in out and "vae_id" in out
    assert again.vae_id == other_meta["vae_id"] != first.vae_id and not np.allclose(again.mu, first.mu)
    np.testing.assert_array_equal(again.mu, encode_images(other, image_set.images)[0])
    assert read_json(path.with_suffix(".json"))["vae_id"] == other_meta["vae_id"]


def test_latents_are_reencoded_when_the_images_change(fake_data, capsys):
    """A cache of other images (other fingerprint) is stale: re-encoded from the new images."""
    cfg = tiny_cfg()
    vae, meta = get_vae(cfg, "mnist", 0, progress=False)
    image_set = hmlib.data.load_split("mnist", "test", cfg.data)
    first = encode_split(vae, meta, image_set)
    changed = dataclasses.replace(image_set, images=255 - image_set.images, fingerprint="other images")
    path = cache_path("latents", meta["name"], "mnist", "test")
    manifest = read_json(path.with_suffix(".json"))
    with pytest.raises(StaleArtifactError, match="image_fingerprint"):
        read_features(path, {**manifest, "image_fingerprint": "other images"})
    capsys.readouterr()
    again = encode_split(vae, meta, changed)
    assert "image_fingerprint" in capsys.readouterr().out
    assert not np.allclose(again.mu, first.mu)
    np.testing.assert_array_equal(again.mu, encode_images(vae, changed.images)[0])
    assert read_json(path.with_suffix(".json"))["image_fingerprint"] == "other images"


def test_corrupt_latent_cache_is_reencoded(fake_data):
    """A garbage cache file is re-encoded to the same latents."""
    first = get_latents(tiny_cfg(), "mnist", "test", 0, progress=False)
    path = _latent_path(tiny_cfg(), "shared", "mnist", "test")
    path.write_bytes(b"garbage")
    again = get_latents(tiny_cfg(), "mnist", "test", 0, progress=False)
    np.testing.assert_allclose(again.mu, first.mu, rtol=1e-5, atol=1e-6)
    assert read_features(path, read_json(path.with_suffix(".json")))["mu"].shape == first.mu.shape


def test_get_latents_train_false_needs_the_vae(fake_data):
    """Latents with train=False never train the VAE they need."""
    with pytest.raises(MissingArtifactError, match=MAKE_IT):
        get_latents(tiny_cfg(), "mnist", "test", 0, train=False, progress=False)


# ------------------------------------------------------------------------------------ notebook 02 helpers

def test_kmeans_quality_on_separated_latents():
    """k-means on well separated latents solves every task; on noise it is near chance."""
    cfg = load_config("smoke", overrides={"task": {"num_classes": 4, "num_images": 40},
                                          "eval": {"kmeans_n_init": 2}})
    labels = np.repeat(np.arange(6), 30)
    centres = np.eye(6, 5, dtype=np.float32) * 10
    mu = centres[labels] + np.random.default_rng(0).normal(0, 0.1, (len(labels), 5)).astype(np.float32)
    scores = kmeans_quality(cfg, mu, labels, num_tasks=3, normalize=False)
    assert scores.shape == (3,) and np.all(scores == 1.0)
    noise = np.random.default_rng(1).normal(size=mu.shape).astype(np.float32)
    assert kmeans_quality(cfg, noise, labels, num_tasks=3, normalize=False).mean() < 0.7


def test_pick_examples_spreads_over_classes():
    """Examples cover every class before any class repeats."""
    labels = np.repeat(np.arange(5), [3, 10, 1, 7, 2])
    picked = pick_examples(labels, num=5)
    assert sorted(labels[picked]) == [0, 1, 2, 3, 4]
    picked = pick_examples(labels, num=8)
    assert len(set(picked)) == 8 and np.bincount(labels[picked], minlength=5).max() == 2


def test_the_command_that_makes_a_missing_artifact_keeps_the_runs_config():
    """A second first-hour audit: a run whose --config changed the VAE was told to make it with the profile alone,
    which makes the profile's VAE, not the missing one, so the same error came back."""
    from hmlib.config import with_overrides
    from hmlib.vae.train import make_command
    smoke = load_config("smoke")
    assert make_command(smoke, "02") == MAKE_IT
    assert make_command(with_overrides(smoke, {"vae": {"latent_dim": 8}}), "02") == \
        f"{MAKE_IT} --config <the file this run read>"
