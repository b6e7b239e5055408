"""The hypernetwork: set encoders, generators (film: the modulated backbone and its cluster head; full: the
prototype's generated MLP), the hypernetwork's context normalisation, and the one inner loop (adapt, predict_task).
Inner losses: tests/test_losses.py; k-means and neighbours: tests/test_cluster_ops.py."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from datafactory import balanced_labels, class_patterns, perturbed_backbone
from hmlib.backbone import modulation as mod
from hmlib.backbone.model import ConvBackbone, batch_statistics
from hmlib.config import ConfigError, load_config
from hmlib.features import images_to_tensor, normalize_task, standardize
from hmlib.hyper import encoders, generators
from hmlib.hyper.adapt import (CANDIDATES, adapt, adapt_candidates, after_steps, candidate_names, choice_rule,
                              predict_clusters, predict_task, representation, silhouette)
from hmlib.hyper.cluster_ops import cosine_logits, kmeans_prototypes
from hmlib.hyper.encoders import ENCODERS
from hmlib.hyper.generators import GENERATORS, Generator, TaskInputs, TaskState, fix
from hmlib.hyper.hypernet import CONTEXT_EPS, HyperNet
from hmlib.hyper.inputs import TaskData
from hmlib.hyper.losses import INNER_LOSSES, InnerView, aligned_cross_entropy
from hmlib.reproducibility import seeded

# Tiny sizes
CONTEXT_DIM, FEATURE_DIM, K, N, T, STEPS = 6, 5, 3, 24, 2, 2
CHANNELS, EMBED_DIM = (4, 8), 8
BASE = {"backbone": {"channels": list(CHANNELS), "embed_dim": EMBED_DIM},
        "hyper": {"embed_dim": 8, "num_seeds": 2, "num_heads": 2, "num_context": 64},
        "film": {"cluster_inits": 2},
        "full": {"head_hidden": 16, "target_hidden": [8]},
        "adapt": {"inner_loss": "neighbours", "num_inner_steps": STEPS, "test_steps": None, "neighbours": 3}}
HYPERNET_LR = 0.05  # inner lr when the inner loop updates every weight of the hypernetwork
adapt_module = importlib.import_module("hmlib.hyper.adapt")  # the module (hmlib.hyper.adapt is also the function)


def config(generation: str = "film", **sections):
    """The smoke profile at the tiny sizes above, ``hyper.generation`` set, with per-section overrides."""
    overrides = {key: dict(value) for key, value in BASE.items()}
    overrides["hyper"]["generation"] = generation
    if generation == "full":  # a fixed K and the aligned outer loss, as the seed profile
        overrides["meta"] = {"outer_loss": "aligned", "min_classes": K, "max_classes": K}
    for key, value in sections.items():
        overrides[key] = {**overrides.get(key, {}), **value}
    return load_config("smoke", overrides=overrides)


def backbone(seed: int = 0) -> ConvBackbone:
    """A backbone in eval mode whose stored statistics and affine transforms are far from the defaults."""
    return perturbed_backbone(CHANNELS, EMBED_DIM, seed)


def make_hypernet(generation: str = "film", seed: int = 0, cfg=None, **sections) -> HyperNet:
    cfg = cfg or config(generation, **sections)
    with seeded(seed):
        if cfg.hyper.generation == "film":
            return HyperNet(cfg, CONTEXT_DIM, K, backbone=backbone(seed))
        return HyperNet(cfg, CONTEXT_DIM, K, feature_dim=FEATURE_DIM)


def task_inputs(generation: str = "film", num_tasks: int | None = T, seed: int = 1) -> tuple[TaskInputs, torch.Tensor]:
    """K-class tasks and their labels (T, N): class-pattern images ('film') or Gaussian blobs ('full'), with Gaussian
    context rows; ``num_tasks=None`` gives one task without a task dimension."""
    lead = 1 if num_tasks is None else num_tasks
    gen = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.as_tensor(balanced_labels(N, K, seed + t)) for t in range(lead)])
    context = torch.randn(lead, N, CONTEXT_DIM, generator=gen)
    if generation == "film":
        images = torch.stack([torch.as_tensor(class_patterns(labels[t].numpy(), K, seed=seed + t))
                              for t in range(lead)])
        inputs = TaskInputs(context, images)
    else:
        centres = 4.0 * torch.randn(lead, K, FEATURE_DIM, generator=gen)
        features = torch.gather(centres, 1, labels[..., None].expand(lead, N, FEATURE_DIM))
        inputs = TaskInputs(context, features=features + 0.3 * torch.randn(lead, N, FEATURE_DIM, generator=gen))
    if num_tasks is None:
        return TaskInputs(inputs.context[0], None if inputs.images is None else inputs.images[0],
                          None if inputs.features is None else inputs.features[0]), labels[0]
    return inputs, labels


def generated(hypernet: HyperNet, inputs: TaskInputs, **kwargs) -> tuple[dict, TaskState, torch.Tensor]:
    """(parameters, state, logits) of the generated networks, from the hypernetwork's parts."""
    batch = hypernet.check(inputs)
    state = hypernet.prepare(batch)
    params = hypernet(batch.context, state, **kwargs)
    return params, state, hypernet.logits(params, state)


def final_inner_loss(hypernet: HyperNet, result, cfg) -> torch.Tensor:
    """The inner loss (T,) of the adapted parameters (result.inner_losses holds it before each step only)."""
    spec = INNER_LOSSES[cfg.inner_loss]
    augmented = hypernet.logits(result.params, result.state, augmented=True) if spec.augmented else None
    return spec.fn(InnerView(result.logits[-1], result.state.reference, augmented), cfg)


GENERATED_SHAPES = {
    "film": {"scale.0": (T, 4), "shift.0": (T, 4), "blend.0": (T,), "scale.1": (T, 8), "shift.1": (T, 8),
             "blend.1": (T,), "log_tau": (T, 1), "prototypes": (T, K, EMBED_DIM)},
    "full": {"layers.0.weight": (T, 8, FEATURE_DIM), "layers.0.bias": (T, 8), "layers.1.weight": (T, K, 8),
             "layers.1.bias": (T, K)},
}


# ---------------------------------------------------------------------------------------- shapes and batching

@pytest.mark.parametrize("conditioning", list(ENCODERS))
@pytest.mark.parametrize("generation", list(GENERATORS))
def test_shapes_with_and_without_a_task_dimension(conditioning, generation):
    """Generated parameters, logits and predictions have the documented shapes, batched or not."""
    hypernet = make_hypernet(generation, hyper={"conditioning": conditioning})
    inputs, _ = task_inputs(generation)
    params, _, logits = generated(hypernet, inputs)
    assert {k: tuple(v.shape) for k, v in params.items()} == GENERATED_SHAPES[generation]
    assert logits.shape == (T, N, K)
    cfg = hypernet.full_cfg.adapt
    assert predict_task(hypernet, inputs, cfg).shape == (STEPS + 1, T, N, K)
    single, _ = task_inputs(generation, None)
    out = predict_task(hypernet, single, cfg)
    assert out.shape == (STEPS + 1, N, K) and torch.isfinite(out).all()
    assert predict_task(hypernet, single, cfg, num_steps=0).shape == (1, N, K)


