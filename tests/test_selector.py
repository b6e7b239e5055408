"""The test-time selector (when not to adapt): the label-free features of a candidate, the untrained selector's
silhouette rule, its fit on meta-training tasks, the choice adapt_candidates makes with it, and its fit after
meta-training (kept only if it beats the silhouette rule on the validation tasks; the checkpoint is complete only
once it is fitted)."""
from __future__ import annotations

import dataclasses
import importlib
import math
import shutil

import numpy as np
import pytest
import torch

from hmlib.artifacts import MissingArtifactError, load_checkpoint
from hmlib.backbone.model import ConvBackbone
from hmlib.hyper import metatrain
from hmlib.hyper.adapt import CANDIDATES, adapt_candidates, predict_task
from hmlib.hyper.bundle import bundle_for, load_bundle
from hmlib.hyper.checkpoints import load_hypernet
from hmlib.hyper.episodes import Episode
from hmlib.hyper.generators import TaskInputs
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.metatrain import meta_train
from hmlib.hyper.selector import (FEATURES, Selector, candidate_features, choice_accuracy, chosen_accuracy,
                                  fit_selector, oracle_and_fixed)
from hmlib.stats import paired
from hmlib.reproducibility import seeded
from tinyprotocol import K, N, tiny_config

# Tiny sizes
C, F, CONTEXT_DIM, T = len(CANDIDATES), len(FEATURES), 6, 2
TRAIN_TASKS, VAL_TASKS = 30, 12
SILHOUETTE, CONFIDENCE = FEATURES.index("silhouette"), FEATURES.index("confidence")
adapt_module = importlib.import_module("hmlib.hyper.adapt")  # the module (hmlib.hyper.adapt is also the function)


