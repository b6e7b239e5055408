"""Clustering accuracy: Hungarian matching against brute force over permutations, single and batched."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from hmlib.metrics import batched_clustering_accuracy, best_matching, clustering_accuracy, confusion

NUM_TRIALS = 60
NUM_ITEMS = 40


def _brute_force(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """Best accuracy over every relabelling of the clusters (k! permutations, vectorised)."""
    perms = np.array(list(itertools.permutations(range(k))))  # (k!, k)
    return float((perms[:, pred] == true[None, :]).mean(axis=1).max())


def test_confusion_counts():
    """Rows count predicted clusters, columns true classes."""
    cm = confusion(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]  # rows predicted, columns true
    assert cm.sum() == 6


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_hungarian_equals_brute_force(k):
    """Hungarian accuracy and matching equal the best of all k! relabellings."""
    rng = np.random.default_rng(k)
    for _ in range(NUM_TRIALS):
        true = rng.integers(0, k, NUM_ITEMS)
        noisy = np.where(rng.random(NUM_ITEMS) < 0.5, true, rng.integers(0, k, NUM_ITEMS))
        pred = rng.permutation(k)[noisy]  # relabelled, partly correct clusters
        assert clustering_accuracy(pred, true, k) == pytest.approx(_brute_force(pred, true, k))
        perm = best_matching(pred, true, k)
        assert sorted(perm.tolist()) == list(range(k))  # a one-to-one matching
        assert (perm[pred] == true).mean() == pytest.approx(_brute_force(pred, true, k))


def test_relabelled_perfect_clustering_scores_one():
    """A perfect clustering under other cluster ids scores 1 and recovers the relabelling."""
    true = np.repeat(np.arange(4), 5)
    assert clustering_accuracy(np.array([2, 0, 3, 1])[true], true, 4) == 1.0
    assert best_matching(np.array([2, 0, 3, 1])[true], true, 4).tolist() == [1, 3, 0, 2]


def test_matching_is_one_to_one_not_greedy():
    """Two clusters cannot both map to one class."""
    # greedy (each cluster to its majority class) would map both clusters to class 0 and score 1.0
    pred = np.array([0, 0, 0, 1, 1])
    true = np.array([0, 0, 1, 0, 0])
    assert clustering_accuracy(pred, true, 2) == pytest.approx(3 / 5)


def test_num_classes_is_inferred_and_shapes_checked():
    """K defaults to the largest id + 1; arrays of different shapes are refused."""
    assert clustering_accuracy(np.array([1, 1, 0]), np.array([0, 0, 2])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        clustering_accuracy(np.zeros(3, int), np.zeros(4, int))


def test_batched_clustering_accuracy_matches_one_task_at_a_time():
    """The batched accuracy of many tasks equals the per-task accuracy."""
    rng = np.random.default_rng(3)
    pred, true = rng.integers(0, 4, (7, 30)), rng.integers(0, 4, (7, 30))
    expected = [clustering_accuracy(p, t, 4) for p, t in zip(pred, true)]
    np.testing.assert_allclose(batched_clustering_accuracy(pred, true, 4), expected)
    np.testing.assert_allclose(batched_clustering_accuracy(true[:2], true[:2], 4), [1.0, 1.0])