def test_the_film_generator_clusters_into_any_k_and_the_full_one_into_its_own():
    """The film cluster head is computed (k-means), so a checkpoint clusters into any K; the full generator's output
    layer has exactly K units and says so."""
    film, full = make_hypernet("film"), make_hypernet("full")
    for generation, hypernet in (("film", film), ("full", full)):
        inputs, _ = task_inputs(generation)
        cfg = hypernet.full_cfg.adapt
        if generation == "film":
            assert predict_task(hypernet, inputs, cfg, num_classes=5).shape == (STEPS + 1, T, N, 5)
        else:
            with pytest.raises(ValueError, match="exactly 3 outputs"):
                predict_task(hypernet, inputs, cfg, num_classes=5)


@pytest.mark.parametrize("conditioning", list(ENCODERS))
@pytest.mark.parametrize("generation", list(GENERATORS))
def test_batched_tasks_give_the_same_result_as_one_at_a_time(conditioning, generation):
    """Tasks in a batch are independent: generation, statistics, k-means and adaptation per task."""
    hypernet = make_hypernet(generation, hyper={"conditioning": conditioning})
    inputs, _ = task_inputs(generation)
    cfg = hypernet.full_cfg.adapt
    batched = predict_task(hypernet, inputs, cfg)
    for t in range(T):
        single = TaskInputs(inputs.context[t], None if inputs.images is None else inputs.images[t],
                            None if inputs.features is None else inputs.features[t])
        torch.testing.assert_close(batched[:, t], predict_task(hypernet, single, cfg), atol=1e-4, rtol=1e-4)


def test_predict_task_defaults_to_the_test_time_steps_and_adapt_to_the_meta_training_steps():
    """predict_task / predict_clusters (test time) run adapt.test_steps inner steps unless told otherwise; adapt and
    adapt_candidates (meta-training's primitives) run num_inner_steps; the same count gives the same logits."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs("film")
    cfg = dataclasses.replace(hypernet.full_cfg.adapt, test_steps=STEPS + 2)
    logits = predict_task(hypernet, inputs, cfg)
    assert logits.shape == (STEPS + 3, T, N, K)
    assert len(adapt(hypernet, inputs, cfg).logits) == len(adapt_candidates(hypernet, inputs, cfg)[0][0].logits) \
        == STEPS + 1
    torch.testing.assert_close(logits, predict_task(hypernet, inputs, cfg, STEPS + 2))
    torch.testing.assert_close(logits[:STEPS + 1], predict_task(hypernet, inputs, cfg, STEPS))
    clusters = predict_clusters(hypernet, inputs, cfg)
    assert clusters.shape == (STEPS + 3, T, N)
    np.testing.assert_array_equal(clusters, logits.argmax(-1).numpy())


def test_the_inner_loop_mines_the_neighbours_once_and_adapts_as_if_at_every_step(monkeypatch):
    """The neighbour-agreement loss reads the reference's neighbours, which no step changes: adapt mines them once
    per call (not once per step), and adapts exactly as when the loss mines them itself at every step."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs("film")
    cfg = hypernet.full_cfg.adapt
    assert cfg.inner_loss == "neighbours" and cfg.num_inner_steps == STEPS > 1
    calls = []
    real = adapt_module.nearest_neighbours
    monkeypatch.setattr(adapt_module, "nearest_neighbours", lambda *a: calls.append(1) or real(*a))
    once = adapt(hypernet, inputs, cfg)
    assert len(calls) == 1
    monkeypatch.setattr(adapt_module, "neighbour_index", lambda *a: None)  # the loss mines them at every step
    every = adapt(hypernet, inputs, cfg)
    assert len(calls) == 1
    for a, b in zip(once.logits, every.logits):
        assert torch.equal(a, b)
    assert all(torch.equal(once.params[k], every.params[k]) for k in once.params)


def test_candidates_share_one_preparation_and_adapt_as_if_each_prepared_its_own(monkeypatch):
    """adapt_candidates prepares the tasks once for all candidates (the first convolution of their images); each
    candidate adapts from a copy with a cache of its own, exactly as adapt with its own preparation; at test time
    the adapted block's task moments are computed once and give the same logits as computing them at every step."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs("film")
    cfg = hypernet.full_cfg.adapt
    assert len(cfg.candidates) > 1
    calls = []
    real = hypernet.prepare
    monkeypatch.setattr(hypernet, "prepare", lambda *a, **k: calls.append(1) or real(*a, **k))
    results, _ = adapt_candidates(hypernet, inputs, cfg)
    assert len(calls) == 1
    for name, result in zip(cfg.candidates, results):
        alone = adapt(hypernet, inputs, cfg, fixed=CANDIDATES[name] or None)
        assert all(torch.equal(a, b) for a, b in zip(result.logits, alone.logits)), name
    state = real(hypernet.check(inputs))
    copy = state.copy()
    copy.cache["pre"] = torch.zeros(1)
    assert "pre" not in state.cache and copy.cache["first"] is state.cache["first"]
    monkeypatch.setattr(mod, "pre_moments", lambda pre, T: None)  # every step computes the moments itself
    every = adapt(hypernet, inputs, cfg)
    once = results[0]
    assert once.state.cache["pre_moments"] is not None and every.state.cache["pre_moments"] is None
    assert all(torch.equal(a, b) for a, b in zip(once.logits, every.logits))


def test_choice_rule_is_how_the_candidates_are_chosen():
    """choice_rule names the rule adapt_candidates applies: the silhouette rule while no selector was kept (whatever
    adapt.choice asks), the selector once one is, and no choice with one candidate (or generated tensors fixed)."""
    hypernet = make_hypernet()
    cfg = hypernet.full_cfg.adapt
    assert cfg.choice == "learned" and not hypernet.selector.trained
    silhouette = dataclasses.replace(cfg, choice="silhouette")
    assert choice_rule(hypernet, cfg) == choice_rule(hypernet, silhouette) == "silhouette"
    assert choice_rule(hypernet, cfg, {"blend": 0.0}) == "none"
    assert choice_rule(hypernet, dataclasses.replace(cfg, candidates=("generated",))) == "none"
    assert candidate_names(hypernet, cfg) == list(cfg.candidates)
    inputs, _ = task_inputs("film")
    _, rule = adapt_candidates(hypernet, inputs, silhouette)
    _, asked = adapt_candidates(hypernet, inputs, cfg)
    assert torch.equal(rule, asked)  # no selector kept: the same choice
    with torch.no_grad():
        hypernet.selector.fitted.fill_(True)
        hypernet.selector.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # the selector's: always the second candidate
    assert choice_rule(hypernet, cfg) == "learned" and choice_rule(hypernet, silhouette) == "silhouette"
    assert torch.equal(adapt_candidates(hypernet, inputs, cfg)[1], torch.ones_like(asked))


def test_predict_task_does_not_depend_on_the_chunk_size():
    """Tasks are processed ``chunk`` at a time for memory; the logits are the same for any chunk."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs(num_tasks=3)
    cfg = hypernet.full_cfg.adapt
    whole = predict_task(hypernet, inputs, cfg)
    for chunk in (1, 2):
        torch.testing.assert_close(predict_task(hypernet, inputs, cfg, chunk=chunk), whole, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- the label-free choice

def test_silhouette_is_scikit_learns_batched_over_tasks():
    """The batched silhouette (T,) is scikit-learn's on every task (a singleton and an unused cluster id included),
    in float64 and float32; a task whose images all fall in one cluster scores -1 (scikit-learn refuses it)."""
    rng = np.random.default_rng(0)
    tasks, n, dim, k = 5, 30, 5, 4  # n > 25: torch.cdist takes its matrix-product path
    clusters = rng.integers(0, k, (tasks, n))
    clusters[0] = rng.integers(0, 2, n)
    clusters[0, 0] = 3  # task 0: clusters 0 and 1, cluster 2 unused, cluster 3 a singleton
    clusters[4] = 2  # task 4: one cluster only
    centres = rng.normal(size=(tasks, k, dim)) * 2.0
    z = np.take_along_axis(centres, clusters[..., None], 1) + rng.normal(size=(tasks, n, dim))
    expected = [silhouette_score(z[t], clusters[t]) for t in range(tasks - 1)]
    assert min(expected) < 0.5 < max(expected)  # informative scores, not all near one value
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-4)):
        got = silhouette(torch.as_tensor(z, dtype=dtype), torch.as_tensor(clusters), k)
        assert got.shape == (tasks,) and got.dtype == dtype
        np.testing.assert_allclose(got[:-1].numpy(), expected, atol=tol)
        assert got[-1] == -1.0
    two = torch.as_tensor([[0, 0, 1, 1]])  # far-apart pairs: close to 1
    points = torch.tensor([[[0.0], [0.1], [10.0], [10.1]]])
    assert silhouette(points, two, 2).item() == pytest.approx(silhouette_score(points[0], two[0]))


