"""Meta-training on tiny synthetic image datasets: learning, checkpoints, reuse, resume, set-aside, errors, the
pipeline manifest, bundles, and what meta_train reads."""
from __future__ import annotations

import copy
import dataclasses
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from datafactory import balanced_labels, class_patterns
from fakes import install_fake_data
from hmlib import paths
from hmlib.artifacts import (ArtifactError, MissingArtifactError, StaleArtifactError, load_checkpoint,
                             save_checkpoint, state_fingerprint)
from hmlib.backbone import get_backbone
from hmlib.backbone.model import ConvBackbone
from hmlib.config import VAEConfig, load_config
from hmlib.data import ImageSet
from hmlib.hyper import episodes, metatrain
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.bundle import bundle_for, load_bundle
from hmlib.hyper.checkpoints import load_hypernet
from hmlib.hyper.inputs import TaskData, task_data_from_models
from hmlib.hyper.metatrain import (MetaTrainingError, fit_hypernet, meta_train, pipeline_checkpoints,
                                   record_pipeline_checkpoint)
from hmlib.plots.meta import plot_task_adaptation, plot_training_curves
from hmlib.reproducibility import seeded
from hmlib.vae import get_vae
from hmlib.vae.model import build_vae
from hmlib.vae.train import encode_images

# Tiny sizes
NUM_ALL_CLASSES, PER_CLASS, K, TASK_IMAGES, LATENT_DIM = 5, 20, 3, 18, 2
ITERATIONS, EVAL_EVERY = 4, 2
NOISE = 200  # pixel noise of the class patterns: tasks that are not trivially separable
OVERRIDES = {"task": {"num_classes": K, "num_images": 24},
             "backbone": {"channels": [4, 8], "embed_dim": 8},
             "hyper": {"embed_dim": 8, "num_seeds": 2, "num_heads": 2, "num_context": 32},
             "film": {"cluster_inits": 2},
             "full": {"head_hidden": 16, "target_hidden": [16]},
             "adapt": {"num_inner_steps": 2, "neighbours": 3},
             "meta": {"iterations": ITERATIONS, "eval_every": EVAL_EVERY, "eval_tasks": 2, "meta_batch_size": 2,
                      "val_fraction": 0.3, "max_classes": K, "task_images": TASK_IMAGES, "shift_prob": 0.5}}
UPSTREAM = {"ids": {"a": {"vae_id": "v1"}, "b": {"vae_id": "v1"}}}
VAE_META = {"name": "vae_test", "vae_id": "vae-test"}  # the cache name and identity of the test's VAE


def _cfg(generation: str = "film", **meta):
    """The tiny meta-training config, with meta.* overrides ('full': one K and the aligned outer loss)."""
    fixed_k = {"min_classes": K, "outer_loss": "aligned"} if generation == "full" else {}
    overrides = {**OVERRIDES, "hyper": {**OVERRIDES["hyper"], "generation": generation},
                 "meta": {**OVERRIDES["meta"], **fixed_k, **meta}}
    return load_config("smoke", overrides=overrides)


with seeded(0):
    VAE = build_vae(VAEConfig(latent_dim=LATENT_DIM)).eval()
    BACKBONE = ConvBackbone((4, 8), 8, 3).eval()
# what meta_train bundles for 'film': the backbone a checkpoint modulates, rebuilt from it by load_hypernet
BUNDLE = {"backbone": {"state": {k: v.clone() for k, v in BACKBONE.state_dict().items()},
                       "meta": {"name": "backbone_test", "backbone_id": state_fingerprint(BACKBONE.state_dict()),
                                "settings": {"channels": [4, 8], "embed_dim": 8}, "metrics": {"num_classes": 3}}}}


