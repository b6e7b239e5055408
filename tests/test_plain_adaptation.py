"""Test-time adaptation without meta-learning (the baseline a meta-learned adaptation has to beat): both
normalisation modes, the Adam steps on the normalisation layers, the label-free choice by silhouette, and its
registered rows (``adabn_kmeans``, ``plain_task``, ``plain_running``, ``plain_choice``)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_score

from datafactory import class_patterns
from hmlib.backbone.model import ConvBackbone, batch_statistics
from hmlib.data import TaskBatch
from hmlib.evaluation import methods
from hmlib.evaluation import plain_adaptation as plain
from hmlib.evaluation.methods import METHODS, MethodContext, kmeans_clusters, score
from hmlib.metrics import clustering_accuracy
from tinyprotocol import tiny_config

T, N, K, STEPS, LR = 3, 12, 3, 4, 0.05


@pytest.fixture(scope="module")
def backbone() -> ConvBackbone:
    """A small backbone whose stored running statistics differ from any task's own (eval mode)."""
    torch.manual_seed(0)
    model = ConvBackbone((4, 8), 8, 5)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model.embed(torch.rand(64, 1, 28, 28) * 0.3)  # darker than the tasks: other statistics
    return model.eval()


def task_images(num_tasks: int = T, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (T, N, 28, 28) bar images of K orientations and their labels (T, N)."""
    labels = np.tile(np.arange(K), (num_tasks, N // K))
    return np.stack([class_patterns(row, K, seed=seed + t) for t, row in enumerate(labels)]), labels


def reference_embeddings(backbone: ConvBackbone, images: np.ndarray, task_statistics: bool) -> np.ndarray:
    """Each task through the plain backbone, normalised by its stored statistics or by the task's own batch."""
    x = torch.as_tensor(images).unsqueeze(2).float() / 255.0
    with torch.no_grad():
        if task_statistics:
            with batch_statistics(backbone):
                z = torch.stack([backbone.embed(task) for task in x])
        else:
            z = torch.stack([backbone.embed(task) for task in x])
    return plain.task_embedding(z).numpy()


@pytest.mark.parametrize("blend, task_statistics", [(0.0, False), (1.0, True)])
def test_zero_steps_are_the_backbone_under_either_normalisation(backbone, blend, task_statistics):
    """blend 0 is the backbone with its stored statistics; blend 1 is each task's own batch statistics (AdaBN)."""
    images, _ = task_images()
    adapted = plain.adapt_tasks(backbone, torch.as_tensor(images), K, blend=blend, steps=0, lr=LR)
    assert adapted.embeddings.shape == (T, N, backbone.embed_dim) and adapted.blend == blend
    np.testing.assert_allclose(np.linalg.norm(adapted.embeddings, axis=-1), 1.0, atol=1e-5)  # L2 per image
    np.testing.assert_allclose(adapted.embeddings, reference_embeddings(backbone, images, task_statistics), atol=1e-5)
    other = reference_embeddings(backbone, images, not task_statistics)
    assert np.abs(adapted.embeddings - other).max() > 1e-2  # the two modes really differ on these tasks


def test_steps_move_the_embedding_and_leave_the_backbone_as_it_was(backbone):
    """Adam steps on the normalisation layers change each task's embedding; the backbone's own weights and
    requires_grad flags are untouched (every task adapts its own copy of the scale and shift)."""
    images, _ = task_images()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    flags = [p.requires_grad for p in backbone.parameters()]
    start = plain.adapt_tasks(backbone, torch.as_tensor(images), K, blend=1.0, steps=0, lr=LR).embeddings
    moved = plain.adapt_tasks(backbone, torch.as_tensor(images), K, blend=1.0, steps=STEPS, lr=LR).embeddings
    assert np.abs(moved - start).max() > 1e-2
    tiny = plain.adapt_tasks(backbone, torch.as_tensor(images), K, blend=1.0, steps=STEPS, lr=1e-9).embeddings
    np.testing.assert_allclose(tiny, start, atol=1e-5)  # a vanishing step size moves nothing
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [p.requires_grad for p in backbone.parameters()] == flags and not backbone.training


@pytest.mark.parametrize("blend", [0.0, 1.0])
def test_batched_tasks_adapt_exactly_as_one_at_a_time(backbone, blend):
    """Tasks are processed in chunks for speed; each task's result does not depend on the others or the chunk."""
    images, _ = task_images(4, seed=5)
    x = torch.as_tensor(images)
    batched = plain.adapt_tasks(backbone, x, K, blend=blend, steps=STEPS, lr=LR).embeddings
    one_at_a_time = np.concatenate([plain.adapt_tasks(backbone, x[t:t + 1], K, blend=blend, steps=STEPS,
                                                      lr=LR).embeddings for t in range(len(x))])
    chunked = plain.adapt_tasks(backbone, x, K, blend=blend, steps=STEPS, lr=LR, chunk=3).embeddings
    np.testing.assert_allclose(batched, one_at_a_time, atol=1e-6)
    np.testing.assert_allclose(batched, chunked, atol=1e-6)


def test_silhouettes_are_sklearns_per_task_and_minus_one_for_a_single_cluster():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 20, 3))
    clusters = np.stack([np.arange(20) % 2, np.zeros(20, dtype=int)])
    out = plain.silhouettes(z, clusters)
    assert out[0] == pytest.approx(silhouette_score(z[0], clusters[0])) and out[1] == -1.0