def test_adapt_candidates_keeps_per_task_the_candidate_with_the_highest_silhouette(monkeypatch):
    """Every configured candidate (generated, stored statistics, task statistics) is adapted by the one inner loop;
    each is scored on its own adapted representation and clusters, and each task keeps the highest score's
    candidate; predict_task returns that candidate's logits task by task."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs(num_tasks=3)
    cfg = hypernet.full_cfg.adapt
    assert cfg.candidates == tuple(CANDIDATES) == ("generated", "stored", "task")
    scores = torch.tensor([[0.1, 0.6, 0.2], [0.5, 0.1, 0.3], [0.2, 0.4, 0.9]])  # (candidate, task)
    seen = []

    def scripted(z, clusters, num_classes):
        seen.append((z, clusters, num_classes))
        return scores[(len(seen) - 1) % len(scores)]

    monkeypatch.setattr(adapt_module, "silhouette", scripted)
    results, pick = adapt_candidates(hypernet, inputs, cfg)
    assert pick.tolist() == [1, 0, 2] and len(results) == len(seen) == 3
    blends = [torch.stack([r.params[f"blend.{l}"] for l in range(len(CHANNELS))]) for r in results]
    assert torch.all((blends[0] > 0) & (blends[0] < 1))  # generated: the hypernetwork's own blend
    assert torch.all(blends[1] == 0) and torch.all(blends[2] == 1)  # stored / task statistics everywhere
    for (z, clusters, k), result in zip(seen, results):
        torch.testing.assert_close(z, hypernet.generator.embedding(result.params, result.state))
        assert torch.equal(clusters, result.logits[-1].argmax(-1)) and k == K
    for result, fixed in zip(results, ({}, {"blend": 0.0}, {"blend": 1.0})):
        direct = adapt(hypernet, inputs, cfg, fixed=fixed or None)
        torch.testing.assert_close(torch.stack(result.logits), torch.stack(direct.logits))
    chosen = predict_task(hypernet, inputs, cfg)
    assert chosen.shape == (STEPS + 1, 3, N, K)
    for t, c in enumerate([1, 0, 2]):
        torch.testing.assert_close(chosen[:, t], torch.stack(results[c].logits)[:, t])


def test_predict_task_is_the_chosen_candidates_logits_whatever_the_chunk():
    """Unscripted: the pick is, task by task, the candidate whose clusters have the highest scikit-learn silhouette
    on its adapted embedding; tasks choose differently here; predict_task returns those logits for any chunk."""
    hypernet = make_hypernet(seed=1)
    inputs, _ = task_inputs(num_tasks=4, seed=1)
    cfg = hypernet.full_cfg.adapt
    results, pick = adapt_candidates(hypernet, inputs, cfg)
    with torch.no_grad():
        views = [representation(hypernet, r) for r in results]
    for t in range(4):
        scores = []
        for view, result in zip(views, results):
            clusters = result.logits[-1][t].argmax(-1).numpy()
            scores.append(silhouette_score(view[t].numpy(), clusters) if len(np.unique(clusters)) > 1 else -1.0)
        assert int(pick[t]) == int(np.argmax(scores)), (t, scores)
    assert len(set(pick.tolist())) > 1  # a per-task choice, not one for the batch
    whole = predict_task(hypernet, inputs, cfg)
    for t, c in enumerate(pick.tolist()):
        torch.testing.assert_close(whole[:, t], torch.stack(results[c].logits)[:, t])
    for chunk in (1, 3):
        torch.testing.assert_close(predict_task(hypernet, inputs, cfg, chunk=chunk), whole, atol=1e-4, rtol=1e-4)
    clusters = predict_clusters(hypernet, TaskInputs(inputs.context[0], inputs.images[0]), cfg)
    np.testing.assert_array_equal(clusters, torch.stack(results[int(pick[0])].logits)[:, 0].argmax(-1).numpy())


def test_the_choice_can_be_read_before_the_last_step():
    """choose_at: every candidate runs num_steps steps and the choice reads each one as it stood after choose_at of
    them, so predict_task's first choose_at + 1 steps are those of a choose_at-step run (its choice) and the rest
    follow the same candidate; unscripted, tasks here choose differently at 1 and at STEPS + 3 steps."""
    hypernet = make_hypernet(seed=1)
    inputs, _ = task_inputs(num_tasks=6, seed=1)
    cfg = hypernet.full_cfg.adapt
    longer = STEPS + 3
    _, early = adapt_candidates(hypernet, inputs, cfg, num_steps=1)
    results, late = adapt_candidates(hypernet, inputs, cfg, num_steps=longer)
    chosen_early = adapt_candidates(hypernet, inputs, cfg, num_steps=longer, choose_at=1)
    assert torch.equal(chosen_early[1], early) and not torch.equal(early, late)  # the test can tell them apart
    assert all(r.trajectory is None for r in chosen_early[0])  # kept for the choice only
    curve = predict_task(hypernet, inputs, cfg, longer, choose_at=1)
    torch.testing.assert_close(curve[:2], predict_task(hypernet, inputs, cfg, 1))
    for t, c in enumerate(early.tolist()):
        torch.testing.assert_close(curve[:, t], torch.stack(results[c].logits)[:, t])
    torch.testing.assert_close(predict_task(hypernet, inputs, cfg, longer, choose_at=longer),
                               predict_task(hypernet, inputs, cfg, longer))
    with pytest.raises(ValueError, match=r"choose_at must be in 0\.\.num_steps \(4\), got 5"):
        adapt_candidates(hypernet, inputs, cfg, num_steps=4, choose_at=5)
    with pytest.raises(ValueError, match=r"needs the run's trajectory"):
        after_steps(results[0], 1)  # adapted without its trajectory


@pytest.mark.parametrize("adapt_params", ["generated", "hypernet"])
def test_the_full_generator_adapts_the_generated_candidate_only(adapt_params, monkeypatch):
    """The prototype's generator has no normalisation to fix: whatever adapt.candidates names, it adapts the
    generated network alone (no silhouette computed) and predict_task is that adaptation."""
    hypernet, cfg = _mode("full", adapt_params)
    assert hypernet.generator.candidates == ("generated",) and cfg.candidates == tuple(CANDIDATES)
    monkeypatch.setattr(adapt_module, "silhouette", lambda *a: pytest.fail("one candidate: nothing to choose"))
    inputs, _ = task_inputs("full")
    direct = torch.stack(adapt(hypernet, inputs, cfg).logits)
    for candidates in (cfg.candidates, ("stored", "task")):
        results, pick = adapt_candidates(hypernet, inputs, dataclasses.replace(cfg, candidates=candidates))
        assert len(results) == 1 and torch.equal(pick, torch.zeros(T, dtype=torch.long))
        torch.testing.assert_close(torch.stack(results[0].logits), direct)
    torch.testing.assert_close(predict_task(hypernet, inputs, cfg), direct)


def test_one_configured_candidate_or_a_fixed_ablation_is_adapted_alone(monkeypatch):
    """adapt.candidates = ('task',) adapts the task-statistics candidate only; ``fixed`` (an ablation forcing
    generated tensors) leaves only the generated candidate, with its constants; unknown names are refused."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs()
    cfg = hypernet.full_cfg.adapt
    monkeypatch.setattr(adapt_module, "silhouette", lambda *a: pytest.fail("one candidate: nothing to choose"))
    task_only = dataclasses.replace(cfg, candidates=("task",))
    results, pick = adapt_candidates(hypernet, inputs, task_only)
    assert len(results) == 1 and not pick.any()
    torch.testing.assert_close(predict_task(hypernet, inputs, task_only),
                               torch.stack(adapt(hypernet, inputs, cfg, fixed={"blend": 1.0}).logits))
    results, _ = adapt_candidates(hypernet, inputs, cfg, fixed={"blend": 0.5})
    assert len(results) == 1
    assert all(torch.all(results[0].params[f"blend.{l}"] == 0.5) for l in range(len(CHANNELS)))
    with pytest.raises(ConfigError, match="adapt.candidates"):
        config(adapt={"candidates": ["nope"]})


