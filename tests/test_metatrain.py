"""Meta-training on tiny synthetic Gaussian blobs: learning, checkpoints, reuse, resume, mismatch, corruption."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hmlib.adapt import predict_task
from hmlib.artifacts import ArtifactError, StaleArtifactError, load_checkpoint, save_checkpoint
from hmlib.config import load_config
from hmlib.hypernet import TaskInputs
from hmlib.metatrain import MetaTrainingError, checkpoint_path, fit_hypernet, load_hypernet, meta_train

LATENT_DIM, NUM_CLASSES, PER_CLASS, NUM_IMAGES, QUERY = 6, 5, 60, 32, 16
OVERRIDES = {"task": {"num_images": NUM_IMAGES},
             "hyper": {"target_hidden": [16], "embed_dim": 16, "head_hidden": 16, "num_seeds": 2, "num_heads": 2},
             "meta": {"iterations": 6, "eval_every": 3, "eval_tasks": 4, "meta_batch_size": 2, "query_size": QUERY,
                      "val_fraction": 0.3}}


def blobs(name: str, seed: int, separation: float = 3.0) -> SimpleNamespace:
    """A LatentSet-like dataset: NUM_CLASSES Gaussian blobs in LATENT_DIM dimensions."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(NUM_CLASSES, LATENT_DIM)) * separation
    labels = np.repeat(np.arange(NUM_CLASSES), PER_CLASS)
    mu = (means[labels] + rng.normal(size=(len(labels), LATENT_DIM))).astype(np.float32)
    logvar = (rng.normal(scale=0.1, size=mu.shape) - 1.0).astype(np.float32)
    return SimpleNamespace(name=name, mu=mu, logvar=logvar, labels=labels, vae_id=f"vae-{seed}")


def _cfg(**meta):
    overrides = {**OVERRIDES, "meta": {**OVERRIDES["meta"], **meta}}
    return load_config("default", overrides=overrides)


def _fit(cfg, path, **kw):
    sets = {"a": blobs("a", 0), "b": blobs("b", 1)}
    return fit_hypernet(cfg, sets, seed=0, path=path, upstream={"vae_ids": {"a": "v1", "b": "v1"}},
                        progress=False, **kw)


def test_meta_training_improves_validation_accuracy(tmp_path):
    cfg = _cfg(iterations=40, eval_every=10, eval_tasks=8, meta_batch_size=4, outer_lr=3e-3)
    result = _fit(cfg, tmp_path / "h.pt", monitor_set=blobs("held", 7))
    history = result.history
    assert history["eval_iteration"] == [0, 10, 20, 30, 40]
    assert len(history["outer_loss"]) == 40 and all(np.isfinite(history["outer_loss"]))
    assert max(history["val_acc_after"][1:]) > history["val_acc_after"][0] + 0.1
    assert np.mean(history["outer_loss"][-10:]) < np.mean(history["outer_loss"][:10])
    assert len(history["monitor_acc_after"]) == 5


def test_checkpoint_round_trip_and_reuse(tmp_path, capsys):
    cfg, path = _cfg(), tmp_path / "h.pt"
    result = _fit(cfg, path)
    hypernet, meta = load_hypernet(path)
    assert meta["setting"] == "zero_shot" and meta["complete"] and meta["iteration"] == 6 and meta["vae_id"] == "v1"
    assert meta["config"]["meta"]["iterations"] == 6
    task = blobs("t", 3)
    inputs = TaskInputs(torch.as_tensor(task.mu[:NUM_IMAGES]), torch.as_tensor(task.logvar[:NUM_IMAGES]))
    torch.testing.assert_close(predict_task(hypernet, inputs, cfg.adapt), predict_task(result.hypernet, inputs, cfg.adapt))
    again = _fit(cfg, path)
    assert again.reused and "Reusing" in capsys.readouterr().out
    torch.testing.assert_close(predict_task(again.hypernet, inputs, cfg.adapt), predict_task(hypernet, inputs, cfg.adapt))


def test_interrupted_run_resumes_from_the_saved_iteration(tmp_path, capsys):
    path = tmp_path / "h.pt"
    full = _fit(_cfg(), tmp_path / "full.pt")
    # an interrupted run: train 3 iterations, then mark the checkpoint as unfinished at iteration 3 of 6
    _fit(_cfg(iterations=3), path)
    state, meta = load_checkpoint(path)
    meta = {**meta, "complete": False, "total_iterations": 6,
            "training": {**meta["training"], "meta": {**meta["training"]["meta"], "iterations": 6}}}
    save_checkpoint(path, state, meta)
    resumed = _fit(_cfg(), path)
    out = capsys.readouterr().out
    assert "Resuming meta-training" in out and "at iteration 3/6" in out
    assert resumed.meta["iteration"] == 6 and resumed.meta["complete"]
    assert resumed.history["iteration"] == list(range(1, 7))
    # same tasks per iteration (seeded per iteration) and the optimizer state restored: same result
    np.testing.assert_allclose(resumed.history["outer_loss"], full.history["outer_loss"], rtol=1e-4)


