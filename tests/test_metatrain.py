"""Meta-training on tiny synthetic blobs: learning, checkpoints, reuse, resume, set-aside, errors, what meta_train
reads."""
from __future__ import annotations

import copy

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import hmlib.hyper.bundle
from hmlib.artifacts import ArtifactError, MissingArtifactError, StaleArtifactError, load_checkpoint, save_checkpoint
from hmlib.config import ConfigError, load_config
from hmlib.hyper import metatrain
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.hypernet import TaskInputs
from hmlib.hyper.inputs import TaskData
from hmlib.hyper.metatrain import MetaTrainingError, fit_hypernet, load_hypernet, meta_train
from hmlib.plots.meta import plot_task_adaptation, plot_training_curves

DIM, NUM_ALL_CLASSES, PER_CLASS, K, NUM_IMAGES = 6, 5, 60, 3, 30
ITERATIONS, EVAL_EVERY = 6, 3
OVERRIDES = {"task": {"num_classes": K, "num_images": NUM_IMAGES},
             "hyper": {"target_hidden": [16], "embed_dim": 16, "head_hidden": 16, "num_seeds": 2, "num_heads": 2,
                       "cluster_inits": 3},
             "adapt": {"num_inner_steps": 2},
             "meta": {"iterations": ITERATIONS, "eval_every": EVAL_EVERY, "eval_tasks": 4, "meta_batch_size": 2,
                      "val_fraction": 0.3}}
UPSTREAM = {"ids": {"a": {"vae_id": "v1"}, "b": {"vae_id": "v1"}}}


def blobs(name: str, seed: int, separation: float = 3.0, offset: float = 0.0) -> TaskData:
    """A dataset of NUM_ALL_CLASSES Gaussian blobs: context rows [mu, logvar], features mu."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(NUM_ALL_CLASSES, DIM)) * separation + offset
    labels = np.repeat(np.arange(NUM_ALL_CLASSES), PER_CLASS)
    mu = (means[labels] + rng.normal(size=(len(labels), DIM))).astype(np.float32)
    logvar = (rng.normal(scale=0.1, size=mu.shape) - 1.0).astype(np.float32)
    return TaskData(name, "train", np.concatenate([mu, logvar], axis=1), mu, labels, {"vae_id": f"vae-{seed}"})


def _cfg(**meta):
    """The tiny meta-training config, with meta.* overrides."""
    return load_config("default", overrides={**OVERRIDES, "meta": {**OVERRIDES["meta"], **meta}})


def _sets() -> dict[str, TaskData]:
    return {"a": blobs("a", 0), "b": blobs("b", 1)}


def _fit(cfg, path, **kw):
    """fit_hypernet on two blob datasets, seed 0, recorded upstream ids UPSTREAM."""
    kw.setdefault("upstream", UPSTREAM)
    return fit_hypernet(cfg, kw.pop("sets", None) or _sets(), seed=0, path=path, progress=False, **kw)


def _task():
    task = blobs("t", 3)
    return task.task_inputs(np.arange(NUM_IMAGES)[None] * 10)


def _assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


# ------------------------------------------------------------------------------------------- learning

def test_meta_training_on_separable_blobs_raises_validation_accuracy(tmp_path):
    """The full generator starts near chance and learns the blobs' classes: validation accuracy rises."""
    cfg = load_config("default", overrides={**OVERRIDES, "hyper": {**OVERRIDES["hyper"], "generation": "full"},
                                            "meta": {**OVERRIDES["meta"], "iterations": 40, "eval_every": 10,
                                                     "eval_tasks": 8, "meta_batch_size": 4, "outer_lr": 3e-3}})
    history = _fit(cfg, tmp_path / "h.pt").history
    assert history["eval_iteration"] == [0, 10, 20, 30, 40]
    assert len(history["outer_loss"]) == 40 and all(np.isfinite(history["outer_loss"]))
    assert max(history["val_acc_after"][1:]) > history["val_acc_after"][0] + 0.1
    assert np.mean(history["outer_loss"][-10:]) < np.mean(history["outer_loss"][:10])
    assert len(history["inner_loss_before"]) == len(history["inner_loss_after"]) == 40