def test_predict_clusters_is_the_argmax_after_every_step():
    """Cluster ids (S+1, N) are the argmax of the logits after 0..S steps."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs(num_tasks=None)
    cfg = hypernet.full_cfg.adapt
    clusters = predict_clusters(hypernet, inputs, cfg)
    assert clusters.shape == (STEPS + 1, N) and clusters.dtype.kind == "i"
    np.testing.assert_array_equal(clusters, predict_task(hypernet, inputs, cfg).argmax(-1).numpy())
    assert clusters.min() >= 0 and clusters.max() < K


# ---------------------------------------------------------------------------------------- set encoders and context

@pytest.mark.parametrize("conditioning", list(ENCODERS))
def test_set_encoders_pool_rows_in_any_order_and_depend_on_the_task(conditioning):
    """A task code is a function of the set of context rows: row order does not matter, the rows do."""
    hypernet = make_hypernet(hyper={"conditioning": conditioning})
    context = task_inputs()[0].context
    code = hypernet.encode(context)
    assert code.shape == (T, 8)
    torch.testing.assert_close(hypernet.encode(context[:, torch.randperm(N)]), code, atol=1e-5, rtol=1e-4)
    other = task_inputs(seed=9)[0].context
    assert not torch.allclose(hypernet.encode(other), code)


def test_encoder_reads_at_most_num_context_rows():
    """Rows beyond hyper.num_context never reach the encoder."""
    hypernet = make_hypernet(hyper={"num_context": 10})
    context = task_inputs()[0].context
    changed = context.clone()
    changed[:, 10:] = 100.0
    torch.testing.assert_close(hypernet.encode(changed), hypernet.encode(context))
    changed[:, 3] += 5.0
    assert not torch.allclose(hypernet.encode(changed), hypernet.encode(context))


def test_context_is_normalised_with_fixed_statistics_not_per_task():
    """set_context_statistics fixes the mean and std (+ eps) of a meta-training sample; every task's rows are
    normalised with them (kept in the state dict), so where a task's distribution sits reaches its code."""
    hypernet = make_hypernet()
    gen = torch.Generator().manual_seed(3)
    sample = 3.0 + 2.0 * torch.randn(500, CONTEXT_DIM, generator=gen)
    hypernet.set_context_statistics(sample)
    torch.testing.assert_close(hypernet.context_mean, sample.mean(0))
    torch.testing.assert_close(hypernet.context_std, sample.std(0) + CONTEXT_EPS)
    context = task_inputs()[0].context
    torch.testing.assert_close(hypernet.encode(context),
                               hypernet.encoder((context - sample.mean(0)) / (sample.std(0) + CONTEXT_EPS)))
    moved = context.clone()
    moved[1] = moved[1] * 2.0 + 1.0  # task 1 sits elsewhere: its code changes, task 0's does not
    codes, moved_codes = hypernet.encode(context), hypernet.encode(moved)
    torch.testing.assert_close(moved_codes[0], codes[0])
    assert not torch.allclose(moved_codes[1], codes[1], atol=1e-3)
    state = hypernet.state_dict()
    assert torch.equal(state["context_mean"], hypernet.context_mean)
    fresh = make_hypernet()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.encode(context), codes)


