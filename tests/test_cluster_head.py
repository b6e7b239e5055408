"""The cluster head (hyper.generation='cluster'): shapes, k-means before adaptation, gradients, adapt contract."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from hmlib.adapt import adapt, aligned_cross_entropy, predict_task, task_accuracy
from hmlib.config import AdaptConfig, HyperConfig
from hmlib.hypernet import HyperNet, TaskInputs, kmeans_prototypes, normalize_task, target_forward

LATENT_DIM, K, N = 6, 3, 60
CFG = HyperConfig(generation="cluster", target_hidden=(8,), embed_dim=16, head_hidden=16, num_seeds=2, num_heads=2)


def _blobs(num_tasks: int | None = None, seed: int = 0, spread: float = 0.1):
    """K well-separated Gaussian blobs in mu (logvar constant noise), labels in blocks."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if num_tasks is None else (num_tasks,)
    centers = 4.0 * torch.randn(*lead, K, LATENT_DIM, generator=gen)
    labels = torch.arange(N) % K
    mu = centers[..., labels, :] + spread * torch.randn(*lead, N, LATENT_DIM, generator=gen)
    logvar = -2.0 + 0.01 * torch.randn(*lead, N, LATENT_DIM, generator=gen)
    return TaskInputs(mu, logvar), labels.expand(*lead, N)


def test_shapes_single_and_batched():
    hypernet = HyperNet(CFG, LATENT_DIM, K)
    inputs, _ = _blobs()
    params = hypernet(hypernet.context(inputs))
    assert {k: tuple(v.shape) for k, v in params.items()} == hypernet.target_shapes
    assert target_forward(params, hypernet.target_features(inputs)).shape == (N, K)
    batch, _ = _blobs(num_tasks=3)
    batched = hypernet(hypernet.context(batch))
    assert batched["prototypes"].shape == (3, K, 2 * LATENT_DIM)
    for t in range(3):  # the fixed-generator seeding gives the same prototypes batched or one at a time
        single = hypernet(hypernet.context(TaskInputs(batch.mu[t], batch.logvar[t])))
        for key in single:
            torch.testing.assert_close(batched[key][t], single[key], atol=1e-5, rtol=1e-4)
    logits = predict_task(hypernet, inputs, AdaptConfig(num_inner_steps=2))
    assert logits.shape == (3, N, K) and torch.isfinite(logits).all()
    assert predict_task(hypernet, batch, AdaptConfig(num_inner_steps=2)).shape == (3, 3, N, K)
    assert hypernet.last_layer_keys == ("prototypes", "log_tau")


def test_zero_steps_is_kmeans_on_separable_blobs():
    hypernet = HyperNet(CFG, LATENT_DIM, K)  # untrained: the embedding is the identity
    inputs, labels = _blobs(num_tasks=4, seed=1)
    logits = predict_task(hypernet, inputs, AdaptConfig(num_inner_steps=0))[0]
    assert np.all(task_accuracy(logits, labels) == 1.0)
    # the prediction is the nearest-centroid assignment of k-means on the normalised rows
    feats = normalize_task(inputs.rows)
    centers = kmeans_prototypes(feats, K, iters=5, inits=4)
    nearest = ((feats.unsqueeze(-2) - centers.unsqueeze(-3)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(logits.argmax(-1), nearest)
    # and the centroids are the per-cluster means of the points
    for t in range(4):
        for k in range(K):
            torch.testing.assert_close(centers[t, k], feats[t][nearest[t] == k].mean(0), atol=1e-5, rtol=1e-5)


def test_identity_embedding_at_init():
    hypernet = HyperNet(CFG, LATENT_DIM, K)
    inputs, _ = _blobs()
    params = hypernet(hypernet.context(inputs))
    from hmlib.hypernet import cluster_embed
    feats = hypernet.target_features(inputs)
    # zero base residual branch; the generated offset starts small (head init std 0.01): g ~ identity
    torch.testing.assert_close(cluster_embed(params, feats), feats, atol=0.05, rtol=0)


def test_gradients_reach_the_hypernet_through_the_inner_loop():
    torch.manual_seed(0)
    hypernet = HyperNet(CFG, LATENT_DIM, K)
    inputs, labels = _blobs(num_tasks=2, seed=2, spread=2.0)
    result = adapt(hypernet, inputs, AdaptConfig(num_inner_steps=2), create_graph=True)
    loss = aligned_cross_entropy(result.logits[-1], labels)
    loss.backward()
    grads = {name: p.grad for name, p in hypernet.named_parameters()}
    assert grads["generator.log_tau"] is not None and grads["generator.log_tau"].abs() > 0
    # the encoder and the embedding MLP (through the k-means centroids and the inner steps) get gradients
    for prefix in ("encoder.", "generator.mlp.base.", "generator.mlp.last.", "generator.mlp.film."):
        total = sum(float(g.abs().sum()) for n, g in grads.items() if n.startswith(prefix) and g is not None)
        assert total > 0, prefix


def test_inner_loop_updates_prototypes_and_last_mode():
    hypernet = HyperNet(CFG, LATENT_DIM, K)
    inputs, _ = _blobs(spread=2.0)
    for mode in ("generated", "last"):
        cfg = AdaptConfig(num_inner_steps=2, adapt_params=mode)
        result = adapt(hypernet, inputs, cfg)
        start = hypernet(hypernet.context(inputs))
        assert not torch.allclose(result.target_params["prototypes"], start["prototypes"])
        if mode == "last":
            torch.testing.assert_close(result.target_params["layers.0.weight"], start["layers.0.weight"])


def test_config_accepts_cluster_and_rejects_pixels():
    from hmlib.config import load_config
    assert load_config("smoke", overrides={"hyper": {"generation": "cluster"}}).hyper.generation == "cluster"
    import pytest
    with pytest.raises(ValueError, match="cluster"):
        HyperNet(dataclasses.replace(CFG, target_input="latent+pixels"), LATENT_DIM, K)
