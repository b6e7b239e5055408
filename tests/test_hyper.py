"""The hypernetwork stage: set encoders, generators (cluster head, full MLP), the inner loop, inner and outer losses."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmlib.config import AdaptConfig, ConfigError, HyperConfig, load_config
from hmlib.features import normalize_task
from hmlib.hyper import encoders, losses
from hmlib.hyper.adapt import adapt, predict_clusters, predict_task
from hmlib.hyper.encoders import ENCODERS
from hmlib.hyper.generators import GENERATORS, ClusterGenerator, TaskState, diffuse, kmeans_prototypes, knn_graph
from hmlib.hyper.hypernet import HyperNet, TaskInputs
from hmlib.hyper.inputs import TaskData
from hmlib.hyper.losses import (INNER_LOSSES, aligned_cross_entropy, best_alignment, entropy_loss, geometry_loss,
                                infomax_loss, inner_loss, task_accuracy)
from hmlib.metrics import clustering_accuracy

CONTEXT_DIM, FEATURE_DIM, K, N, T, STEPS = 6, 5, 3, 24, 2, 3
NEIGHBORS = 4
HYPER = HyperConfig(embed_dim=8, head_hidden=16, target_hidden=(8,), num_seeds=2, num_heads=2, num_context=64,
                    cluster_inits=3, graph_neighbors=NEIGHBORS,
                    diffusion_steps=2)
ADAPT = AdaptConfig(inner_loss="infomax", num_inner_steps=STEPS, inner_lr=0.5)
HYPERNET_LR = 0.05  # inner lr when the inner loop updates every weight of the hypernetwork


def hyper_cfg(**changes) -> HyperConfig:
    return dataclasses.replace(HYPER, **changes)


def make_hypernet(seed: int = 0, **changes) -> HyperNet:
    torch.manual_seed(seed)
    return HyperNet(hyper_cfg(**changes), CONTEXT_DIM, FEATURE_DIM, K)


def random_inputs(*lead: int, seed: int = 1) -> TaskInputs:
    """Gaussian context rows and features, with or without a leading task dimension."""
    gen = torch.Generator().manual_seed(seed)
    return TaskInputs(torch.randn(*lead, N, CONTEXT_DIM, generator=gen),
                      torch.randn(*lead, N, FEATURE_DIM, generator=gen))


def blob_inputs(num_tasks: int, seed: int = 0, spread: float = 0.1) -> tuple[TaskInputs, torch.Tensor]:
    """K well-separated Gaussian blobs per task (features and context), labels interleaved."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % K
    centres = 4.0 * torch.randn(num_tasks, K, FEATURE_DIM, generator=gen)
    features = centres[:, labels] + spread * torch.randn(num_tasks, N, FEATURE_DIM, generator=gen)
    context = torch.cat([features, -2.0 + 0.01 * torch.randn(num_tasks, N, 1, generator=gen)], -1)
    return TaskInputs(context, features), labels.expand(num_tasks, N)


def generated_logits(hypernet: HyperNet, inputs: TaskInputs) -> torch.Tensor:
    """(T, N, K) logits of the generated classifier, computed directly from the hypernetwork's parts."""
    batch = inputs.as_batch()
    with torch.no_grad():
        state = hypernet.prepare(batch.features)
        return hypernet.logits(hypernet(batch.context, state), state)


# ---------------------------------------------------------------------------------------- hypernetwork