def test_a_registered_encoder_is_a_valid_conditioning(monkeypatch):
    """Adding a set encoder is one entry in ENCODERS: config validation accepts it and HyperNet uses it."""

    class MeanPool(torch.nn.Module):
        def __init__(self, row_dim, cfg):
            super().__init__()
            self.proj = torch.nn.Linear(row_dim, cfg.embed_dim)

        def forward(self, rows):
            return self.proj(rows.mean(-2))

    with pytest.raises(ConfigError, match="conditioning"):
        config(hyper={"conditioning": "mean"})
    monkeypatch.setitem(encoders.ENCODERS, "mean", MeanPool)
    hypernet = make_hypernet(hyper={"conditioning": "mean"})
    assert isinstance(hypernet.encoder, MeanPool)
    assert predict_task(hypernet, task_inputs()[0], hypernet.full_cfg.adapt).shape == (STEPS + 1, T, N, K)


def test_a_registered_generator_is_a_valid_generation(monkeypatch):
    """Adding a generator is one entry in GENERATORS: config validation accepts it and asks it to check the config;
    HyperNet builds it and the inner loop runs it."""

    class LinearHead(Generator):  # a linear classifier on the task's standardised features, weights from the code
        def __init__(self, cfg, num_classes, *, backbone=None, feature_dim=None):
            super().__init__()
            self.num_classes, self.feature_dim = num_classes, feature_dim
            self.head = torch.nn.Linear(cfg.hyper.embed_dim, num_classes * feature_dim)

        @staticmethod
        def check_config(cfg):
            if cfg.adapt.inner_loss == "augmentation":
                raise ConfigError("linear reads no images")

        def prepare(self, inputs, *, augmented=False):
            return TaskState(features=standardize(inputs.features)[0])

        def forward(self, code, state, num_classes, fixed=None):
            return fix({"weight": self.head(code).view(-1, self.num_classes, self.feature_dim)}, fixed)

        def logits(self, params, state, *, augmented=False):
            return state.features @ params["weight"].transpose(-1, -2)

        def adaptable(self, params):
            return ["weight"]

    with pytest.raises(ConfigError, match="generation"):
        config("linear")
    monkeypatch.setitem(generators.GENERATORS, "linear", LinearHead)
    with pytest.raises(ConfigError, match="linear reads no images"):
        config("linear", adapt={"inner_loss": "augmentation"})
    cfg = config("linear", adapt={"inner_loss": "infomax"})
    hypernet = HyperNet(cfg, CONTEXT_DIM, K, feature_dim=FEATURE_DIM)
    assert isinstance(hypernet.generator, LinearHead)
    result = adapt(hypernet, task_inputs("full")[0], cfg.adapt)
    assert len(result.logits) == STEPS + 1 and not torch.equal(result.logits[-1], result.logits[0])


# ---------------------------------------------------------------------------------------- inputs