def pattern_set(name: str, index: int, seed: int, noise: int = NOISE) -> ImageSet:
    """NUM_ALL_CLASSES noisy bar patterns of varying contrast; datasets ``index`` 0, 1, ... use disjoint angles."""
    labels = balanced_labels(NUM_ALL_CLASSES * PER_CLASS, NUM_ALL_CLASSES, seed)
    images = class_patterns(labels + NUM_ALL_CLASSES * index, 2 * NUM_ALL_CLASSES, seed=seed).astype(np.int64)
    rng = np.random.default_rng(seed)
    images = images * rng.uniform(0.2, 1.0, (len(images), 1, 1)) + rng.integers(0, noise + 1, images.shape)
    return ImageSet(name, "train", np.clip(images, 0, 255).astype(np.uint8), labels,
                    [str(c) for c in range(NUM_ALL_CLASSES)], f"{name}-{seed}")


def _sets(cfg=None) -> dict[str, TaskData]:
    """Two meta-training datasets as the loader makes them (task_data_from_models) for ``cfg``'s generator."""
    cfg = cfg or _cfg()
    return {name: task_data_from_models(cfg, pattern_set(name, i, seed=i), VAE, VAE_META)
            for i, name in enumerate(("a", "b"))}


def _fit(cfg, path, **kw):
    """fit_hypernet on the two pattern datasets, seed 0, recorded upstream ids UPSTREAM."""
    kw.setdefault("upstream", UPSTREAM)
    film = cfg.hyper.generation == "film"
    kw.setdefault("backbone", BACKBONE if film else None)
    kw.setdefault("bundle", BUNDLE if film else None)
    return fit_hypernet(cfg, kw.pop("sets", None) or _sets(cfg), vae=VAE, seed=0, path=path, progress=False, **kw)


def _task(cfg=None):
    """One held-out task (the first 18 images of a third pattern dataset) as TaskInputs."""
    return task_data_from_models(cfg or _cfg(), pattern_set("t", 2, seed=3), VAE, VAE_META).task_inputs(
        np.arange(TASK_IMAGES)[None])


def _assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# ------------------------------------------------------------------------------------------- learning

def test_meta_training_the_full_generator_raises_validation_accuracy(tmp_path):
    """The prototype's generator (MLP on [mu, logvar] rows, aligned outer loss) learns the datasets' classes:
    validation accuracy after adaptation rises well above where it started, the outer loss falls."""
    cfg = load_config("smoke", overrides={
        **OVERRIDES, "hyper": {**OVERRIDES["hyper"], "embed_dim": 16, "generation": "full"},
        "adapt": {"num_inner_steps": 2, "inner_loss": "infomax"},
        "meta": {**OVERRIDES["meta"], "iterations": 40, "eval_every": 10, "eval_tasks": 16, "meta_batch_size": 4,
                 "min_classes": K, "shift_prob": 0.0, "outer_lr": 3e-3, "outer_loss": "aligned"}})
    with seeded(0):
        vae = build_vae(VAEConfig(latent_dim=8)).eval()  # clean patterns, wider rows: a learnable signal
    sets = {name: task_data_from_models(cfg, pattern_set(name, i, seed=i, noise=40), vae,
                                        {"name": "vae_8", "vae_id": "vae-8"}) for i, name in enumerate(("a", "b"))}
    history = fit_hypernet(cfg, sets, vae=vae, seed=0, path=tmp_path / "h.pt", progress=False).history
    assert history["eval_iteration"] == [0, 10, 20, 30, 40]
    assert len(history["outer_loss"]) == 40 and all(np.isfinite(history["outer_loss"]))
    assert max(history["val_acc_after"][1:]) > history["val_acc_after"][0] + 0.15
    assert np.mean(history["outer_loss"][-10:]) < 0.5 * np.mean(history["outer_loss"][:10])
    assert len(history["inner_loss_before"]) == len(history["inner_loss_after"]) == 40