def ranked_table(seed: int, num_tasks: int, columns: tuple[int, ...], quiet: tuple[int, ...] = ()
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (C, T, F) of noise but for ``columns``, which rank the candidates of every task (offset and scaled
    far from the noise; ``quiet`` ones within the noise's range), and accuracies (C, T): the candidate ranked
    highest 0.9, the others 0.5 and 0.3."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(C, num_tasks, F, generator=gen)
    ranks = torch.stack([torch.randperm(C, generator=gen) for _ in range(num_tasks)], dim=1)  # (C, T)
    for column in columns:
        features[:, :, column] = 100.0 + 50.0 * ranks
    for column in quiet:
        features[:, :, column] = 0.5 * (ranks - 1.0)
    return features, torch.tensor([0.3, 0.5, 0.9])[ranks]


# ------------------------------------------------------------------------------------------------ features

def test_candidate_features_on_constructed_logits():
    """Silhouette as given; confidence = mean top probability; balance = entropy of the mean assignment / log K;
    the task's inner loss before the first and after the last step; the mean blend; log K. No losses or blend: 0."""
    sure = torch.tensor([[20.0, 0, 0], [0, 20, 0], [0, 0, 20]]).repeat(2, 1)  # confident, one row per cluster
    flat = torch.zeros(6, 3)  # every cluster equally likely
    lumped = torch.tensor([[20.0, 0, 0]]).repeat(6, 1)  # confident, all in one cluster
    logits = torch.stack([sure, flat, lumped])  # (T=3, N=6, K=3)
    silhouettes, blend = torch.tensor([0.5, -1.0, 0.25]), torch.tensor([0.1, 0.2, 0.3])
    losses = [torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.5, 0.5, 0.25])]
    features = candidate_features(silhouettes, logits, losses, blend)
    assert features.shape == (3, F) and FEATURES == ("silhouette", "confidence", "balance", "inner_loss_before",
                                                     "inner_loss_after", "blend", "log_k")
    top = 1.0 / (1.0 + 2.0 * math.exp(-20.0))
    lumped_mean = np.array([top, (1 - top) / 2, (1 - top) / 2])
    expected = np.array([[0.5, top, 1.0, 3.0, 1.5, 0.1, math.log(3)],
                         [-1.0, 1 / 3, 1.0, 2.0, 0.5, 0.2, math.log(3)],
                         [0.25, top, -(lumped_mean * np.log(lumped_mean + 1e-8)).sum() / math.log(3), 1.0, 0.25,
                          0.3, math.log(3)]])
    np.testing.assert_allclose(features.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert features[2, FEATURES.index("balance")] < 1e-4  # one cluster used: no balance at all
    bare = candidate_features(silhouettes[:2], torch.zeros(2, 4, 2), None, None)  # no inner step, no blend
    np.testing.assert_allclose(bare.numpy(), [[0.5, 0.5, 1.0, 0, 0, 0, math.log(2)],
                                              [-1.0, 0.5, 1.0, 0, 0, 0, math.log(2)]], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ the scorer

def test_an_untrained_selector_scores_by_the_silhouette_exactly():
    """Until fitted, the scores are the silhouette feature itself, whatever its weights and statistics hold; fitted,
    they are the linear model on the standardised features plus the candidate's bias."""
    selector = Selector(C)
    features = 10 * torch.randn(C, 5, F, generator=torch.Generator().manual_seed(0))
    assert not selector.trained and selector.bias.shape == (C,)
    assert torch.equal(selector(features), features[..., SILHOUETTE])
    with torch.no_grad():
        selector.weight.fill_(1.0)
        selector.bias.copy_(torch.tensor([3.0, -1.0, 0.0]))
        selector.mean.fill_(2.0)
        selector.std.fill_(4.0)
    assert torch.equal(selector(features), features[..., SILHOUETTE])
    selector.fitted.fill_(True)
    assert selector.trained
    torch.testing.assert_close(selector(features), ((features - 2.0) / 4.0).sum(-1) + selector.bias[:, None])


def test_fit_selector_learns_the_feature_that_predicts_the_best_candidate():
    """Where one feature (the confidence) ranks the candidates and the best is ranked highest, the fitted selector
    picks the best candidate of every task, on its training tasks and on new ones, one at a time too (it standardises
    with the training statistics, not a batch's own); the silhouette (noise here) does worse."""
    features, accuracy = ranked_table(0, TRAIN_TASKS, (CONFIDENCE,))
    selector = Selector(C)
    assert fit_selector(selector, features, accuracy) == {"tasks": TRAIN_TASKS}
    assert selector.trained and int(selector.weight.abs().argmax()) == CONFIDENCE and selector.weight[CONFIDENCE] > 0
    rows = features.flatten(0, 1)
    torch.testing.assert_close(selector.mean, rows.mean(0))
    torch.testing.assert_close(selector.std, rows.std(0))
    oracle = oracle_and_fixed(accuracy)["oracle"]
    assert oracle == pytest.approx(0.9)
    assert choice_accuracy(selector(features), accuracy) == oracle
    assert choice_accuracy(features[..., SILHOUETTE], accuracy) < oracle - 0.1
    new, new_accuracy = ranked_table(1, VAL_TASKS, (CONFIDENCE,))
    assert choice_accuracy(selector(new), new_accuracy) == pytest.approx(0.9)
    for t in range(VAL_TASKS):  # one task at a time: its own mean and spread would be another standardisation
        one = new[:, t:t + 1]
        torch.testing.assert_close(selector(one), ((one - rows.mean(0)) / rows.std(0)) @ selector.weight
                                   + selector.bias[:, None])
        assert int(selector(one).argmax(0)) == int(new_accuracy[:, t].argmax())


def test_choice_accuracy_and_the_reference_figures_on_constructed_arrays():
    """choice_accuracy is the mean accuracy of each task's highest-scoring candidate (ties: the first); the oracle is
    the mean of each task's best accuracy, always_c candidate c's mean."""
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.5], [0.2, 0.1, 0.3, 0.5], [0.3, 0.0, 0.1, 0.4]])
    accuracy = torch.tensor([[0.2, 0.6, 0.5, 1.0], [0.4, 0.8, 0.25, 0.0], [0.9, 0.3, 0.7, 0.5]])
    assert choice_accuracy(scores, accuracy) == pytest.approx((0.9 + 0.6 + 0.25 + 1.0) / 4)  # picks 2, 0, 1, 0
    assert oracle_and_fixed(accuracy) == pytest.approx({"oracle": (0.9 + 0.8 + 0.7 + 1.0) / 4,
                                                        "always_0": 2.3 / 4, "always_1": 1.45 / 4,
                                                        "always_2": 2.4 / 4})
    assert choice_accuracy(accuracy, accuracy) == pytest.approx(oracle_and_fixed(accuracy)["oracle"])


# ------------------------------------------------------------------------------------ the choice at test time

SCRIPT = {"generated": {SILHOUETTE: [0.9, 0.1], CONFIDENCE: [0.1, 0.5]},  # per candidate, the feature of each task
          "stored": {SILHOUETTE: [0.1, 0.9], CONFIDENCE: [0.9, 0.1]},
          "task": {SILHOUETTE: [0.5, 0.5], CONFIDENCE: [0.5, 0.9]}}
BY_SILHOUETTE, BY_CONFIDENCE = [0, 1], [1, 2]  # the candidate each task's highest value picks