def test_task_inputs_read_uint8_images_and_refuse_mismatches():
    """uint8 images (T, N, 28, 28) become floats (T, N, 1, 28, 28) in [0, 1]; ranks, task counts and missing
    inputs are refused with a reason."""
    images = torch.randint(0, 256, (T, N, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    inputs = TaskInputs(torch.randn(T, N, CONTEXT_DIM), images)
    assert inputs.images.shape == (T, N, 1, 28, 28) and inputs.images.dtype == torch.float32
    torch.testing.assert_close(inputs.images[:, :, 0] * 255.0, images.float())
    assert inputs.batched and inputs.num_tasks == T
    single = TaskInputs(torch.randn(N, CONTEXT_DIM), images[0])
    assert not single.batched and single.num_tasks == 1
    assert single.as_batch().images.shape == (1, N, 1, 28, 28) and single.as_batch().context.shape == (1, N, 6)
    with pytest.raises(ValueError, match="must both be"):
        TaskInputs(torch.randn(N, CONTEXT_DIM), features=torch.randn(T, N, FEATURE_DIM))
    with pytest.raises(ValueError, match="different numbers of tasks"):
        TaskInputs(torch.randn(T, N, CONTEXT_DIM), features=torch.randn(T + 1, N, FEATURE_DIM))
    with pytest.raises(ValueError, match="needs images or features"):
        TaskInputs(torch.randn(T, N, CONTEXT_DIM))


def test_task_inputs_from_task_data():
    """TaskData gathers aligned rows of tasks (context, images, features) as TaskInputs; subsets keep rows aligned."""
    rng = np.random.default_rng(0)
    labels = np.arange(30) % K
    task_data = TaskData("toy", "test", rng.normal(size=(30, CONTEXT_DIM)).astype(np.float32), labels,
                         images=class_patterns(labels, K))
    indices = np.arange(2 * N).reshape(2, N) % 30
    inputs = task_data.task_inputs(indices)
    assert inputs.batched and inputs.context.dtype == inputs.images.dtype == torch.float32
    assert inputs.context.shape == (2, N, CONTEXT_DIM) and inputs.images.shape == (2, N, 1, 28, 28)
    assert inputs.features is None
    torch.testing.assert_close(inputs.images[1, :, 0], images_to_tensor(task_data.images[indices[1]])[:, 0])
    np.testing.assert_array_equal(inputs.context[1].numpy(), task_data.context[indices[1]])
    part = task_data.subset(np.array([4, 2]))
    assert len(part) == 2 and part.labels.tolist() == [1, 2]
    np.testing.assert_array_equal(part.context, task_data.context[[4, 2]])
    np.testing.assert_array_equal(part.images, task_data.images[[4, 2]])


def test_bad_inputs_and_configs_raise_clear_errors():
    """Widths other than the hypernetwork's, a generator without what it reads, impossible settings: refused with a
    reason."""
    film, full = make_hypernet("film"), make_hypernet("full")
    images = task_inputs()[0].images
    with pytest.raises(ValueError, match="reads context rows of width"):
        predict_task(film, TaskInputs(torch.randn(T, N, CONTEXT_DIM + 1), images), film.full_cfg.adapt)
    with pytest.raises(ValueError, match="reads features of width"):
        predict_task(full, TaskInputs(torch.randn(T, N, CONTEXT_DIM), features=torch.randn(T, N, FEATURE_DIM + 1)),
                     full.full_cfg.adapt)
    with pytest.raises(ValueError, match="reads the task's images"):
        predict_task(film, task_inputs("full")[0], film.full_cfg.adapt)
    with pytest.raises(ValueError, match=r"\[mu, logvar\] rows"):
        predict_task(full, task_inputs("film")[0], full.full_cfg.adapt)
    with pytest.raises(ValueError, match="num_steps"):
        adapt(film, task_inputs()[0], film.full_cfg.adapt, num_steps=-1)
    with pytest.raises(ValueError, match="pass backbone="):
        HyperNet(config("film"), CONTEXT_DIM, K)
    with pytest.raises(ValueError, match="pass feature_dim="):
        HyperNet(config("full"), CONTEXT_DIM, K)
    with pytest.raises(ConfigError, match="divisible"):
        config(hyper={"num_heads": 3})
    with pytest.raises(ConfigError, match="adapt_blocks"):
        config(film={"adapt_blocks": 3})
    with pytest.raises(ConfigError, match="augmentation"):
        config("full", adapt={"inner_loss": "augmentation"})


# ---------------------------------------------------------------------------------------- the film generator

def test_film_heads_start_small_but_not_zero():
    """At initialisation every task gets nearly the identity modulation (scale and shift near 0, blend near
    film.blend_init, temperature near film.tau) from heads whose weights are small but not zero."""
    hypernet = make_hypernet()
    film = hypernet.full_cfg.film
    params, _, _ = generated(hypernet, task_inputs()[0])
    for l in range(len(CHANNELS)):
        for kind in ("scale", "shift"):
            assert 0 < params[f"{kind}.{l}"].abs().max() < 0.2, f"{kind}.{l}"
        torch.testing.assert_close(params[f"blend.{l}"], torch.full((T,), film.blend_init), atol=0.05, rtol=0)
    torch.testing.assert_close(params["log_tau"].exp(), torch.full((T, 1), film.tau), atol=0.5, rtol=0)
    for head in [*hypernet.generator.heads, hypernet.generator.tau_head]:
        assert 0.5 * film.init_std < head.weight.std() < 2 * film.init_std


def _encoder_gradient(hypernet: HyperNet) -> float:
    """Size of the gradient that one outer loss after the inner loop sends to the set encoder."""
    inputs, labels = task_inputs()
    result = adapt(hypernet, inputs, hypernet.full_cfg.adapt, create_graph=True)
    hypernet.zero_grad()
    aligned_cross_entropy(result.logits[-1], labels).backward()
    return sum(float(p.grad.abs().sum()) for p in hypernet.encoder.parameters() if p.grad is not None)


def test_gradients_reach_the_set_encoder_from_the_first_step():
    """A freshly built hypernetwork already sends the outer loss's gradient to its set encoder (heads of zero weight
    would cut it: the contrast shows the check can fail)."""
    assert _encoder_gradient(make_hypernet()) > 1e-6
    cut = make_hypernet()
    with torch.no_grad():
        for head in [*cut.generator.heads, cut.generator.tau_head]:
            head.weight.zero_()
    assert _encoder_gradient(cut) == 0.0


def test_the_film_network_reads_the_backbone_through_the_generated_modulation():
    """With FiLM fixed at zero, blend 0 gives the backbone's own embedding (eval statistics), blend 1 each task's
    batch statistics; either way standardised over the task and L2-normalised, the cluster head's input."""
    hypernet = make_hypernet()
    model = hypernet.generator.backbone
    inputs, _ = task_inputs()
    zero_film = {"scale": 0.0, "shift": 0.0}
    with torch.no_grad():
        stored = model.embed(inputs.images.flatten(0, 1)).view(T, N, EMBED_DIM)
        with batch_statistics(model):
            own = torch.stack([model.embed(inputs.images[t]) for t in range(T)])
        for blend, expected in ((0.0, stored), (1.0, own)):
            params, state, _ = generated(hypernet, inputs, fixed={**zero_film, "blend": blend})
            torch.testing.assert_close(state.reference, normalize_task(expected, l2=True), atol=1e-4, rtol=1e-4)
            assert all(torch.equal(params[f"blend.{l}"], torch.full((T,), blend)) for l in range(len(CHANNELS)))


def test_the_cluster_head_is_k_means_on_the_modulated_embedding_with_a_generated_temperature():
    """Prototypes are k-means centroids of the task's starting embedding; logits are exp(log_tau) x cosine of the
    embedding to the prototypes."""
    hypernet = make_hypernet()
    film = hypernet.full_cfg.film
    params, state, logits = generated(hypernet, task_inputs()[0])
    z = state.reference
    torch.testing.assert_close(params["prototypes"], kmeans_prototypes(z, K, film.cluster_iters, film.cluster_inits))
    torch.testing.assert_close(logits, cosine_logits(z, params["prototypes"], params["log_tau"]))
    torch.testing.assert_close(hypernet.generator.embedding(params, state), z)


def test_fix_replaces_generated_tensors_by_constants():
    """fix() replaces every tensor whose name starts with a key; None or {} changes nothing."""
    params = {"blend.0": torch.rand(T), "blend.1": torch.rand(T), "scale.0": torch.rand(T, 4)}
    assert fix(params, None) is params and fix(params, {}) is params
    fixed = fix(params, {"blend": 1.0})
    assert torch.equal(fixed["blend.0"], torch.ones(T)) and torch.equal(fixed["blend.1"], torch.ones(T))
    assert fixed["scale.0"] is params["scale.0"] and not torch.equal(params["blend.0"], torch.ones(T))


@pytest.mark.parametrize("which,expected", [
    ({}, ["scale.1", "shift.1", "prototypes", "log_tau"]),
    ({"adapt": "head"}, ["prototypes", "log_tau"]),
    ({"adapt": "film"}, ["scale.1", "shift.1"]),
    ({"adapt_blocks": 2}, ["scale.0", "scale.1", "shift.0", "shift.1", "prototypes", "log_tau"]),
])
def test_adaptable_names(which, expected):
    """film.adapt picks the FiLM of the last film.adapt_blocks blocks, the head or both; the full MLP adapts
    everything it generates."""
    hypernet = make_hypernet(film=which)
    params, _, _ = generated(hypernet, task_inputs()[0])
    assert hypernet.adaptable(params) == expected
    full = make_hypernet("full")
    params, _, _ = generated(full, task_inputs("full")[0])
    assert full.adaptable(params) == list(params) and len(params) == 4


@pytest.mark.parametrize("which", [{}, {"adapt": "head"}, {"adapt_blocks": 2}])
def test_the_inner_loop_updates_exactly_the_adaptable_parameters(which):
    """Adapted parameters move; every other generated tensor stays as generated."""
    hypernet = make_hypernet(film=which)
    inputs, _ = task_inputs()
    params, _, _ = generated(hypernet, inputs)
    names = hypernet.adaptable(params)
    adapted = adapt(hypernet, inputs, hypernet.full_cfg.adapt).params
    assert set(adapted) == set(params)
    for name, value in params.items():
        if name in names:
            assert not torch.allclose(adapted[name], value), name
        else:
            torch.testing.assert_close(adapted[name], value.detach(), msg=name)


def test_step_sizes_are_meta_learned_per_parameter():
    """Meta-SGD: the step size of every adaptable tensor is exp of a learned parameter, starting at film.inner_lr
    (FiLM) and film.head_lr (prototypes, temperature); film.learn_inner_lr = false freezes them."""
    hypernet = make_hypernet(film={"inner_lr": 0.02, "head_lr": 0.3})
    params, _, _ = generated(hypernet, task_inputs()[0])
    lrs = hypernet.inner_lrs(hypernet.adaptable(params), default=123.0)
    torch.testing.assert_close(lrs["scale.1"], torch.full((8,), 0.02))
    torch.testing.assert_close(lrs["shift.1"], torch.full((8,), 0.02))
    torch.testing.assert_close(lrs["prototypes"], torch.tensor(0.3))
    torch.testing.assert_close(lrs["log_tau"], torch.tensor(0.3))
    assert all(p.requires_grad for p in hypernet.generator.log_lrs.parameters())
    frozen = make_hypernet(film={"learn_inner_lr": False})
    assert not any(p.requires_grad for p in frozen.generator.log_lrs.parameters())
    full = make_hypernet("full")
    params, _, _ = generated(full, task_inputs("full")[0])
    assert set(full.inner_lrs(full.adaptable(params), default=0.7).values()) == {0.7}  # adapt.inner_lr


def _one_step(hypernet: HyperNet, inputs: TaskInputs, cfg) -> tuple[dict, dict, dict]:
    """(generated parameters, their inner-loss gradients, the parameters after one inner step)."""
    params, state, logits = generated(hypernet, inputs)
    names = hypernet.adaptable(params)
    loss = INNER_LOSSES[cfg.inner_loss].fn(InnerView(logits, state.reference), cfg).sum()
    grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names])))
    return params, grads, adapt(hypernet, inputs, cfg, num_steps=1).params