@pytest.mark.parametrize("conditioning", list(ENCODERS))
@pytest.mark.parametrize("generation", list(GENERATORS))
def test_shapes_with_and_without_a_task_dimension(conditioning, generation):
    """Generated parameters, logits and predictions have the documented shapes, batched or not."""
    hypernet = make_hypernet(conditioning=conditioning, generation=generation)
    batch = random_inputs(T)
    state = hypernet.prepare(batch.features)
    params = hypernet(batch.context, state)
    if generation == "cluster":
        assert {k: tuple(v.shape) for k, v in params.items()} == {
            "log_tau": (T, 1), "alpha_logit": (T, 1), "prototypes": (T, K, FEATURE_DIM)}
    else:
        assert {k: tuple(v.shape) for k, v in params.items()} == {
            "layers.0.weight": (T, 8, FEATURE_DIM), "layers.0.bias": (T, 8),
            "layers.1.weight": (T, K, 8), "layers.1.bias": (T, K)}
    assert hypernet.logits(params, state).shape == (T, N, K)
    assert predict_task(hypernet, batch, ADAPT).shape == (STEPS + 1, T, N, K)
    single = predict_task(hypernet, random_inputs(), ADAPT)
    assert single.shape == (STEPS + 1, N, K) and torch.isfinite(single).all()
    assert predict_task(hypernet, random_inputs(), ADAPT, num_steps=0).shape == (1, N, K)