def candidate_of(result) -> str:
    """Which candidate an adapted result is: its blends fixed to 0 (stored statistics), to 1 (the task's), or not."""
    blends = torch.cat([v.flatten() for k, v in result.params.items() if k.startswith("blend.")])
    return "stored" if torch.all(blends == 0) else "task" if torch.all(blends == 1) else "generated"


@pytest.fixture
def scripted(monkeypatch):
    """A tiny film hypernetwork, two tasks, and features scripted per candidate: the silhouette prefers one
    candidate, the confidence another."""
    cfg = tiny_config(adapt={"num_inner_steps": 1})
    with seeded(0):
        hypernet = HyperNet(cfg, CONTEXT_DIM, K, backbone=ConvBackbone((4, 8), 8, 3).eval())
    rng = np.random.default_rng(0)
    inputs = TaskInputs(torch.as_tensor(rng.normal(size=(T, N, CONTEXT_DIM)), dtype=torch.float32),
                        torch.as_tensor(rng.integers(0, 256, (T, N, 28, 28), dtype=np.uint8)))

    def features_of(hypernet, result):
        features = torch.zeros(T, F)
        for column, values in SCRIPT[candidate_of(result)].items():
            features[:, column] = torch.tensor(values)
        return features

    monkeypatch.setattr(adapt_module, "features_of", features_of)
    return hypernet, inputs, cfg.adapt


def fit_to_confidence(selector: Selector) -> None:
    """Make the selector score by the confidence alone (as if fitted)."""
    with torch.no_grad():
        selector.weight.zero_()
        selector.weight[CONFIDENCE] = 1.0
        selector.bias.zero_()
        selector.fitted.fill_(True)


def test_adapt_candidates_uses_the_fitted_selector_when_the_choice_is_learned(scripted):
    """adapt.choice = 'learned' with a fitted selector: its scores choose (and predict_task returns that candidate);
    'silhouette', an unfitted selector, or other candidates than it was fitted on: the silhouette chooses."""
    hypernet, inputs, cfg = scripted
    assert cfg.choice == "learned" and cfg.candidates == tuple(CANDIDATES) and hypernet.selector.bias.shape == (C,)
    results, pick = adapt_candidates(hypernet, inputs, cfg)
    assert [candidate_of(r) for r in results] == list(CANDIDATES)
    assert pick.tolist() == BY_SILHOUETTE  # not fitted: the rule
    fit_to_confidence(hypernet.selector)
    results, pick = adapt_candidates(hypernet, inputs, cfg)
    assert pick.tolist() == BY_CONFIDENCE
    logits = predict_task(hypernet, inputs, cfg, cfg.num_inner_steps)  # the steps adapt_candidates ran
    for t, (c, rule) in enumerate(zip(BY_CONFIDENCE, BY_SILHOUETTE)):
        torch.testing.assert_close(logits[:, t], torch.stack(results[c].logits)[:, t])
        assert not torch.allclose(logits[-1, t], results[rule].logits[-1][t])  # not the rule's candidate
    assert adapt_candidates(hypernet, inputs, dataclasses.replace(cfg, choice="silhouette"))[1].tolist() == \
        BY_SILHOUETTE
    two = dataclasses.replace(cfg, candidates=("generated", "task"))  # the selector scores three candidates
    assert adapt_candidates(hypernet, inputs, two)[1].tolist() == [0, 1]  # by silhouette; confidence: [1, 1]


# ------------------------------------------------------------------------------- fitted after meta-training

@pytest.fixture(scope="module")
def upstream(_tiny_mirror_root, tmp_path_factory):
    """A home holding the tiny protocol's VAE and backbone of seed 0 (notebook 02), trained once."""
    home = tmp_path_factory.mktemp("upstream")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HMLIB_HOME", str(home))
        patch.setenv("HMLIB_DATA_DIR", str(_tiny_mirror_root))
        bundle_for(tiny_config(), 0, train=True)
    return home


@pytest.fixture
def home(upstream, hmlib_home, tiny_mirror):
    """This test's copy of the upstream home (HMLIB_HOME), on the tiny mirror."""
    shutil.copytree(upstream, hmlib_home, dirs_exist_ok=True)
    return hmlib_home