def test_the_film_outer_loop_fits_a_meta_batch(tmp_path, monkeypatch):
    """Meta-training the film generator on one repeated meta-batch drives its class-centroid outer loss down: the
    gradient of the outer loss reaches the hypernetwork through the inner loop and the optimiser follows it."""
    original, fixed = episodes.EpisodeSampler.sample, {}

    def the_same_batch(self, rng, num_classes=None):
        if "episode" not in fixed:
            fixed["episode"] = original(self, np.random.default_rng(0), num_classes)
        return fixed["episode"]

    monkeypatch.setattr(episodes.EpisodeSampler, "sample", the_same_batch)
    cfg = _cfg(iterations=30, eval_every=30, meta_batch_size=4, min_classes=K, shift_prob=0.0, outer_lr=1e-2)
    history = _fit(cfg, tmp_path / "h.pt").history
    assert np.mean(history["outer_loss"][-10:]) < 0.5 * np.mean(history["outer_loss"][:3])


def test_the_best_validation_weights_are_kept(tmp_path):
    """The weights returned (and saved as best_model) are those of the best validation accuracy, iteration 0
    included; the history records K and every layer's mean blend per iteration."""
    cfg, path = _cfg(iterations=6, eval_every=2), tmp_path / "h.pt"
    result = _fit(cfg, path)
    history = result.history
    state, meta = load_checkpoint(path)
    best = meta["best"]
    assert best["val_acc_after"] == max(history["val_acc_after"])
    assert best["iteration"] == history["eval_iteration"][int(np.argmax(history["val_acc_after"]))]
    _assert_same_weights(result.hypernet.state_dict(), state["best_model"])
    assert all(cfg.meta.min_classes <= k <= K for k in history["num_classes"])
    assert len(history["blend"]) == 6 and all(len(b) == 2 and all(0 < v < 1 for v in b) for b in history["blend"])


# ----------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_and_reuse(tmp_path, capsys):
    """The checkpoint rebuilds the best weights exactly; a finished matching checkpoint is reused, not retrained."""
    cfg, path = _cfg(), tmp_path / "h.pt"
    result = _fit(cfg, path)
    assert not result.reused and result.checkpoint_path == path
    hypernet, meta = load_hypernet(path)
    assert meta["kind"] == "hypernet" and meta["complete"] and meta["iteration"] == ITERATIONS
    assert meta["config"]["meta"]["iterations"] == ITERATIONS and meta["upstream"] == UPSTREAM
    assert (meta["context_dim"], meta["feature_dim"], meta["num_classes"]) == (2 * LATENT_DIM, None, K)
    assert meta["history"]["eval_iteration"] == [0, EVAL_EVERY, ITERATIONS]
    assert "film" in meta["training"] and "full" not in meta["training"]  # the configured generator's section only
    torch.testing.assert_close(predict_task(hypernet, _task(), cfg.adapt),
                               predict_task(result.hypernet, _task(), cfg.adapt))
    _assert_same_weights(hypernet.state_dict(), result.hypernet.state_dict())
    capsys.readouterr()
    again = _fit(cfg, path)
    assert again.reused and "Reusing the finished meta-training checkpoint" in capsys.readouterr().out
    _assert_same_weights(again.hypernet.state_dict(), hypernet.state_dict())
    assert again.history == result.history


def _interrupt_outer_loss_at_call(monkeypatch, call: int) -> None:
    """Make meta-training's ``call``-th outer loss raise KeyboardInterrupt (Ctrl-C mid-run)."""
    original, calls = metatrain.outer_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(metatrain, "outer_loss", interrupting)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """A run that stops after its iteration-2 save resumes there and ends with the weights of an uninterrupted run."""
    cfg = _cfg()
    full = _fit(cfg, tmp_path / "full.pt")
    path = tmp_path / "h.pt"
    with monkeypatch.context() as patch:
        _interrupt_outer_loss_at_call(patch, EVAL_EVERY + 2)
        with pytest.raises(KeyboardInterrupt):
            _fit(cfg, path)
    state, meta = load_checkpoint(path)
    assert meta["iteration"] == EVAL_EVERY and not meta["complete"]
    capsys.readouterr()
    resumed = _fit(cfg, path)
    assert f"Resuming meta-training from {path.name} at iteration {EVAL_EVERY}/{ITERATIONS}" in capsys.readouterr().out
    assert resumed.meta["iteration"] == ITERATIONS and resumed.meta["complete"]
    assert resumed.history == full.history  # the same tasks per iteration and the optimizer state restored
    _assert_same_weights(resumed.hypernet.state_dict(), full.hypernet.state_dict())
    _assert_same_weights(load_checkpoint(path)[0]["model"], load_checkpoint(tmp_path / "full.pt")[0]["model"])