def test_meta_training_the_cluster_head_lowers_the_outer_loss_and_keeps_the_best_weights(tmp_path):
    """The default cluster head learns its temperature from the task code (the outer loss falls); the weights
    returned are those of the best validation accuracy, iteration 0 included."""
    cfg, path = _cfg(iterations=30, eval_every=10, meta_batch_size=4, outer_lr=3e-3), tmp_path / "h.pt"
    sets = {"a": blobs("a", 0, separation=1.0), "b": blobs("b", 1, separation=1.0)}
    result = _fit(cfg, path, sets=sets)
    history = result.history
    assert np.mean(history["outer_loss"][-10:]) < np.mean(history["outer_loss"][:10])
    state, meta = load_checkpoint(path)
    assert state["model"]["generator.log_tau.weight"].abs().sum() > 0  # it starts at zero: tau from the task code
    best = meta["best"]
    assert best["val_acc_after"] == max(history["val_acc_after"])
    assert best["iteration"] == history["eval_iteration"][int(np.argmax(history["val_acc_after"]))]
    _assert_same_weights(result.hypernet.state_dict(), state["best_model"])


# ----------------------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip_and_reuse(tmp_path, capsys):
    """The checkpoint rebuilds the best weights exactly; a finished matching checkpoint is reused, not retrained."""
    cfg, path = _cfg(), tmp_path / "h.pt"
    result = _fit(cfg, path)
    assert not result.reused and result.checkpoint_path == path
    hypernet, meta = load_hypernet(path)
    assert meta["setting"] == "zero_shot" and meta["complete"] and meta["iteration"] == ITERATIONS
    assert meta["config"]["meta"]["iterations"] == ITERATIONS and meta["upstream"] == UPSTREAM
    assert (meta["context_dim"], meta["feature_dim"], meta["num_classes"]) == (2 * DIM, DIM, K)
    assert meta["history"]["eval_iteration"] == [0, EVAL_EVERY, ITERATIONS]
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
    original, calls = metatrain._outer_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(metatrain, "_outer_loss", interrupting)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    """A run that stops after its iteration-3 save resumes there and ends with the weights of an uninterrupted run."""
    cfg = _cfg()
    full = _fit(cfg, tmp_path / "full.pt")
    path = tmp_path / "h.pt"
    _interrupt_outer_loss_at_call(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        _fit(cfg, path)
    monkeypatch.undo()
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
    retrained."""
    path = tmp_path / "h.pt"
    _fit(_cfg(), path)
    first = path.read_bytes()
    with pytest.raises(StaleArtifactError, match=r"training\.meta\.outer_lr: recorded 0\.001, expected 0\.0005"):
        _fit(_cfg(outer_lr=5e-4, retrain="never"), path)
    with pytest.raises(StaleArtifactError, match=r'upstream\.ids\.a\.vae_id: recorded "v1", expected "v2"'):
        _fit(_cfg(retrain="never"), path, upstream={"ids": {"a": {"vae_id": "v2"}, "b": {"vae_id": "v1"}}})
    assert path.read_bytes() == first  # refusing changes nothing
    capsys.readouterr()
    result = _fit(_cfg(outer_lr=5e-4), path)
    out = capsys.readouterr().out
    assert not result.reused and "cannot be reused" in out and "h.stale-1.pt" in out
    assert (tmp_path / "h.stale-1.pt").read_bytes() == first
    assert load_checkpoint(path)[1]["training"]["meta"]["outer_lr"] == 5e-4
    again = _fit(_cfg(outer_lr=5e-4, retrain="always"), path)
    assert not again.reused and (tmp_path / "h.previous-1.pt").is_file()


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
    with pytest.raises(MissingArtifactError, match=r"not found; make it with: hmlib run --profile default --only 03"):
        _fit(_cfg(), path, train=False)
    assert not path.exists()
    _interrupt_outer_loss_at_call(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        _fit(_cfg(), path)
    with pytest.raises(MissingArtifactError, match="is unfinished"):
        _fit(_cfg(), path, train=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path, monkeypatch):
    """A NaN outer loss stops meta-training with an error; the checkpoint holds the weights before that step."""
    original, weights = metatrain._outer_loss, []

    def nan_at_iteration_4(hypernet, inputs, labels, cfg):
        weights.append(copy.deepcopy(hypernet.state_dict()))
        if len(weights) == 4:  # a meta-batch whose features are not finite
            inputs = TaskInputs(inputs.context, torch.full_like(inputs.features, float("nan")))
        return original(hypernet, inputs, labels, cfg)

    monkeypatch.setattr(metatrain, "_outer_loss", nan_at_iteration_4)
    path = tmp_path / "h.pt"
    with pytest.raises(MetaTrainingError, match="non-finite outer loss"):
        _fit(_cfg(iterations=20, eval_every=20), path)
    state, meta = load_checkpoint(path)
    assert not meta["complete"] and meta["iteration"] == len(weights) - 1 == len(meta["history"]["iteration"])
    assert len(weights) == 4  # three good steps, then the non-finite one
    _assert_same_weights(state["model"], weights[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_unusable_meta_training_data_is_refused(tmp_path):
    """No datasets, datasets of different widths, or classes too small for a task: clear MetaTrainingErrors."""
    with pytest.raises(MetaTrainingError, match="no meta-training datasets"):
        fit_hypernet(_cfg(), {}, seed=0, path=tmp_path / "h.pt", progress=False)
    narrow = blobs("b", 1)
    narrow = TaskData("b", "train", narrow.context[:, :DIM], narrow.features, narrow.labels)
    with pytest.raises(MetaTrainingError, match="differ in context/feature widths"):
        _fit(_cfg(), tmp_path / "h.pt", sets={"a": blobs("a", 0), "b": narrow})
    tiny = {name: s.subset(np.arange(len(s))[::30]) for name, s in _sets().items()}  # 2 images per class
    with pytest.raises(MetaTrainingError, match="too small"):
        _fit(_cfg(), tmp_path / "h.pt", sets=tiny)


# -------------------------------------------------------------------------------------------- meta_train

def test_meta_train_reads_the_settings_train_splits_and_names_its_checkpoint(monkeypatch, capsys):
    """meta_train reads only the meta-training datasets' train splits, records their identities, bundles the
    upstream models and names the checkpoint by setting, seed and a settings hash."""
    calls, bundles = [], []

    def fake_task_data(cfg, dataset, split, setting, seed, *, train=True, progress=True):
        calls.append((dataset, split, setting, seed))
        return blobs(dataset, sum(map(ord, dataset)) % 97)

    def fake_bundle(cfg, setting, seed, *, train=False, progress=False):
        bundles.append((setting, seed))
        return {"backbone": {"state": {"w": torch.ones(2)}, "meta": {"backbone_id": "bb"}}}

    monkeypatch.setattr(metatrain, "load_task_data", fake_task_data)
    monkeypatch.setattr(hmlib.hyper.bundle, "bundle_for", fake_bundle)
    cfg = _cfg(iterations=2, eval_every=2)
    result = meta_train(cfg, "transductive", 1, progress=False)
    assert calls == [(d, "train", "transductive", 1) for d in cfg.meta.train_datasets]
    assert bundles == [("transductive", 1)]
    assert result.checkpoint_path.parent.name == "models"
    assert result.checkpoint_path.name.startswith("hypernet_transductive_seed1-")
    assert set(result.meta["upstream"]["ids"]) == set(cfg.meta.train_datasets)
    assert torch.equal(load_checkpoint(result.checkpoint_path)[0]["bundle"]["backbone"]["state"]["w"], torch.ones(2))
    other = meta_train(_cfg(iterations=2, eval_every=2, outer_lr=5e-4), "transductive", 1, progress=False)
    assert other.checkpoint_path != result.checkpoint_path and result.checkpoint_path.is_file()  # never overwritten
    assert meta_train(cfg, "transductive", 1, progress=False).reused
    with pytest.raises(ConfigError, match="unknown setting"):
        meta_train(cfg, "few_shot", 0)


# ----------------------------------------------------------------------------------------------- plots

def test_meta_plots_return_figures(tmp_path):
    """Training curves of several seeds and a task's before/after clusters are drawn from a real history."""
    history = _fit(_cfg(), tmp_path / "h.pt").history
    fig = plot_training_curves({"seed 0": history, "seed 1": history}, chance=1 / K)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    labels = np.repeat(np.arange(3), 5)
    fig = plot_task_adaptation(np.random.default_rng(0).normal(size=(15, 2)), labels,
                               {"before": (labels + 1) % 3, "after": labels})
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes][1:] == ["before: 100% right", "after: 100% right"]
    plt.close("all")