def test_mismatched_checkpoint_is_refused_or_retrained(tmp_path, capsys):
    path = tmp_path / "h.pt"
    _fit(_cfg(), path)
    with pytest.raises(StaleArtifactError, match=r"training\.meta\.outer_lr: recorded 0\.001, expected 0\.0005"):
        _fit(_cfg(outer_lr=5e-4, retrain="never"), path)
    sets = {"a": blobs("a", 0), "b": blobs("b", 1)}
    with pytest.raises(StaleArtifactError, match=r"upstream\.vae_ids\.a: recorded \"v1\", expected \"v2\""):  # another VAE
        fit_hypernet(_cfg(retrain="never"), sets, seed=0, path=path, upstream={"vae_ids": {"a": "v2", "b": "v2"}},
                     progress=False)
    result = _fit(_cfg(outer_lr=5e-4), path)  # retrain="auto": says why, then retrains
    assert not result.reused and "Retraining" in capsys.readouterr().out
    assert load_checkpoint(path)[1]["training"]["meta"]["outer_lr"] == 5e-4


def test_corrupt_checkpoint_errors(tmp_path):
    path = tmp_path / "h.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_hypernet(path)
    with pytest.raises(ArtifactError):
        _fit(_cfg(retrain="never"), path)
    assert not _fit(_cfg(), path).reused  # "auto" retrains over the corrupt file
    state, meta = load_checkpoint(path)
    state["best_model"] = {k: v for k, v in list(state["best_model"].items())[1:]}
    save_checkpoint(path, state, meta)
    with pytest.raises(ArtifactError, match="does not fit"):
        load_hypernet(path)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    sets = {"a": blobs("a", 0), "b": blobs("b", 1)}
    sets["b"].mu[:] = np.nan
    path = tmp_path / "h.pt"
    with pytest.raises(MetaTrainingError, match="non-finite"):
        fit_hypernet(_cfg(task_mixing="single"), sets, seed=0, path=path, progress=False)
    state, meta = load_checkpoint(path)
    assert not meta["complete"]
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_meta_train_uses_the_settings_latents(monkeypatch):
    calls = []

    def fake_get_latents(cfg, dataset, split, setting, *, progress=True):
        calls.append((dataset, split, setting))
        return blobs(dataset, hash(dataset) % 100)

    import hmlib.latents
    monkeypatch.setattr(hmlib.latents, "get_latents", fake_get_latents)
    cfg = load_config("default", overrides={**OVERRIDES, "meta": {**OVERRIDES["meta"], "iterations": 2}})
    result = meta_train(cfg, "transductive", 1, progress=False)
    assert result.checkpoint_path == checkpoint_path("transductive", 1)
    assert result.checkpoint_path.name == "hypernet_transductive_seed1.pt"
    assert {c[1] for c in calls} == {"train"}  # never the test split
    assert [c[0] for c in calls] == [*cfg.meta.train_datasets, cfg.meta.test_datasets[0]]
    assert set(result.meta["upstream"]["vae_ids"]) == set(cfg.meta.train_datasets)
    named = meta_train(cfg, "transductive", 1, name="variant_x", progress=False)
    assert named.checkpoint_path.name == "variant_x.pt"
    with pytest.raises(ValueError, match="unknown setting"):
        meta_train(cfg, "bogus", 0)


def test_pixels_as_extra_input_are_carried_through_meta_training(tmp_path):
    sets = {"a": blobs("a", 0), "b": blobs("b", 1)}
    rng = np.random.default_rng(0)
    for s in sets.values():
        s.pixels = rng.integers(0, 256, size=(len(s.labels), 28, 28), dtype=np.uint8)
    cfg = load_config("default", overrides={**OVERRIDES, "hyper": {**OVERRIDES["hyper"], "target_input": "latent+pixels",
                                                                              "generation": "compact"}})
    result = fit_hypernet(cfg, sets, seed=0, path=tmp_path / "p.pt", progress=False)
    assert result.hypernet.use_pixels and len(result.history["outer_loss"]) == cfg.meta.iterations
    hypernet, _ = load_hypernet(tmp_path / "p.pt")
    assert hypernet.pixel_proj is not None


def test_meta_plots_return_figures(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from hmlib.plots.meta import plot_task_adaptation, plot_training_curves

    history = _fit(_cfg(), tmp_path / "h.pt").history
    fig = plot_training_curves({"seed 0": history, "seed 1": history}, chance=0.25)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    labels = np.repeat(np.arange(3), 5)
    fig = plot_task_adaptation(np.random.default_rng(0).normal(size=(15, 2)), labels,
                               {"before": (labels + 1) % 3, "after": labels})
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes][1:] == ["before: 100% right",
                                                                                   "after: 100% right"]


def test_outer_loss_on_support_and_query(tmp_path):
    result = _fit(_cfg(outer_batch="support+query"), tmp_path / "sq.pt")
    assert len(result.history["outer_loss"]) == 6 and all(np.isfinite(result.history["outer_loss"]))