def test_a_checkpoint_of_other_settings_is_set_aside_and_retrained(tmp_path, capsys):
    """Other settings or other upstream models: refused with retrain='never', else kept under a new name and
    retrained; retrain='always' keeps the previous one beside."""
    path = tmp_path / "h.pt"
    _fit(_cfg(), path)
    first = path.read_bytes()
    with pytest.raises(StaleArtifactError, match=r"training\.meta\.outer_lr: recorded 0\.001, expected 0\.0005"):
        _fit(_cfg(outer_lr=5e-4, retrain="never"), path)
    with pytest.raises(StaleArtifactError, match=r'upstream\.ids\.a\.vae_id: recorded "v1", expected "v2"'):
        _fit(_cfg(retrain="never"), path, upstream={"ids": {"a": {"vae_id": "v2"}, "b": {"vae_id": "v1"}}})
    with pytest.raises(StaleArtifactError, match=r"training\.film\.inner_lr"):
        _fit(load_config("smoke", overrides={**OVERRIDES, "film": {"cluster_inits": 2, "inner_lr": 0.2},
                                             "meta": {**OVERRIDES["meta"], "retrain": "never"}}), path)
    assert path.read_bytes() == first  # refusing changes nothing
    capsys.readouterr()
    result = _fit(_cfg(outer_lr=5e-4), path)
    out = capsys.readouterr().out
    assert not result.reused and "cannot be reused" in out and "h.stale-1.pt" in out
    assert (tmp_path / "h.stale-1.pt").read_bytes() == first
    assert load_checkpoint(path)[1]["training"]["meta"]["outer_lr"] == 5e-4
    again = _fit(_cfg(outer_lr=5e-4, retrain="always"), path)
    assert not again.reused and (tmp_path / "h.previous-1.pt").is_file()


def test_settings_that_do_not_change_training_do_not_make_a_checkpoint_stale(tmp_path):
    """The held-out datasets, the retrain policy and the other generator's section are not part of the identity."""
    path = tmp_path / "h.pt"
    _fit(_cfg(), path)
    other = load_config("smoke", overrides={**OVERRIDES, "full": {"head_hidden": 4},
                                            "meta": {**OVERRIDES["meta"], "test_datasets": ["mnist"],
                                                     "retrain": "never"}})
    assert _fit(other, path).reused


def test_corrupt_checkpoint_errors(tmp_path, capsys):
    """A corrupt file is an ArtifactError (set aside and retrained with 'auto'); weights that do not fit are named."""
    path = tmp_path / "h.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_hypernet(path)
    with pytest.raises(ArtifactError, match="corrupt"):
        _fit(_cfg(retrain="never"), path)
    assert not _fit(_cfg(), path).reused
    assert (tmp_path / "h.corrupt-1.pt").read_bytes() == b"not a checkpoint"
    state, meta = load_checkpoint(path)
    state["best_model"] = dict(list(state["best_model"].items())[1:])
    save_checkpoint(path, state, meta)
    with pytest.raises(ArtifactError, match="does not fit"):
        load_hypernet(path)
    save_checkpoint(tmp_path / "vae.pt", {}, {"kind": "vae"})
    with pytest.raises(ArtifactError, match="not a hypernetwork checkpoint"):
        load_hypernet(tmp_path / "vae.pt")