def validation_table(val_columns: tuple[int, ...], quiet: tuple[int, ...] = (), narrow: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation table ``val_columns`` (and ``quiet``) rank; ``narrow``: the silhouette's ranking reversed on
    the first task only (the rule picks its worst candidate there, and agrees with the best elsewhere)."""
    features, accuracy = ranked_table(1, VAL_TASKS, val_columns, quiet)
    if narrow:
        features[:, 0, SILHOUETTE] = -features[:, 0, SILHOUETTE]
    return features, accuracy


def script_tables(monkeypatch, val_columns: tuple[int, ...], quiet: tuple[int, ...] = (), narrow: bool = False
                  ) -> list[list[Episode]]:
    """Replace the candidates' table of the selector's training episodes by one the confidence ranks, and that of the
    validation episodes by :func:`validation_table`; returns the episodes each table was asked for."""
    calls = []
    tables = [ranked_table(0, TRAIN_TASKS, (CONFIDENCE,)), validation_table(val_columns, quiet, narrow)]

    def table(hypernet, episodes, cfg):
        calls.append(list(episodes))
        return tables[len(calls) - 1]

    monkeypatch.setattr(metatrain, "_candidate_table", table)
    return calls


def selector_state(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("selector.")}


def script_validation(monkeypatch) -> list[dict]:
    """Validation accuracy 0.9 at the first evaluation (iteration 0), 0.5 after: the weights kept are the initial
    ones; returns the hypernetwork's weights at each evaluation."""
    snapshots = []

    def validation_accuracy(hypernet, episodes, cfg):
        snapshots.append({k: v.clone() for k, v in hypernet.state_dict().items()})
        return 0.0, 0.9 if len(snapshots) == 1 else 0.5

    monkeypatch.setattr(metatrain, "validation_accuracy", validation_accuracy)
    return snapshots


@pytest.mark.parametrize("val_columns,quiet,narrow,kept", [((CONFIDENCE,), (), False, True),
                                                           ((SILHOUETTE,), (), False, False),
                                                           ((CONFIDENCE,), (SILHOUETTE,), False, False),
                                                           ((CONFIDENCE,), (SILHOUETTE,), True, False)],
                         ids=["learned-wins", "rule-wins", "tie", "narrow-win"])
def test_the_selector_is_kept_only_if_it_beats_the_silhouette_rule(home, monkeypatch, val_columns, quiet, narrow,
                                                                  kept):
    """After meta-training the selector is fitted on fresh episodes of the meta-training data and scored on the
    validation episodes against the silhouette rule: kept only if the paired 95% interval of its gain lies above
    zero (else unfitted: the rule), so a win on one task of twelve is not enough; its figures go into the history and
    the checkpoint, whose final "model" is the best validation weights (those of the first evaluation here, not the
    last ones) with it."""
    calls = script_tables(monkeypatch, val_columns, quiet, narrow)
    snapshots = script_validation(monkeypatch)
    cfg = tiny_config()
    result = meta_train(cfg, 0, progress=False)
    assert result.meta["best"]["iteration"] == 0 and len(snapshots) == 2
    train_episodes, val_episodes = calls  # asked once each: the fit's episodes, then the validation's
    assert len(train_episodes) == cfg.meta.selector_episodes
    assert len(val_episodes) == math.ceil(cfg.meta.eval_tasks / cfg.meta.meta_batch_size)
    train_features, train_accuracy = ranked_table(0, TRAIN_TASKS, (CONFIDENCE,))
    val_features, val_accuracy = validation_table(val_columns, quiet, narrow)
    refit = Selector(C)
    fit_selector(refit, train_features, train_accuracy)
    learned = chosen_accuracy(refit(val_features), val_accuracy).numpy()
    rule = chosen_accuracy(val_features[..., SILHOUETTE], val_accuracy).numpy()
    gain = paired(learned, rule)
    assert (gain["low"] > 0) == kept  # the data make each branch happen
    assert (learned.mean() > rule.mean()) == (kept or narrow)  # a narrow win is a win, within the noise
    if narrow:
        assert np.count_nonzero(learned != rule) == 1 and gain["low"] < 0 < gain["mean"]
    assert max(learned.mean(), rule.mean()) == pytest.approx(0.9, abs=0.06)
    assert (learned.mean() == rule.mean()) == (bool(quiet) and not narrow)  # ties are not kept
    figures = result.history["selector"]
    assert figures == pytest.approx({"train_tasks": TRAIN_TASKS, "val_tasks": VAL_TASKS, "val_learned": learned.mean(),
                                     "val_silhouette": rule.mean(), **{f"val_{k}": v for k, v in
                                                                      oracle_and_fixed(val_accuracy).items()},
                                     "val_gain": gain["mean"], "val_gain_low": gain["low"], "kept": float(kept)})
    assert choice_accuracy(refit(val_features), val_accuracy) == pytest.approx(learned.mean())
    assert result.hypernet.selector.trained == kept
    for key in ("weight", "bias", "mean", "std"):  # fitted either way; used only where kept
        torch.testing.assert_close(getattr(result.hypernet.selector, key), getattr(refit, key))
    state, meta = load_checkpoint(result.checkpoint_path)
    assert meta["complete"] and meta["history"]["selector"] == figures
    assert bool(state["best_model"]["selector.fitted"]) == kept
    for key, value in state["best_model"].items():
        assert torch.equal(state["model"][key], value), key
        if not key.startswith("selector."):  # the best validation weights, not the last ones
            assert torch.equal(value, snapshots[0][key]), key
    assert any(not torch.equal(state["model"][k], v) for k, v in snapshots[1].items() if k.startswith("encoder."))
    reloaded, _ = load_hypernet(result.checkpoint_path)
    assert reloaded.selector.trained == kept
    for key, value in selector_state(result.hypernet.state_dict()).items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_an_interrupted_selector_fit_resumes_and_fits_it(home, tmp_path, monkeypatch, capsys):
    """The checkpoint saved after the last outer step is not complete: stopped while fitting the selector, it is
    unfinished (refused with train=False), and a new run resumes it there without another outer step, fits the
    selector on the best validation weights and ends as an uninterrupted run; a finished checkpoint reloads with the
    fitted selector."""
    cfg = tiny_config()
    script_tables(monkeypatch, (CONFIDENCE,))
    full = meta_train(cfg, 0, progress=False)
    assert full.hypernet.selector.trained
    done = tmp_path / "uninterrupted.pt"
    shutil.move(full.checkpoint_path, done)

    script_tables(monkeypatch, (CONFIDENCE,))
    real_fit = metatrain.fit_selector

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the selector is fitted

    with monkeypatch.context() as patch:
        patch.setattr(metatrain, "fit_selector", interrupted)
        with pytest.raises(KeyboardInterrupt):
            meta_train(cfg, 0, progress=False)
    state, meta = load_checkpoint(full.checkpoint_path)
    assert meta["iteration"] == cfg.meta.iterations and not meta["complete"] and "selector" not in meta["history"]
    assert not bool(state["model"]["selector.fitted"])
    with pytest.raises(MissingArtifactError, match="is unfinished"):
        meta_train(cfg, 0, train=False, progress=False)

    fits = []
    script_tables(monkeypatch, (CONFIDENCE,))
    monkeypatch.setattr(metatrain, "fit_selector", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    monkeypatch.setattr(metatrain, "outer_loss", lambda *a: pytest.fail("resumed after the last outer step"))
    capsys.readouterr()
    resumed = meta_train(cfg, 0, progress=False)
    out = capsys.readouterr().out
    assert f"at iteration {cfg.meta.iterations}/{cfg.meta.iterations}" in out and "test-time selector" in out
    assert fits == [1] and not resumed.reused and resumed.hypernet.selector.trained
    assert resumed.meta["complete"] and resumed.history == full.history
    expected, _ = load_checkpoint(done)
    state, _ = load_checkpoint(resumed.checkpoint_path)
    for part in ("model", "best_model"):  # the best validation weights with the same selector, not the last ones
        for key, value in expected[part].items():
            assert torch.equal(state[part][key], value), (part, key)

    capsys.readouterr()
    again = meta_train(cfg, 0, progress=False)
    assert again.reused and "Reusing the finished meta-training checkpoint" in capsys.readouterr().out
    assert again.hypernet.selector.trained and fits == [1]
    bundle = load_bundle(resumed.checkpoint_path, "cpu")
    for model in (again.hypernet, bundle.hypernet):
        for key, value in selector_state(expected["best_model"]).items():
            assert torch.equal(model.state_dict()[key].cpu(), value), key


@pytest.mark.parametrize("candidates", [("generated", "stored"), ("task",)])
def test_the_selector_scores_the_configured_candidates(home, monkeypatch, candidates):
    """The selector has one bias per configured candidate (of those the generator supports): with two, meta-training
    fits and figures them; with one there is no choice and nothing is fitted; either way the checkpoint completes
    and reloads."""
    calls = []
    real_table = metatrain._candidate_table
    monkeypatch.setattr(metatrain, "_candidate_table", lambda *a: calls.append(1) or real_table(*a))
    cfg = tiny_config(adapt={"candidates": list(candidates)})
    result = meta_train(cfg, 0, progress=False)
    assert result.hypernet.selector.bias.shape == (len(candidates),) and result.meta["complete"]
    figures = result.history.get("selector")
    if len(candidates) == 1:
        assert figures is None and calls == []
    else:
        assert calls == [1, 1] and sorted(k for k in figures if k.startswith("val_always")) == \
            ["val_always_0", "val_always_1"]
    reloaded, _ = load_hypernet(result.checkpoint_path)
    assert reloaded.selector.bias.shape == (len(candidates),)