@pytest.mark.parametrize("conditioning", list(ENCODERS))
@pytest.mark.parametrize("generation", list(GENERATORS))
def test_batched_tasks_give_the_same_result_as_one_at_a_time(conditioning, generation):
    """Tasks in a batch are independent: generation and adaptation per task, k-means seeded the same for each."""
    hypernet = make_hypernet(conditioning=conditioning, generation=generation)
    batch = random_inputs(T)
    batched = predict_task(hypernet, batch, ADAPT)
    for t in range(T):
        single = predict_task(hypernet, TaskInputs(batch.context[t], batch.features[t]), ADAPT)
        torch.testing.assert_close(batched[:, t], single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("conditioning", list(ENCODERS))
def test_set_encoders_pool_rows_in_any_order_and_depend_on_the_task(conditioning):
    """A task code is a function of the set of context rows: row order does not matter, the rows do."""
    hypernet = make_hypernet(conditioning=conditioning)
    context = random_inputs(T).context
    code = hypernet.encode(context)
    assert code.shape == (T, HYPER.embed_dim)
    torch.testing.assert_close(hypernet.encode(context[:, torch.randperm(N)]), code, atol=1e-5, rtol=1e-4)
    other = random_inputs(T, seed=9).context
    assert not torch.allclose(hypernet.encode(other), code)


def test_encoder_reads_at_most_num_context_rows():
    """Rows beyond hyper.num_context never reach the encoder."""
    hypernet = make_hypernet(num_context=10)
    context = random_inputs(T).context
    changed = context.clone()
    changed[:, 10:] = 100.0
    torch.testing.assert_close(hypernet.encode(changed), hypernet.encode(context))
    changed[:, 3] += 5.0
    assert not torch.allclose(hypernet.encode(changed), hypernet.encode(context))


def test_task_normalisation_gives_shift_and_scale_invariance():
    """Context and features are standardised per task: an affine change of a task's columns changes nothing."""
    hypernet = make_hypernet()
    inputs = random_inputs(T)
    moved = TaskInputs(inputs.context * 5.0 - 2.0, inputs.features * 3.0 + 7.0)
    torch.testing.assert_close(hypernet.encode(moved.context), hypernet.encode(inputs.context), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hypernet.prepare(moved.features).z, hypernet.prepare(inputs.features).z,
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(predict_task(hypernet, moved, ADAPT), predict_task(hypernet, inputs, ADAPT),
                               atol=1e-3, rtol=1e-3)
    z = normalize_task(torch.randn(50, 4) * 3 + 7)
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors():
    """Mismatched ranks, task counts or widths, and an indivisible head count, are refused with a reason."""
    hypernet = make_hypernet()
    with pytest.raises(ValueError, match="must both be"):
        TaskInputs(torch.randn(N, CONTEXT_DIM), torch.randn(T, N, FEATURE_DIM))
    with pytest.raises(ValueError, match="different numbers of tasks"):
        TaskInputs(torch.randn(T, N, CONTEXT_DIM), torch.randn(T + 1, N, FEATURE_DIM))
    with pytest.raises(ValueError, match="reads context rows of width"):
        predict_task(hypernet, TaskInputs(torch.randn(N, CONTEXT_DIM + 1), torch.randn(N, FEATURE_DIM)), ADAPT)
    with pytest.raises(ValueError, match="divisible"):
        make_hypernet(num_heads=3)
    with pytest.raises(ValueError, match="num_steps"):
        adapt(hypernet, random_inputs(), ADAPT, num_steps=-1)


def test_task_inputs_from_arrays_and_task_data():
    """TaskData gathers aligned rows of tasks as float32 TaskInputs; subsets keep rows aligned."""
    rng = np.random.default_rng(0)
    task_data = TaskData("toy", "test", rng.normal(size=(30, CONTEXT_DIM)), rng.normal(size=(30, FEATURE_DIM)),
                         np.arange(30) % K)
    indices = np.arange(2 * N).reshape(2, N) % 30
    inputs = task_data.task_inputs(indices)
    assert inputs.batched and inputs.context.dtype == inputs.features.dtype == torch.float32
    assert inputs.context.shape == (2, N, CONTEXT_DIM) and inputs.features.shape == (2, N, FEATURE_DIM)
    np.testing.assert_allclose(inputs.features[1].numpy(), task_data.features[indices[1]].astype(np.float32))
    part = task_data.subset(np.array([4, 2]))
    assert len(part) == 2 and part.labels.tolist() == [1, 2]
    np.testing.assert_array_equal(part.context, task_data.context[[4, 2]])
    assert not random_inputs().batched and random_inputs().as_batch().features.shape == (1, N, FEATURE_DIM)


def test_a_registered_encoder_is_a_valid_conditioning(monkeypatch):
    """Adding a set encoder is one entry in ENCODERS: config validation accepts it and HyperNet uses it."""

    class MeanPool(torch.nn.Module):
        def __init__(self, row_dim, cfg):
            super().__init__()
            self.proj = torch.nn.Linear(row_dim, cfg.embed_dim)

        def forward(self, rows):
            return self.proj(rows.mean(-2))

    with pytest.raises(ConfigError, match="conditioning"):
        load_config("default", overrides={"hyper": {"conditioning": "mean"}})
    monkeypatch.setitem(encoders.ENCODERS, "mean", MeanPool)
    assert load_config("default", overrides={"hyper": {"conditioning": "mean"}}).hyper.conditioning == "mean"
    hypernet = make_hypernet(conditioning="mean")
    assert isinstance(hypernet.encoder, MeanPool)
    assert predict_task(hypernet, random_inputs(T), ADAPT).shape == (STEPS + 1, T, N, K)


# ---------------------------------------------------------------------------------- cluster generator

def test_knn_graph_rows_sum_to_one_and_are_symmetric_before_normalisation():
    """The graph is the symmetrised kNN adjacency (by cosine, no self loops), each row divided by its sum."""
    z = F.normalize(torch.randn(T, N, FEATURE_DIM, generator=torch.Generator().manual_seed(3)), dim=-1)
    graph = knn_graph(z, NEIGHBORS)
    assert graph.shape == (T, N, N)
    torch.testing.assert_close(graph.sum(-1), torch.ones(T, N))
    assert torch.all(graph.diagonal(dim1=-2, dim2=-1) == 0)
    sim = z @ z.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).fill_(-2.0)
    directed = torch.zeros_like(sim).scatter_(-1, sim.topk(NEIGHBORS, dim=-1).indices, 1.0)
    symmetric = (directed + directed.transpose(-1, -2)) / 2  # brute force, before normalisation
    torch.testing.assert_close(graph * symmetric.sum(-1, keepdim=True), symmetric)
    unnormalised = graph * symmetric.sum(-1, keepdim=True)
    torch.testing.assert_close(unnormalised, unnormalised.transpose(-1, -2))
    assert torch.all((graph > 0).sum(-1) >= NEIGHBORS)


def test_knn_graph_with_more_neighbours_than_rows_links_every_pair():
    """neighbours >= N - 1: every other row is a neighbour, with equal weight."""
    z = F.normalize(torch.randn(1, 5, FEATURE_DIM), dim=-1)
    expected = (torch.ones(5, 5) - torch.eye(5)) / 4
    torch.testing.assert_close(knn_graph(z, 50)[0], expected)


def test_diffuse_with_zero_steps_is_the_identity():
    """0 steps (or no graph) return the rows unchanged; one step mixes each row with its neighbours' mean."""
    z = F.normalize(torch.randn(T, N, FEATURE_DIM), dim=-1)
    graph, alpha = knn_graph(z, NEIGHBORS), torch.full((T, 1), 0.8)
    assert torch.equal(diffuse(z, graph, alpha, 0), z)
    assert torch.equal(diffuse(z, None, alpha, 3), z)
    one = diffuse(z, graph, alpha, 1)
    torch.testing.assert_close(one, F.normalize(0.2 * z + 0.8 * graph @ z, dim=-1))
    torch.testing.assert_close(one.norm(dim=-1), torch.ones(T, N))
    torch.testing.assert_close(diffuse(z, graph, torch.zeros(T, 1), 4), z)  # alpha 0: nothing moves


def test_prototypes_are_the_means_of_their_clusters():
    """Each k-means centroid is the mean of the rows nearest to it; separable blobs are recovered exactly."""
    inputs, labels = blob_inputs(4, seed=1)
    h = normalize_task(inputs.features, l2=True)
    centres = kmeans_prototypes(h, K, iters=5, inits=4)
    assert centres.shape == (4, K, FEATURE_DIM)
    nearest = ((h.unsqueeze(-2) - centres.unsqueeze(-3)) ** 2).sum(-1).argmin(-1)
    for t in range(4):
        assert clustering_accuracy(nearest[t].numpy(), labels[t].numpy(), K) == 1.0
        for k in range(K):
            torch.testing.assert_close(centres[t, k], h[t][nearest[t] == k].mean(0), atol=1e-5, rtol=1e-5)


def test_kmeans_prototypes_are_deterministic_and_differentiable():
    """Seeded k-means++: the same rows give the same centroids, alone or in a batch; gradients reach the rows."""
    h = torch.randn(3, N, FEATURE_DIM, requires_grad=True)
    centres = kmeans_prototypes(h, K, iters=3, inits=2)
    torch.testing.assert_close(kmeans_prototypes(h, K, iters=3, inits=2), centres)
    torch.testing.assert_close(kmeans_prototypes(h[1:2], K, iters=3, inits=2)[0], centres[1])
    centres.pow(2).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_cluster_logits_are_the_temperature_times_cosine_similarity():
    """Logits (T, N, K) = exp(log_tau) * cos(diffused row, prototype); at initialisation tau and alpha are the
    configured values whatever the task."""
    hypernet = make_hypernet()
    inputs = random_inputs(T)
    state = hypernet.prepare(inputs.features)
    params = hypernet(inputs.context, state)
    torch.testing.assert_close(params["log_tau"].exp(), torch.full((T, 1), HYPER.cluster_tau))
    torch.testing.assert_close(torch.sigmoid(params["alpha_logit"]), torch.full((T, 1), HYPER.diffusion_alpha))
    logits = hypernet.logits(params, state)
    h = diffuse(state.z, state.graph, torch.sigmoid(params["alpha_logit"]), HYPER.diffusion_steps)
    cosine = h @ F.normalize(params["prototypes"], dim=-1).transpose(-1, -2)
    assert logits.shape == (T, N, K)
    torch.testing.assert_close(logits, HYPER.cluster_tau * cosine)
    assert logits.abs().max() <= HYPER.cluster_tau + 1e-4


def test_adaptable_names():
    """The cluster head adapts tau, prototypes and (with a graph) the diffusion weight; the full MLP everything."""
    inputs = random_inputs(T)
    with_graph = make_hypernet()
    state = with_graph.prepare(inputs.features)
    assert state.graph is not None and state.graph.shape == (T, N, N)
    assert with_graph.adaptable(with_graph(inputs.context, state)) == ["log_tau", "alpha_logit", "prototypes"]
    for changes in ({"graph_neighbors": 0}, {"diffusion_steps": 0}):
        plain = make_hypernet(**changes)
        state = plain.prepare(inputs.features)
        assert state.graph is None
        assert plain.adaptable(plain(inputs.context, state)) == ["log_tau", "prototypes"]
    full = make_hypernet(generation="full")
    params = full(inputs.context, full.prepare(inputs.features))
    assert full.adaptable(params) == list(params) and len(params) == 4
    assert isinstance(make_hypernet().generator, ClusterGenerator)


def test_the_inner_loop_updates_exactly_the_adaptable_parameters():
    """Adapted prototypes and temperature move; a generated parameter that is not adaptable stays as generated."""
    hypernet = make_hypernet(graph_neighbors=0)
    inputs, _ = blob_inputs(T, seed=4, spread=2.0)
    generated = hypernet(inputs.context, hypernet.prepare(inputs.features))
    adapted = adapt(hypernet, inputs, ADAPT).params
    assert set(adapted) == set(generated)
    for name in ("log_tau", "prototypes"):
        assert not torch.allclose(adapted[name], generated[name]), name
    torch.testing.assert_close(adapted["alpha_logit"], generated["alpha_logit"].detach())


def test_generation_and_conditioning_come_from_their_registries():
    """hyper.generation and hyper.conditioning accept the registered names only."""
    for name in GENERATORS:
        assert load_config("default", overrides={"hyper": {"generation": name}}).hyper.generation == name
    with pytest.raises(ConfigError, match="generation"):
        load_config("default", overrides={"hyper": {"generation": "compact"}})
    with pytest.raises(ConfigError, match="conditioning"):
        load_config("default", overrides={"hyper": {"conditioning": "stats"}})


def test_zero_steps_is_nearest_prototype_on_separable_blobs():
    """Untrained, the cluster head already clusters separable blobs: the argmax is the nearest k-means prototype."""
    hypernet = make_hypernet(graph_neighbors=0)
    inputs, labels = blob_inputs(4, seed=1)
    logits = predict_task(hypernet, inputs, ADAPT, num_steps=0)[0]
    assert np.all(task_accuracy(logits, labels) == 1.0)
    z = normalize_task(inputs.features, l2=True)
    centres = F.normalize(kmeans_prototypes(z, K, HYPER.cluster_iters, HYPER.cluster_inits), dim=-1)
    assert torch.equal(logits.argmax(-1), (z @ centres.transpose(-1, -2)).argmax(-1))


# ----------------------------------------------------------------------------------------- inner loop

@pytest.mark.parametrize("generation", list(GENERATORS))
@pytest.mark.parametrize("adapt_params", ["generated", "hypernet"])
def test_zero_step_adaptation_reproduces_the_generated_classifier(generation, adapt_params):
    """Step 0 is the generated classifier itself; later steps move it; nothing keeps a graph at test time."""
    hypernet = make_hypernet(generation=generation)
    inputs = random_inputs()
    cfg = dataclasses.replace(ADAPT, adapt_params=adapt_params,
                              inner_lr=HYPERNET_LR if adapt_params == "hypernet" else ADAPT.inner_lr)
    direct = generated_logits(hypernet, inputs)[0]
    zero = predict_task(hypernet, inputs, cfg, num_steps=0)
    assert zero.shape == (1, N, K)
    torch.testing.assert_close(zero[0], direct)
    logits = predict_task(hypernet, inputs, cfg)
    assert logits.shape == (STEPS + 1, N, K) and not logits.requires_grad
    torch.testing.assert_close(logits[0], direct)
    assert not torch.allclose(logits[-1], direct)


@pytest.mark.parametrize("generation", list(GENERATORS))
@pytest.mark.parametrize("loss", list(INNER_LOSSES))
def test_inner_steps_lower_the_inner_loss(generation, loss):
    """A few SGD steps on the generated parameters lower the configured unsupervised loss of every task."""
    hypernet = make_hypernet(generation=generation)
    inputs = random_inputs(T)
    cfg = dataclasses.replace(ADAPT, inner_loss=loss, inner_lr=0.1)
    result = adapt(hypernet, inputs, cfg, num_steps=5)
    reference = hypernet.prepare(inputs.features).z
    before, after = inner_loss(result.logits[0], reference, cfg), inner_loss(result.logits[-1], reference, cfg)
    assert before.shape == (T,) and torch.all(after < before)
    assert len(result.inner_losses) == 5
    torch.testing.assert_close(result.inner_losses[0], before.mean())


def test_test_time_adaptation_leaves_the_hypernet_unchanged():
    """Even when the inner loop updates every hypernetwork weight, it works on copies."""
    hypernet = make_hypernet()
    before = {k: v.clone() for k, v in hypernet.state_dict().items()}
    predict_task(hypernet, random_inputs(T), dataclasses.replace(ADAPT, adapt_params="hypernet", inner_lr=HYPERNET_LR))
    predict_task(hypernet, random_inputs(T), ADAPT)
    for key, value in hypernet.state_dict().items():
        assert torch.equal(value, before[key]), key


def _update_size(hypernet: HyperNet, inputs: TaskInputs, create_graph: bool) -> torch.Tensor:
    """Squared size of the inner update alone: adapted minus generated parameters."""
    result = adapt(hypernet, inputs, ADAPT, create_graph=create_graph)
    state = hypernet.prepare(inputs.as_batch().features)
    generated = hypernet(inputs.as_batch().context, state)
    return sum(((result.params[k] - generated[k]) ** 2).sum() for k in ("log_tau", "prototypes"))


def test_gradients_reach_the_hypernet_through_the_inner_loop():
    """With create_graph=True the inner steps stay in the graph: the update itself has a gradient w.r.t. the
    hypernetwork (second order), and the outer loss reaches both generated heads and, through them, the encoder."""
    hypernet = make_hypernet()
    inputs, labels = blob_inputs(T, seed=2, spread=2.0)
    update = _update_size(hypernet, inputs, create_graph=True)
    grads = torch.autograd.grad(update, list(hypernet.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    with torch.no_grad():  # the heads start at zero weight (the configured tau and alpha): move them off zero
        for head in (hypernet.generator.log_tau, hypernet.generator.alpha_logit):
            head.weight.normal_(std=0.1)
    result = adapt(hypernet, inputs, ADAPT, create_graph=True)
    aligned_cross_entropy(result.logits[-1], labels).backward()
    grads = {name: p.grad for name, p in hypernet.named_parameters()}
    for prefix in ("encoder.", "generator.log_tau.", "generator.alpha_logit."):
        total = sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith(prefix) and g is not None)
        assert total > 0, prefix


def test_no_graph_is_kept_at_test_time():
    """create_graph=False: the adapted parameters and the logits are cut from the hypernetwork."""
    hypernet = make_hypernet()
    inputs, _ = blob_inputs(T, seed=2, spread=2.0)
    result = adapt(hypernet, inputs, ADAPT, create_graph=False)
    assert all(v.grad_fn is None for v in result.params.values())
    assert all(not logits.requires_grad for logits in result.logits)
    adapted = sum(v.sum() for v in result.params.values())
    grads = torch.autograd.grad(adapted, list(hypernet.parameters()), allow_unused=True)
    assert all(g is None for g in grads)


def test_hypernet_mode_keeps_a_finite_second_order_graph():
    """adapt_params='hypernet' (the prototype's): the outer loss has finite, non-zero gradients."""
    hypernet = make_hypernet(generation="full")
    inputs, labels = blob_inputs(T, seed=3, spread=2.0)
    cfg = dataclasses.replace(ADAPT, adapt_params="hypernet", inner_lr=HYPERNET_LR)
    result = adapt(hypernet, inputs, cfg, create_graph=True)
    aligned_cross_entropy(result.logits[-1], labels).backward()
    grads = [p.grad for p in hypernet.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_predict_clusters_is_the_argmax_after_every_step():
    """Cluster ids (S+1, N) are the argmax of the logits after 0..S steps."""
    hypernet = make_hypernet()
    inputs = random_inputs()
    clusters = predict_clusters(hypernet, inputs, ADAPT)
    assert clusters.shape == (STEPS + 1, N) and clusters.dtype.kind == "i"
    np.testing.assert_array_equal(clusters, predict_task(hypernet, inputs, ADAPT).argmax(-1).numpy())
    assert clusters.min() >= 0 and clusters.max() < K


# ----------------------------------------------------------------------------------------- inner losses

def _onehot_logits(assignments: list[int], scale: float = 20.0) -> torch.Tensor:
    return scale * F.one_hot(torch.tensor(assignments), K).float()


def test_entropy_of_uniform_logits_is_log_k_and_confidence_lowers_it():
    """TENT's entropy: log K for uniform predictions, ~0 for confident ones, balanced or not."""
    confident, collapsed, uniform = _onehot_logits([0, 1, 2] * 4), _onehot_logits([0] * 12), torch.zeros(12, K)
    torch.testing.assert_close(entropy_loss(uniform), torch.log(torch.tensor(float(K))))
    assert entropy_loss(confident) < 1e-6
    torch.testing.assert_close(entropy_loss(confident), entropy_loss(collapsed))
    assert entropy_loss(torch.zeros(T, 12, K)).shape == (T,)


def test_infomax_balance_term():
    """Infomax = entropy - w * entropy of the mean prediction: -w log K when balanced and confident, 0 collapsed."""
    balanced, collapsed, uniform = _onehot_logits([0, 1, 2] * 4), _onehot_logits([0] * 12), torch.zeros(12, K)
    log_k = torch.log(torch.tensor(float(K)))
    torch.testing.assert_close(infomax_loss(balanced), -log_k, atol=1e-3, rtol=0)
    torch.testing.assert_close(infomax_loss(balanced, balance_weight=2.5), -2.5 * log_k, atol=1e-3, rtol=0)
    torch.testing.assert_close(infomax_loss(collapsed), torch.tensor(0.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(infomax_loss(uniform), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(infomax_loss(collapsed, balance_weight=0.0), entropy_loss(collapsed))
    assert infomax_loss(balanced) < infomax_loss(collapsed) and infomax_loss(balanced) < infomax_loss(uniform)


def test_geometry_is_zero_when_geometries_match():
    """The prototype's geometry loss compares pairwise cosine distances of outputs and reference features."""
    reference = torch.randn(10, K)
    assert geometry_loss(2.5 * reference, reference).item() == pytest.approx(0.0, abs=1e-6)
    assert geometry_loss(torch.randn(10, K), reference) > 0.01
    assert geometry_loss(torch.randn(T, 10, K), torch.randn(T, 10, 4)).shape == (T,)
    other = torch.randn(10, K)
    torch.testing.assert_close(geometry_loss(other, reference, weight=2.0), 2.0 * geometry_loss(other, reference, 1.0))


def test_inner_loss_dispatches_on_the_config():
    """inner_loss reads the registry entry named by adapt.inner_loss, with its weights from the config."""
    logits, reference = torch.randn(T, 12, K), torch.randn(T, 12, 4)
    for name, expected in (("entropy", entropy_loss(logits)), ("infomax", infomax_loss(logits, 0.3)),
                           ("geometry", geometry_loss(logits, reference, 1.5))):
        cfg = AdaptConfig(inner_loss=name, balance_weight=0.3, geometry_weight=1.5)
        torch.testing.assert_close(inner_loss(logits, reference, cfg), expected)


def test_a_registered_inner_loss_is_a_valid_config_value_and_used_by_adapt(monkeypatch):
    """Adding an inner loss is one entry in INNER_LOSSES: the config accepts its name and adapt minimises it."""
    calls = []

    def max_logit(logits, reference, cfg):
        calls.append(tuple(logits.shape))
        return -logits.max(-1).values.mean(-1)

    with pytest.raises(ConfigError, match="inner_loss"):
        load_config("default", overrides={"adapt": {"inner_loss": "max_logit"}})
    monkeypatch.setitem(losses.INNER_LOSSES, "max_logit", max_logit)
    cfg = load_config("default", overrides={"adapt": {"inner_loss": "max_logit", "num_inner_steps": 2}})
    assert cfg.adapt.inner_loss == "max_logit"
    hypernet = make_hypernet()
    result = adapt(hypernet, random_inputs(T), cfg.adapt)
    assert calls == [(T, N, K)] * 2
    assert result.inner_losses[1] < result.inner_losses[0]
    torch.testing.assert_close(result.inner_losses[0], -result.logits[0].max(-1).values.mean())


# ---------------------------------------------------------------------------------- aligned outer loss

@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_alignment_matches_brute_force_over_permutations(num_classes):
    """The Hungarian-aligned cross-entropy is the lowest cross-entropy over every relabelling of the units."""
    generator = torch.Generator().manual_seed(num_classes)
    for _ in range(5):
        logits = torch.randn(30, num_classes, generator=generator) * 2
        labels = torch.randint(0, num_classes, (30,), generator=generator)
        brute = min(F.cross_entropy(logits, torch.tensor(perm)[labels]).item()
                    for perm in itertools.permutations(range(num_classes)))
        assert aligned_cross_entropy(logits, labels).item() == pytest.approx(brute, rel=1e-5)


def test_aligned_cross_entropy_is_invariant_to_permuting_output_units():
    """Shuffling the output units leaves the aligned loss unchanged; alignments are permutations."""
    logits, labels = torch.randn(T, 16, 4), torch.randint(0, 4, (T, 16))
    shuffled = logits[..., torch.tensor([2, 0, 3, 1])]
    torch.testing.assert_close(aligned_cross_entropy(shuffled, labels), aligned_cross_entropy(logits, labels))
    perm = best_alignment(logits, labels)
    assert perm.shape == (T, 4) and all(sorted(p.tolist()) == [0, 1, 2, 3] for p in perm)
    nan_logits = torch.full((1, 16, 4), float("nan"))
    assert sorted(best_alignment(nan_logits, labels[:1])[0].tolist()) == [0, 1, 2, 3]


def test_task_accuracy_matches_metrics():
    """Per-task Hungarian accuracy of the argmax equals hmlib.metrics.clustering_accuracy."""
    logits, labels = torch.randn(3, 40, 4), torch.randint(0, 4, (3, 40))
    expected = [clustering_accuracy(logits[t].argmax(-1).numpy(), labels[t].numpy(), 4) for t in range(3)]
    np.testing.assert_allclose(task_accuracy(logits, labels), expected)
    np.testing.assert_allclose(task_accuracy(logits[0], labels[0]), expected[:1])
    with pytest.raises(ValueError, match="do not match"):
        task_accuracy(logits, labels[:, :5])


def test_task_state_is_what_the_generator_reads():
    """TaskState holds the normalised features (the inner losses' reference) and the optional graph."""
    generator = GENERATORS["full"](HYPER, FEATURE_DIM, K)
    features = torch.randn(T, N, FEATURE_DIM) * 4 + 1
    state = generator.prepare(features)
    assert isinstance(state, TaskState) and state.graph is None
    torch.testing.assert_close(state.z, normalize_task(features))
