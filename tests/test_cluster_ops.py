"""Clustering operations on batches of tasks: nearest neighbours, differentiable k-means, cluster scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hmlib.features import normalize_task
from hmlib.hyper import cluster_ops
from hmlib.hyper.cluster_ops import (class_centroid_logits, cosine_logits, gather_rows, kmeans_prototypes,
                                     nearest_neighbours)
from hmlib.metrics import clustering_accuracy

# Tiny sizes
T, N, E, K = 3, 24, 5, 3
NEIGHBOURS = 4


def rows(num_tasks: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_tasks, N, E, generator=torch.Generator().manual_seed(seed))


def blobs(num_tasks: int, seed: int = 0, spread: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """K well-separated Gaussian blobs per task, (T, N, E), and their labels (T, N), interleaved."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(N) % K
    centres = 4.0 * torch.randn(num_tasks, K, E, generator=gen)
    return centres[:, labels] + spread * torch.randn(num_tasks, N, E, generator=gen), labels.expand(num_tasks, N)


def inertia(h: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Sum of squared distances of each task's rows to their nearest centre, (T,)."""
    return ((h.unsqueeze(-2) - centres.unsqueeze(-3)) ** 2).sum(-1).min(-1).values.sum(-1)


def test_nearest_neighbours_are_the_most_cosine_similar_other_rows():
    """(T, N, k) indices of the k most cosine-similar rows other than the row itself, whatever each row's length."""
    z = rows()
    index = nearest_neighbours(z, NEIGHBOURS)
    assert index.shape == (T, N, NEIGHBOURS) and not index.requires_grad
    unit = F.normalize(z, dim=-1)
    for t in range(T):
        sim = unit[t] @ unit[t].T
        for i in range(N):
            others = [j for j in range(N) if j != i]
            expected = sorted(others, key=lambda j: -float(sim[i, j]))[:NEIGHBOURS]
            assert index[t, i].tolist() == expected
    scaled = z * torch.rand(T, N, 1, generator=torch.Generator().manual_seed(1)).add(0.5)
    assert torch.equal(nearest_neighbours(scaled, NEIGHBOURS), index)
    small = nearest_neighbours(z[:, :4], 10)  # more neighbours asked than there are other rows: all of them
    assert small.shape == (T, 4, 3)
    assert all(sorted(small[t, i].tolist()) == [j for j in range(4) if j != i] for t in range(T) for i in range(4))


def test_gather_rows_picks_each_tasks_own_rows():
    """values[t, index[t, i, j]] for every task, image and neighbour, with any trailing shape."""
    values = torch.randn(T, N, 2, 3)
    index = torch.randint(0, N, (T, N, NEIGHBOURS), generator=torch.Generator().manual_seed(2))
    picked = gather_rows(values, index)
    assert picked.shape == (T, N, NEIGHBOURS, 2, 3)
    for t in range(T):
        for i in range(N):
            for j in range(NEIGHBOURS):
                assert torch.equal(picked[t, i, j], values[t, index[t, i, j]])
    flat = torch.randn(T, N)
    assert torch.equal(gather_rows(flat, index)[1, 5], flat[1, index[1, 5]])


def test_prototypes_are_the_means_of_their_clusters():
    """Each k-means centroid is the mean of the rows nearest to it; separable blobs are recovered exactly."""
    features, labels = blobs(4, seed=1)
    h = normalize_task(features, l2=True)
    centres = kmeans_prototypes(h, K, iters=5, inits=4)
    assert centres.shape == (4, K, E)
    nearest = ((h.unsqueeze(-2) - centres.unsqueeze(-3)) ** 2).sum(-1).argmin(-1)
    for t in range(4):
        assert clustering_accuracy(nearest[t].numpy(), labels[t].numpy(), K) == 1.0
        for k in range(K):
            torch.testing.assert_close(centres[t, k], h[t][nearest[t] == k].mean(0), atol=1e-5, rtol=1e-5)


def test_kmeans_prototypes_are_deterministic_batch_independent_and_differentiable():
    """Seeded k-means++: the same rows give the same centroids, alone or in a batch; gradients reach the rows."""
    h = rows().requires_grad_(True)
    centres = kmeans_prototypes(h, K, iters=3, inits=2)
    assert torch.equal(kmeans_prototypes(h, K, iters=3, inits=2), centres)
    for t in range(T):
        torch.testing.assert_close(kmeans_prototypes(h[t:t + 1], K, iters=3, inits=2)[0], centres[t])
    centres.pow(2).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert not torch.equal(kmeans_prototypes(h, K, iters=3, inits=2, seed=1), centres)  # the seed is the seeding's


def test_squared_distances_from_rows_computed_once_are_the_same():
    """k-means reads each row's squared norm and doubled row once for all its distances (_sq_dist's ``rows``): the
    same distances to the last bit as computing them in every call, and they are the squared distances."""
    h, centres = rows(), rows(seed=1)[:, :K]
    direct = cluster_ops._sq_dist(h, centres)
    assert torch.equal(cluster_ops._sq_dist(h, centres, ((h * h).sum(-1, keepdim=True), 2 * h)), direct)
    torch.testing.assert_close(direct, ((h.unsqueeze(-2) - centres.unsqueeze(-3)) ** 2).sum(-1), atol=1e-4,
                               rtol=1e-4)


def test_the_seeding_with_the_lowest_inertia_wins():
    """More k-means++ seedings never give a worse clustering: the first seedings are the same, the best is kept."""
    h = torch.randn(20, 30, E, generator=torch.Generator().manual_seed(3))
    one = inertia(h, kmeans_prototypes(h, 4, iters=10, inits=1))
    several = inertia(h, kmeans_prototypes(h, 4, iters=10, inits=6))
    assert torch.all(several <= one + 1e-5) and torch.any(several < one - 1e-3)


def test_kmeans_on_identical_rows_is_finite():
    """Rows that cannot fill K clusters (all identical) give finite centroids at the rows (empty clusters keep their
    seed), never NaN."""
    same = torch.ones(2, 6, E)
    centres = kmeans_prototypes(same, K, iters=3, inits=2)
    assert torch.isfinite(centres).all()
    torch.testing.assert_close(centres, torch.ones(2, K, E))


def test_cosine_logits_are_the_temperature_times_cosine_similarity():
    """Logits (T, N, K) = exp(log_tau) * cos(row, prototype): one temperature per task, bounded by it, blind to
    the lengths of rows and prototypes."""
    z, prototypes = rows(), torch.randn(T, K, E)
    log_tau = torch.log(torch.tensor([[1.0], [5.0], [10.0]]))
    logits = cosine_logits(z, prototypes, log_tau)
    cos = F.cosine_similarity(z.unsqueeze(-2), prototypes.unsqueeze(-3), dim=-1)
    assert logits.shape == (T, N, K)
    torch.testing.assert_close(logits, log_tau.exp().view(T, 1, 1) * cos, atol=1e-5, rtol=1e-5)
    assert torch.all(logits.abs() <= log_tau.exp().view(T, 1, 1) + 1e-4)
    torch.testing.assert_close(cosine_logits(3.0 * z, 0.2 * prototypes, log_tau), logits, atol=1e-5, rtol=1e-5)


def test_class_centroid_logits_score_rows_against_their_tasks_class_means():
    """The outer loss's view: cosine logits against the mean of each true class of the task; on separable blobs
    every row is closest to its own class's centroid."""
    features, labels = blobs(2, seed=4)
    log_tau = torch.zeros(2, 1)
    logits = class_centroid_logits(features, labels, K, log_tau)
    centroids = torch.stack([torch.stack([features[t][labels[t] == k].mean(0) for k in range(K)]) for t in range(2)])
    torch.testing.assert_close(logits, cosine_logits(features, centroids, log_tau), atol=1e-5, rtol=1e-5)
    assert torch.equal(logits.argmax(-1), labels)
    missing = class_centroid_logits(features, torch.zeros_like(labels), K, log_tau)  # classes with no rows: finite
    assert torch.isfinite(missing).all()