def test_train_false_with_a_missing_or_unfinished_checkpoint_raises(tmp_path, monkeypatch):
    """train=False never trains: a missing or unfinished checkpoint is a MissingArtifactError saying how to make it."""
    path = tmp_path / "h.pt"
    with pytest.raises(MissingArtifactError, match=r"not found; make it with: hmlib run --profile smoke --only 03"):
        _fit(_cfg(), path, train=False)
    assert not path.exists()
    with monkeypatch.context() as patch:
        _interrupt_outer_loss_at_call(patch, EVAL_EVERY + 2)
        with pytest.raises(KeyboardInterrupt):
            _fit(_cfg(), path)
    with pytest.raises(MissingArtifactError, match="is unfinished"):
        _fit(_cfg(), path, train=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    """A NaN outer loss stops meta-training with an error; the checkpoint holds the weights before that step."""
    original, weights = metatrain.outer_loss, []

    def nan_at_iteration_4(hypernet, result, labels, num_classes, kind):
        weights.append(copy.deepcopy(hypernet.state_dict()))
        loss = original(hypernet, result, labels, num_classes, kind)
        return loss * float("nan") if len(weights) == 4 else loss

    monkeypatch.setattr(metatrain, "outer_loss", nan_at_iteration_4)
    path = tmp_path / "h.pt"
    with pytest.raises(MetaTrainingError, match="non-finite outer loss"):
        _fit(_cfg(iterations=20, eval_every=20), path)
    state, meta = load_checkpoint(path)
    assert not meta["complete"] and meta["iteration"] == len(weights) - 1 == len(meta["history"]["iteration"])
    assert len(weights) == 4  # three good steps, then the non-finite one
    _assert_same_weights(state["model"], weights[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_unusable_meta_training_data_is_refused(tmp_path):
    """No datasets, datasets of different context widths, too few classes, or classes too small for a validation
    task: clear MetaTrainingErrors."""
    with pytest.raises(MetaTrainingError, match="no meta-training datasets"):
        fit_hypernet(_cfg(), {}, vae=VAE, backbone=BACKBONE, seed=0, path=tmp_path / "h.pt", progress=False)
    sets = _sets()
    narrow = dataclasses.replace(sets["b"], context=sets["b"].context[:, :LATENT_DIM])
    with pytest.raises(MetaTrainingError, match="differ in context widths"):
        _fit(_cfg(), tmp_path / "h.pt", sets={"a": sets["a"], "b": narrow})
    one_class = {name: s.subset(np.flatnonzero(s.labels == 0)) for name, s in sets.items()}
    with pytest.raises(MetaTrainingError, match="fewer than meta.min_classes"):
        _fit(_cfg(), tmp_path / "h.pt", sets=one_class)
    tiny = {name: s.subset(np.concatenate([np.flatnonzero(s.labels == c)[:3] for c in range(NUM_ALL_CLASSES)]))
            for name, s in sets.items()}  # 3 images per class: 1 held back for validation
    with pytest.raises(MetaTrainingError, match="too small"):
        _fit(_cfg(), tmp_path / "h.pt", sets=tiny)
    assert not (tmp_path / "h.pt").exists()


def test_the_backbone_is_frozen_unless_meta_backbone_lr_is_set(tmp_path):
    """meta.backbone_lr = 0: the modulated backbone keeps its weights; > 0: its embedding is fine-tuned, never its
    training head. The backbone passed in is never changed."""
    before = {k: v.clone() for k, v in BACKBONE.state_dict().items()}
    frozen = _fit(_cfg(), tmp_path / "frozen.pt").hypernet.generator.backbone.state_dict()
    _assert_same_weights(frozen, before)
    tuned_path = tmp_path / "tuned.pt"
    _fit(_cfg(backbone_lr=1e-2), tuned_path)
    tuned = {k[len("generator.backbone."):]: v for k, v in load_checkpoint(tuned_path)[0]["model"].items()
             if k.startswith("generator.backbone.")}
    assert not torch.equal(tuned["features.0.weight"], before["features.0.weight"])
    assert not torch.equal(tuned["embedding.weight"], before["embedding.weight"])
    assert torch.equal(tuned["head.weight"], before["head.weight"])
    _assert_same_weights(BACKBONE.state_dict(), before)


def test_meta_training_without_the_inner_loop(tmp_path):
    """meta.use_inner_loop = false (the MT3 ablation): meta-training runs without inner steps (no inner losses
    recorded) and still trains."""
    history = _fit(_cfg(use_inner_loop=False), tmp_path / "h.pt").history
    assert len(history["outer_loss"]) == ITERATIONS and all(np.isfinite(history["outer_loss"]))
    assert all(np.isnan(history["inner_loss_before"])) and all(np.isnan(history["inner_loss_after"]))


def test_the_full_generator_meta_trains_on_the_data_the_loader_makes(tmp_path):
    """Generation 'full' (the seed profile's) meta-trains on TaskData as task_data_from_models makes it: the
    episodes re-encode (possibly shifted) images, the target MLP reads the [mu, logvar] rows."""
    cfg = _cfg("full")
    sets = _sets(cfg)
    assert all(s.features is not None and s.images is not None for s in sets.values())
    result = _fit(cfg, tmp_path / "h.pt", sets=sets)
    assert result.meta["feature_dim"] == 2 * LATENT_DIM and result.meta["complete"]
    inputs = sets["a"].task_inputs(np.arange(TASK_IMAGES)[None])
    assert inputs.images is None and torch.equal(inputs.features, inputs.context)  # the rows only
    assert predict_task(result.hypernet, inputs, cfg.adapt).shape == (cfg.adapt.steps_at_test + 1, 1, TASK_IMAGES, K)


# -------------------------------------------------------------------------------------------- the pipeline manifest

def test_the_pipeline_manifest_records_the_newest_checkpoint_per_seed():
    """models/pipeline.json maps each seed to its newest pipeline checkpoint; read back in seed order; a missing or
    corrupt manifest reads as none and is rewritten by the next record."""
    models = paths.models_dir()
    assert pipeline_checkpoints() == []
    record_pipeline_checkpoint(models / "hypernet_seed2-aaaa.pt", 2)
    record_pipeline_checkpoint(models / "hypernet_seed0-bbbb.pt", 0)
    record_pipeline_checkpoint(models / "hypernet_seed10-cccc.pt", 10)
    assert pipeline_checkpoints() == [models / "hypernet_seed0-bbbb.pt", models / "hypernet_seed2-aaaa.pt",
                                      models / "hypernet_seed10-cccc.pt"]
    record_pipeline_checkpoint(models / "hypernet_seed2-dddd.pt", 2)
    assert pipeline_checkpoints()[1] == models / "hypernet_seed2-dddd.pt"
    assert json.loads((models / "pipeline.json").read_text())["2"] == "hypernet_seed2-dddd.pt"
    (models / "pipeline.json").write_text("{not json")
    assert pipeline_checkpoints() == []
    record_pipeline_checkpoint(models / "hypernet_seed1-eeee.pt", 1)
    assert pipeline_checkpoints() == [models / "hypernet_seed1-eeee.pt"]


# -------------------------------------------------------------------------------------------- meta_train

TINY_UPSTREAM = {"vae": {"latent_dim": LATENT_DIM, "epochs": 1, "max_train_images": 64, "batch_size": 32},
                 "backbone": {"channels": [4, 8], "embed_dim": 8, "epochs": 1, "images_per_dataset": 32,
                              "batch_size": 16}}


def _pipeline_cfg(**meta):
    """The tiny config with tiny upstream models, for meta_train on fake data (4 classes, 80 images a split)."""
    return load_config("smoke", overrides={**OVERRIDES, **TINY_UPSTREAM, "meta": {**OVERRIDES["meta"], **meta}})


def _home_files(home) -> dict[str, int]:
    """Every file under the home, with its modification time (what a call wrote or rewrote)."""
    return {str(f.relative_to(home)): f.stat().st_mtime_ns for f in home.rglob("*") if f.is_file()}


def test_meta_train_reads_the_train_splits_bundles_its_models_and_records_itself(monkeypatch, hmlib_home):
    """meta_train reads the shared VAE and the backbone notebook 02 trained (and trains neither), reads only the
    meta-training datasets' train splits, names its checkpoint by seed and a settings hash, bundles the VAE and
    backbone (load_bundle rebuilds everything from the one file) and records itself in models/pipeline.json; it is
    reused when run again."""
    fake = install_fake_data(monkeypatch, 80)
    cfg = _pipeline_cfg()
    bundle_for(cfg, 0, train=True)  # the VAE and backbone (notebook 02)
    upstream = {f: t for f, t in _home_files(hmlib_home).items() if f.startswith("models/")}
    assert len(upstream) == 2
    fake.loaded.clear()
    result = meta_train(cfg, 0, progress=False)
    assert set(fake.loaded) == {(d, "train") for d in cfg.meta.train_datasets}
    assert all(_home_files(hmlib_home)[f] == t for f, t in upstream.items())  # read, not retrained
    path = result.checkpoint_path
    assert path.parent == hmlib_home / "models" and path.name.startswith("hypernet_seed0-")
    assert pipeline_checkpoints() == [path]
    vae, vae_meta = get_vae(cfg, "shared", 0, train=False, progress=False, verbose=False)
    backbone, backbone_meta = get_backbone(cfg, 0, train=False, progress=False, verbose=False)
    assert result.meta["upstream"]["backbone_id"] == backbone_meta["backbone_id"]
    assert set(result.meta["upstream"]["ids"]) == set(cfg.meta.train_datasets)
    assert all(ids["vae_id"] == vae_meta["vae_id"] for ids in result.meta["upstream"]["ids"].values())

    bundle = load_bundle(path)
    assert bundle.seed == 0 and bundle.cfg == cfg and bundle.backbone is bundle.hypernet.generator.backbone
    assert bundle.backbone_meta["backbone_id"] == backbone_meta["backbone_id"] == \
        state_fingerprint(bundle.backbone.state_dict())
    assert bundle.vae_meta["vae_id"] == vae_meta["vae_id"] and "path" not in bundle.vae_meta
    images = fake.load_split("mnist", "test", cfg.data).images[:10]
    np.testing.assert_array_equal(encode_images(bundle.vae, images)[0], encode_images(vae, images)[0])
    inputs = TaskData("x", "test", np.concatenate(encode_images(vae, images), 1), np.zeros(10, np.int64),
                      images=images).task_inputs(np.arange(10)[None])
    torch.testing.assert_close(predict_task(bundle.hypernet, inputs, cfg.adapt),
                               predict_task(result.hypernet, inputs, cfg.adapt))

    assert meta_train(cfg, 0, progress=False).reused
    variant = meta_train(cfg, 0, progress=False, folder="ablations")
    assert variant.checkpoint_path.parent == hmlib_home / "models" / "ablations"
    assert variant.checkpoint_path.name.startswith("variant_seed0-") and not variant.reused
    assert pipeline_checkpoints() == [path]  # variants are not the pipeline's
    with pytest.raises(MissingArtifactError, match="not found"):
        meta_train(_pipeline_cfg(outer_lr=5e-4), 0, train=False, progress=False)


def test_meta_train_never_trains_the_vae_or_the_backbone(monkeypatch, hmlib_home, capsys):
    """On a home without notebook 02's models meta_train stops with a MissingArtifactError naming the missing file
    and the command that makes it, and writes nothing; with the VAE alone it names the backbone."""
    install_fake_data(monkeypatch, 80)
    cfg = _pipeline_cfg()
    before = _home_files(hmlib_home)
    with pytest.raises(MissingArtifactError, match=r"VAE .*vae_shared_d2_seed0-\S*\.pt not found; make it with: "
                                                   r"hmlib run --profile smoke --only 02"):
        meta_train(cfg, 0, progress=False)
    assert _home_files(hmlib_home) == before and "Training" not in capsys.readouterr().out
    get_vae(cfg, "shared", 0, progress=False, verbose=False)
    before, _ = _home_files(hmlib_home), capsys.readouterr()
    with pytest.raises(MissingArtifactError, match=r"backbone .*backbone_seed0-\S*\.pt not found; make it with: "
                                                   r"hmlib run --profile smoke --only 02"):
        meta_train(cfg, 0, progress=False)
    assert _home_files(hmlib_home) == before
    assert "Training" not in capsys.readouterr().out


def _kept_backbone(path) -> dict:
    """The backbone weights in a checkpoint's best validation weights (what load_bundle rebuilds)."""
    state, _ = load_checkpoint(path)
    prefix = "generator.backbone."
    return {k[len(prefix):]: v for k, v in state["best_model"].items() if k.startswith(prefix)}


def test_a_bundle_of_a_fine_tuned_backbone_names_its_own_weights(monkeypatch):
    """With meta.backbone_lr > 0 the bundled backbone is the one in the checkpoint's best validation weights: its
    identity is the hash of those weights and its name says which checkpoint made it; it is the trained backbone's
    identity exactly when the weights kept are the initial ones (tiny data: that can happen)."""
    install_fake_data(monkeypatch, 80)
    cfg = _pipeline_cfg(backbone_lr=1e-2)
    bundle_for(cfg, 0, train=True)  # the VAE and backbone meta-training reads (notebook 02)
    result = meta_train(cfg, 0, progress=False)
    _, trained = get_backbone(cfg, 0, train=False, progress=False, verbose=False)
    bundle = load_bundle(result.checkpoint_path)
    kept = _kept_backbone(result.checkpoint_path)
    _assert_same_weights(bundle.backbone.state_dict(), kept)
    assert bundle.backbone_meta["backbone_id"] == state_fingerprint(kept)
    assert bundle.backbone_meta["name"] == f"{trained['name']}_meta-{result.checkpoint_path.stem}"
    initial = result.meta["best"]["iteration"] == 0
    assert (bundle.backbone_meta["backbone_id"] == trained["backbone_id"]) == initial


def test_a_backbone_moved_by_meta_training_carries_another_id(monkeypatch):
    """Validation forced to improve at every evaluation keeps the last weights: meta-training moved the backbone, so
    the bundled one differs from the trained one and carries another identity (the hash of its own weights)."""
    install_fake_data(monkeypatch, 80)
    rising = iter(np.linspace(0.1, 0.9, 9))
    monkeypatch.setattr(metatrain, "validation_accuracy", lambda *args: (0.0, float(next(rising))))
    cfg = _pipeline_cfg(backbone_lr=1e-2)
    bundle_for(cfg, 0, train=True)  # the VAE and backbone meta-training reads (notebook 02)
    result = meta_train(cfg, 0, progress=False)
    assert result.meta["best"]["iteration"] == ITERATIONS
    model, trained = get_backbone(cfg, 0, train=False, progress=False, verbose=False)
    bundle = load_bundle(result.checkpoint_path)
    _assert_same_weights(bundle.backbone.state_dict(), _kept_backbone(result.checkpoint_path))
    assert any(not torch.equal(bundle.backbone.state_dict()[k], v) for k, v in model.state_dict().items())
    assert bundle.backbone_meta["backbone_id"] == state_fingerprint(bundle.backbone.state_dict()) != \
        trained["backbone_id"]
    assert bundle.backbone_meta["name"] == f"{trained['name']}_meta-{result.checkpoint_path.stem}"


# ----------------------------------------------------------------------------------------------- plots

def test_meta_plots_return_figures(tmp_path):
    """Training curves of several seeds and a task's before/after clusters are drawn from a real history."""
    history = _fit(_cfg(), tmp_path / "h.pt").history
    fig = plot_training_curves({"seed 0": history, "seed 1": history}, chance=1 / K)
    assert isinstance(fig, Figure) and len(fig.axes) >= 3
    labels = np.repeat(np.arange(3), 5)
    fig = plot_task_adaptation(np.random.default_rng(0).normal(size=(15, 2)), labels,
                               {"before": (labels + 1) % 3, "after": labels})
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes][1:] == ["before: 100% right", "after: 100% right"]
    plt.close("all")
