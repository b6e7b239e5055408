"""Task sampling (balance, remapping, determinism, both modes, errors) and stratified splits."""
from __future__ import annotations

import numpy as np
import pytest

from hmlib.data import DatasetError, TaskSampler, sample_tasks, stratified_split, stratified_subset

# Uneven class sizes: small classes use the sort-keys path, large ones the redraw-duplicates path.
COUNTS = [40, 300, 17, 55, 1000, 23, 90, 64, 31, 120]
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))
K, N, T = 4, 64, 200


def test_shapes_balance_and_remapping():
    tasks = sample_tasks(LABELS, T, K, N, seed=1)
    assert tasks.indices.shape == (T, N) and tasks.labels.shape == (T, N) and tasks.classes.shape == (T, K)
    assert tasks.indices.dtype == tasks.labels.dtype == tasks.classes.dtype == np.int64
    np.testing.assert_array_equal(LABELS[tasks.indices], np.take_along_axis(tasks.classes, tasks.labels, axis=1))
    per_class = np.stack([(tasks.labels == j).sum(axis=1) for j in range(K)], axis=1)
    assert (per_class == N // K).all()
    assert all(len(set(row)) == K for row in tasks.classes.tolist())  # K distinct classes
    assert all(len(np.unique(row)) == N for row in tasks.indices)  # no image twice in a task


def test_remainder_spread_over_classes():
    tasks = sample_tasks(LABELS, T, K, 66, seed=2)  # 66 = 4 * 16 + 2
    per_class = np.stack([(tasks.labels == j).sum(axis=1) for j in range(K)], axis=1)
    assert (per_class.sum(axis=1) == 66).all() and set(per_class.ravel().tolist()) == {16, 17}
    assert ((per_class == 17).sum(axis=1) == 2).all()
    assert len(set(map(tuple, per_class.tolist()))) > 1  # which classes get the extra varies


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = (sample_tasks(LABELS, 50, K, N, seed=s) for s in (7, 7, 8))
    for field in ("indices", "labels", "classes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.indices, c.indices)


def test_random_mode_covers_classes_and_images_evenly():
    labels = np.repeat(np.arange(6), 20)  # 6 classes of 20: every image should be drawn about equally
    tasks = sample_tasks(labels, 3000, 3, 30, seed=3)
    class_freq = np.bincount(tasks.classes.ravel(), minlength=6) / tasks.classes.size
    assert np.abs(class_freq - 1 / 6).max() < 0.02
    image_freq = np.bincount(tasks.indices.ravel(), minlength=labels.size)
    assert image_freq.min() > 0.85 * image_freq.mean() and image_freq.max() < 1.15 * image_freq.mean()


def test_large_classes_sampled_uniformly_by_redraws():
    labels = np.repeat(np.arange(4), 500)
    sampler = TaskSampler(labels, 4, 64)
    freq = np.bincount(sampler.sample(2000, np.random.default_rng(4)).indices.ravel(), minlength=2000)
    assert abs(freq.mean() - 64) < 1e-9 and freq.std() < 12  # binomial-like spread around 64 (sd 7.9)


def test_consecutive_mode_uses_fixed_groups_and_drops_the_remainder():
    tasks = sample_tasks(LABELS, 6, K, N, mode="consecutive", seed=5)
    np.testing.assert_array_equal(tasks.classes, [[0, 1, 2, 3], [4, 5, 6, 7]] * 3)  # 10 classes: 8, 9 dropped
    np.testing.assert_array_equal(LABELS[tasks.indices], np.take_along_axis(tasks.classes, tasks.labels, axis=1))


def test_consecutive_groups_follow_sorted_class_ids():
    labels = np.repeat(np.array([3, 7, 11, 20, 21]), 10)
    tasks = sample_tasks(labels, 2, 2, 8, mode="consecutive")
    np.testing.assert_array_equal(tasks.classes, [[3, 7], [11, 20]])


def test_errors_for_too_many_classes_or_images():
    with pytest.raises(DatasetError, match="needs 11 classes.*only 10"):
        TaskSampler(LABELS, 11, 64)
    with pytest.raises(DatasetError, match="up to 18 images per class.*class 2 holds only 17"):
        TaskSampler(LABELS, 4, 72)
    TaskSampler(LABELS, 4, 68)  # 17 per class fits exactly
    with pytest.raises(ValueError, match="mode"):
        TaskSampler(LABELS, 4, 64, mode="sequential")
    with pytest.raises(ValueError, match="1-D integer"):
        TaskSampler(LABELS.astype(float), 4, 64)


def test_task_batch_slicing():
    tasks = sample_tasks(LABELS, 5, K, N)
    assert tasks[2].indices.shape == (1, N) and len(tasks[1:4]) == 3


def test_stratified_split_is_disjoint_complete_stratified_and_seeded():
    keep, held = stratified_split(LABELS, 0.2, seed=0)
    assert np.intersect1d(keep, held).size == 0 and np.union1d(keep, held).size == LABELS.size
    held_counts = np.bincount(LABELS[held], minlength=len(COUNTS))
    np.testing.assert_array_equal(held_counts, np.floor(np.array(COUNTS) * 0.2 + 0.5))
    again_keep, again_held = stratified_split(LABELS, 0.2, seed=0)
    np.testing.assert_array_equal(held, again_held)
    assert not np.array_equal(held, stratified_split(LABELS, 0.2, seed=1)[1])
    tiny = np.array([0, 0, 1, 1, 1, 2])  # each class of >= 2 keeps one and holds one; a singleton is kept
    keep, held = stratified_split(tiny, 0.9, seed=0)
    assert sorted(tiny[held].tolist()) == [0, 1, 1] and 2 in tiny[keep]
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(LABELS, 1.0, seed=0)


def test_stratified_subset_keeps_proportions():
    subset = stratified_subset(LABELS, 174, seed=0)
    assert subset.size == 174 and np.all(np.diff(subset) > 0)
    counts = np.bincount(LABELS[subset], minlength=len(COUNTS))
    assert np.abs(counts - np.array(COUNTS) * 174 / LABELS.size).max() < 1
    np.testing.assert_array_equal(subset, stratified_subset(LABELS, 174, seed=0))
    np.testing.assert_array_equal(stratified_subset(LABELS, 10**6, seed=0), np.arange(LABELS.size))


def test_small_class_draws_in_chunks_stay_distinct_and_in_range():
    counts = np.array([5, 9, 7, 12] * 10)
    draws = TaskSampler._by_keys(counts, 5, np.random.default_rng(0), max_keys=30)  # 2 rows per chunk
    assert all(len(set(row)) == 5 for row in draws.tolist())
    assert (draws < counts[:, None]).all() and (draws >= 0).all()


def test_fit_task_size_caps_at_what_the_smallest_class_holds():
    from hmlib.data import fit_task_size

    labels = np.repeat(np.arange(5), [30, 30, 12, 30, 30])
    assert fit_task_size(labels, 4, 256) == 48  # 4 classes x the smallest class's 12 images
    assert fit_task_size(labels, 4, 40) == 40
    with pytest.raises(DatasetError, match="fewer than the 6"):
        fit_task_size(labels, 6, 64)