def test_an_inner_step_is_the_step_size_times_the_gradient():
    """Without step normalisation, one step moves each adaptable tensor by -(step size x lr_scale) x its inner-loss
    gradient."""
    hypernet = make_hypernet(film={"normalize_steps": False})
    inputs, _ = task_inputs()
    cfg = config(film={"normalize_steps": False}, adapt={"lr_scale": 0.5}).adapt
    params, grads, stepped = _one_step(hypernet, inputs, cfg)
    lrs = hypernet.inner_lrs(list(grads), cfg.inner_lr)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(stepped[name], (params[name] - 0.5 * lrs[name] * grad).detach(),
                                   atol=1e-6, rtol=1e-5, msg=name)


def test_normalised_steps_have_the_step_size_as_their_size():
    """With film.normalize_steps, the gradient is divided by its RMS over each task's tensor: a step's RMS is the
    step size x lr_scale whatever the scale of the loss, and doubling lr_scale doubles it."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs()
    for lr_scale in (1.0, 2.0):
        cfg = config(adapt={"lr_scale": lr_scale}).adapt
        params, grads, stepped = _one_step(hypernet, inputs, cfg)
        lrs = hypernet.inner_lrs(list(grads), cfg.inner_lr)
        for name in grads:
            change = (stepped[name] - params[name].detach()).flatten(1)  # (T, ...) per task
            rms = change.pow(2).mean(1).sqrt()
            expected = lr_scale * float(lrs[name].detach().flatten()[0])  # every entry starts at the same size
            torch.testing.assert_close(rms, torch.full((T,), expected), atol=0, rtol=5e-3, msg=name)  # eps 1e-8
    direction = hypernet.generator.direction("prototypes", 1e-3 * torch.randn(T, K, EMBED_DIM))
    torch.testing.assert_close(direction.pow(2).mean(dim=(1, 2)).sqrt(), torch.ones(T), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- the inner loop

ADAPT_MODES = [("film", "generated"), ("full", "generated"), ("full", "hypernet")]


def _mode(generation: str, adapt_params: str):
    lr = {"inner_lr": HYPERNET_LR} if adapt_params == "hypernet" else {}
    return make_hypernet(generation), config(generation, adapt={"adapt_params": adapt_params, **lr}).adapt


@pytest.mark.parametrize("generation,adapt_params", ADAPT_MODES)
def test_zero_step_adaptation_reproduces_the_generated_network(generation, adapt_params):
    """Step 0 is the generated network itself (one candidate: no choice of normalisation); later steps move it;
    nothing keeps a graph at test time."""
    hypernet, cfg = _mode(generation, adapt_params)
    cfg = dataclasses.replace(cfg, candidates=("generated",))
    inputs, _ = task_inputs(generation, None)
    with torch.no_grad():
        direct = generated(hypernet, inputs)[2][0]
    zero = predict_task(hypernet, inputs, cfg, num_steps=0)
    assert zero.shape == (1, N, K)
    torch.testing.assert_close(zero[0], direct)
    logits = predict_task(hypernet, inputs, cfg)
    assert logits.shape == (STEPS + 1, N, K) and not logits.requires_grad
    torch.testing.assert_close(logits[0], direct)
    assert not torch.allclose(logits[-1], direct)


@pytest.mark.parametrize("generation,loss", [("film", name) for name in INNER_LOSSES]
                         + [("full", name) for name in INNER_LOSSES if name != "augmentation"])
def test_inner_steps_lower_the_inner_loss(generation, loss):
    """A few steps on the generated parameters lower the configured unsupervised loss of every task."""
    hypernet = make_hypernet(generation)
    inputs, _ = task_inputs(generation)
    cfg = config(generation, adapt={"inner_loss": loss, "lr_scale": 0.2, "inner_lr": 0.1}).adapt
    result = adapt(hypernet, inputs, cfg, num_steps=4)
    assert len(result.inner_losses) == 4
    view = InnerView(result.logits[0], result.state.reference,
                     hypernet.logits(generated(hypernet, inputs)[0], result.state, augmented=True)
                     if INNER_LOSSES[loss].augmented else None)
    before, after = INNER_LOSSES[loss].fn(view, cfg), final_inner_loss(hypernet, result, cfg)
    assert before.shape == (T,) and torch.all(after < before), (before, after)
    torch.testing.assert_close(result.inner_losses[0], before.mean().detach())


def test_the_augmentation_loss_reads_fixed_augmented_copies():
    """Asked for by the augmentation loss, the state carries augmented copies of the task's images, the same every
    call (deterministic), and the inner loop reads their logits."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs()
    first = hypernet.prepare(inputs.as_batch(), augmented=True)
    second = hypernet.prepare(inputs.as_batch(), augmented=True)
    assert first.augmented.shape == inputs.images.shape and torch.equal(first.augmented, second.augmented)
    assert not torch.allclose(first.augmented, inputs.images) and hypernet.prepare(inputs).augmented is None
    cfg = config(adapt={"inner_loss": "augmentation"}).adapt
    result = adapt(hypernet, inputs, cfg)
    assert result.state.augmented is not None and "pre_augmented" in result.state.cache
    assert adapt(hypernet, inputs, cfg, num_steps=0).state.augmented is None  # no step: no copies made