def test_the_choice_takes_per_task_the_mode_with_the_higher_silhouette_not_the_higher_accuracy():
    """Constructed: task 0's better silhouette is the worse mode (label-free: accuracy is never looked at)."""
    acc = np.array([[0.9, 0.2, 0.6], [0.5, 0.7, 0.6]])  # (modes, tasks): task, running
    silhouette = np.array([[0.1, 0.3, 0.4], [0.2, 0.1, -1.0]])
    np.testing.assert_array_equal(plain.choose_by_silhouette(acc, silhouette), [0.5, 0.2, 0.6])


def suite_context(backbone: ConvBackbone, cfg=None) -> MethodContext:
    """A context over T tasks of pattern images: inputs with the images and the backbone, and a suite."""
    images, labels = task_images()
    flat = images.reshape(-1, 28, 28)
    suite = TaskBatch(np.arange(T * N).reshape(T, N), labels, np.tile(np.arange(K), (T, 1)))
    inputs = SimpleNamespace(images=flat, backbone=backbone, reps={})
    return MethodContext(cfg or tiny_config(eval={"plain_steps": STEPS, "plain_lr": LR}), inputs, suite, seed=0)


def test_the_registered_rows_score_each_mode_and_the_silhouette_choice(backbone, monkeypatch):
    """plain_task / plain_running are k-means on each mode's adapted embedding; plain_choice keeps, per task, the
    mode with the higher silhouette; both modes are adapted once per suite for all three rows."""
    calls = []
    adapt = plain.adapt_tasks
    monkeypatch.setattr(plain, "adapt_tasks", lambda *a, **kw: calls.append(kw["blend"]) or adapt(*a, **kw))
    ctx = suite_context(backbone)
    rows = {name: score(METHODS[name], ctx)[0] for name in ("plain_task", "plain_running", "plain_choice")}
    assert sorted(calls) == [0.0, 1.0]  # one adaptation per mode, shared through the context's memo
    images = torch.as_tensor(ctx.inputs.images[ctx.suite.indices])
    for name, blend in (("plain_task", 1.0), ("plain_running", 0.0)):
        z = adapt(backbone, images, K, blend=blend, steps=STEPS, lr=LR).embeddings
        clusters = np.stack([kmeans_clusters(z[t], K, t, ctx.cfg.eval.kmeans_n_init) for t in range(T)])
        expected = [clustering_accuracy(c, y, K) for c, y in zip(clusters, ctx.labels)]
        np.testing.assert_array_equal(rows[name], expected)
        np.testing.assert_array_equal(ctx.memo["plain"]["task" if blend else "running"]["silhouette"],
                                      plain.silhouettes(z, clusters))
    modes = ctx.memo["plain"]
    pick = np.where(modes["task"]["silhouette"] >= modes["running"]["silhouette"], rows["plain_task"],
                    rows["plain_running"])
    np.testing.assert_array_equal(rows["plain_choice"], pick)
    assert all(METHODS[n].adapts and not METHODS[n].supervised for n in ("adabn_kmeans", *rows))


def test_adabn_kmeans_is_kmeans_on_the_task_statistics_embedding(backbone):
    ctx = suite_context(backbone)
    acc, seconds = score(METHODS["adabn_kmeans"], ctx)
    z = reference_embeddings(backbone, ctx.inputs.images[ctx.suite.indices], task_statistics=True)
    expected = [clustering_accuracy(kmeans_clusters(z[t], K, t, ctx.cfg.eval.kmeans_n_init), y, K)
                for t, y in enumerate(ctx.labels)]
    np.testing.assert_allclose(acc, expected)
    assert acc.shape == (T,) and seconds > 0
    assert methods.adabn_embeddings(ctx) is ctx.memo["adabn"]  # computed once per suite