@pytest.mark.parametrize("generation,adapt_params", ADAPT_MODES)
def test_test_time_adaptation_leaves_the_hypernet_unchanged_and_keeps_no_graph(generation, adapt_params):
    """At test time the inner loop works on detached copies: the hypernetwork (backbone included) is unchanged, the
    adapted parameters and logits are cut from it."""
    hypernet, cfg = _mode(generation, adapt_params)
    before = {k: v.clone() for k, v in hypernet.state_dict().items()}
    inputs, _ = task_inputs(generation)
    result = adapt(hypernet, inputs, cfg, create_graph=False)
    predict_task(hypernet, inputs, cfg)
    for key, value in hypernet.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(v.grad_fn is None for v in result.params.values())
    assert all(not logits.requires_grad for logits in result.logits)
    total = sum(v.sum() for v in result.params.values())
    if total.requires_grad:  # leaves of their own (the film inner loop's copies): nothing leads to the hypernet
        grads = torch.autograd.grad(total, list(hypernet.parameters()), allow_unused=True)
        assert all(g is None for g in grads)


def test_gradients_reach_the_hypernet_through_the_inner_loop():
    """With create_graph=True the outer loss after the inner steps reaches the set encoder, the FiLM and temperature
    heads and the step sizes of the adapted tensors (second order: only through the steps)."""
    hypernet = make_hypernet()
    inputs, labels = task_inputs()
    result = adapt(hypernet, inputs, hypernet.full_cfg.adapt, create_graph=True)
    assert all(logits.requires_grad for logits in result.logits)
    aligned_cross_entropy(result.logits[-1], labels).backward()
    grads = {name: p.grad for name, p in hypernet.named_parameters()}

    def size(prefix: str) -> float:
        return sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith(prefix) and g is not None)

    for prefix in ("encoder.", "generator.heads.0.", "generator.heads.1.", "generator.tau_head.",
                   "generator.log_lrs.scale_1", "generator.log_lrs.shift_1", "generator.log_lrs.prototypes",
                   "generator.log_lrs.log_tau"):
        assert size(prefix) > 0, prefix
    assert size("generator.log_lrs.scale_0") == 0  # block 0 is not adapted (film.adapt_blocks = 1)
    hypernet.zero_grad()
    zero = adapt(hypernet, inputs, hypernet.full_cfg.adapt, create_graph=True, num_steps=0)
    aligned_cross_entropy(zero.logits[-1], labels).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in hypernet.generator.log_lrs.parameters())


def test_the_seed_profiles_hypernet_mode_meta_learns_through_the_inner_loop():
    """The seed profile (attention encoder, full generator, geometry loss, SGD on every hypernetwork weight per task):
    steps lower the geometry loss, and the outer loss has finite, non-zero second-order gradients."""
    cfg = load_config("seed", overrides={"hyper": {"embed_dim": 8}, "full": {"head_hidden": 16, "target_hidden": [8]},
                                         "adapt": {"inner_lr": HYPERNET_LR}})
    assert (cfg.hyper.generation, cfg.adapt.adapt_params, cfg.hyper.conditioning) == ("full", "hypernet", "attention")
    hypernet = make_hypernet(cfg=cfg)
    inputs, labels = task_inputs("full")
    result = adapt(hypernet, inputs, cfg.adapt, create_graph=True)
    assert len(result.inner_losses) == cfg.adapt.num_inner_steps
    before = INNER_LOSSES["geometry"].fn(InnerView(result.logits[0], result.state.reference), cfg.adapt)
    torch.testing.assert_close(result.inner_losses[0], before.mean().detach())
    assert torch.all(final_inner_loss(hypernet, result, cfg.adapt) < before)
    aligned_cross_entropy(result.logits[-1], labels).backward()
    grads = [p.grad for p in hypernet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    with pytest.raises(ValueError, match="checkpoint's K"):
        adapt(hypernet, inputs, cfg.adapt, num_classes=K + 1)


def test_fixed_tensors_stay_fixed_through_the_inner_loop():
    """``fixed`` replaces generated tensors (here every blend) by constants before the steps; they stay there."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs()
    cfg = hypernet.full_cfg.adapt
    result = adapt(hypernet, inputs, cfg, fixed={"blend": 1.0})
    assert all(torch.equal(result.params[f"blend.{l}"], torch.ones(T)) for l in range(len(CHANNELS)))
    free = adapt(hypernet, inputs, cfg)
    assert not torch.allclose(result.logits[0], free.logits[0])
    torch.testing.assert_close(predict_task(hypernet, inputs, cfg, fixed={"blend": 1.0}), torch.stack(result.logits))


def test_a_context_override_conditions_on_other_rows_but_reads_the_tasks_images():
    """``context`` replaces the conditioning rows only: the result is that of the same images with those rows."""
    hypernet = make_hypernet()
    with torch.no_grad():
        for head in hypernet.generator.heads:  # a code that matters: move the heads off their small start
            head.weight.normal_(std=0.3)
    inputs, _ = task_inputs()
    cfg = hypernet.full_cfg.adapt
    other = task_inputs(seed=9)[0].context
    overridden = predict_task(hypernet, inputs, cfg, context=other)
    torch.testing.assert_close(overridden, predict_task(hypernet, TaskInputs(other, inputs.images), cfg))
    assert not torch.allclose(overridden, predict_task(hypernet, inputs, cfg))


def test_the_trajectory_keeps_the_parameters_after_every_step():
    """trajectory=True: S+1 detached parameter dicts, from the generated ones to the adapted ones; off by default."""
    hypernet = make_hypernet()
    inputs, _ = task_inputs()
    cfg = hypernet.full_cfg.adapt
    result = adapt(hypernet, inputs, cfg, trajectory=True)
    assert result.trajectory is not None and len(result.trajectory) == STEPS + 1
    assert all(v.grad_fn is None for step in result.trajectory for v in step.values())
    params, _, _ = generated(hypernet, inputs)
    for name in params:
        torch.testing.assert_close(result.trajectory[0][name], params[name].detach())
        torch.testing.assert_close(result.trajectory[-1][name], result.params[name])
    assert not torch.allclose(result.trajectory[1]["prototypes"], result.trajectory[0]["prototypes"])
    assert adapt(hypernet, inputs, cfg).trajectory is None


@pytest.mark.parametrize("generation", list(GENERATORS))
def test_extend_reads_images_outside_the_task_as_the_adapted_network_reads_its_own(generation):
    """extend gives logits of other inputs under each task's adapted network: the task's own inputs get the task's
    logits, and an input's logits do not depend on the other inputs beside it."""
    hypernet = make_hypernet(generation)
    inputs, _ = task_inputs(generation)
    result = adapt(hypernet, inputs, hypernet.full_cfg.adapt)
    with torch.no_grad():
        own = hypernet.extend(result.params, result.state, inputs)
        torch.testing.assert_close(own, result.logits[-1], atol=1e-4, rtol=1e-4)
        other, _ = task_inputs(generation, seed=5)
        beside = hypernet.extend(result.params, result.state, other)
        first = TaskInputs(other.context[:, :3], None if other.images is None else other.images[:, :3],
                           None if other.features is None else other.features[:, :3])
        torch.testing.assert_close(hypernet.extend(result.params, result.state, first), beside[:, :3],
                                   atol=1e-5, rtol=1e-5)
