"""The evaluation grid: conditions (held-out dataset, clean or shifted, x task shape) and their seeded suites."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hmlib.data import load_split
from hmlib.evaluation.conditions import Condition, build_suite, grid, suite_fingerprint, suite_for, suite_seed
from tinyprotocol import K, N, TASKS, tiny_config

PER_CLASS = 10  # test images per class of every tiny-mirror dataset (60 images, 6 classes)


def test_a_condition_names_its_dataset_shift_and_shape():
    clean, shifted = Condition("mnist", 4, 256, 256), Condition("mnist+rotate", 10, 500, 120)
    assert (clean.key, clean.base, clean.shift, clean.size) == ("mnist_K4_N256", "mnist", "clean", 256)
    assert (shifted.key, shifted.base, shifted.shift, shifted.size) == ("mnist+rotate_K10_N500", "mnist", "rotate", 120)
    assert clean.label == "mnist, K = 4, N = 256"
    assert shifted.label == "mnist+rotate, K = 10, N = 120 (N = 120: the smallest class)"
    assert Condition("mnist", 2, 64).size == 64  # not fitted yet: N as asked


def test_grid_skips_shapes_with_more_classes_than_the_dataset_and_fits_n(tiny_mirror, capsys):
    """Dataset-major order; K > classes is skipped with a note; N is lowered to what the smallest class allows."""
    cfg = tiny_config()
    shapes = [(3, 18), (10, 40), (4, 64), (2, 8)]
    conditions = grid(cfg, ["mnist", "mnist+rotate"], shapes)
    assert [c.key for c in conditions] == ["mnist_K3_N18", "mnist_K4_N64", "mnist_K2_N8", "mnist+rotate_K3_N18",
                                           "mnist+rotate_K4_N64", "mnist+rotate_K2_N8"]
    assert [c.size for c in conditions[:3]] == [18, 4 * PER_CLASS, 8]
    assert "(N = 40: the smallest class)" in conditions[1].label
    notes = capsys.readouterr().out
    assert notes.count("the K = 10 condition is skipped") == 2 and "mnist has 6 classes" in notes
    assert grid(cfg, ["mnist"], [(10, 40)], verbose=False) == [] and capsys.readouterr().out == ""
    defaults = grid(cfg, verbose=False)  # meta.test_datasets x eval.shapes
    assert [(c.dataset, c.num_classes, c.num_images) for c in defaults] == \
        [(d, K, N) for d in cfg.meta.test_datasets]
    assert cfg.meta.test_datasets == ("mnist", "mnist+rotate")


def test_a_dataset_with_few_classes_keeps_only_the_shapes_it_can_fill(mirror, capsys):
    """The private 3-class mirror (5 test images per class): K = 4 is skipped, K = 2 at N = 64 becomes N = 10."""
    cfg = tiny_config(meta={"test_datasets": ["mnist"]})
    (condition,) = grid(cfg, ["mnist"], [(4, 64), (2, 64)])
    assert (condition.num_classes, condition.num_images, condition.fitted) == (2, 64, 10)
    assert "mnist has 3 classes; the K = 4 condition is skipped" in capsys.readouterr().out
    suite = build_suite(cfg, condition)
    assert suite.indices.shape == (cfg.eval.num_tasks, 10) and suite.classes.shape == (cfg.eval.num_tasks, 2)


def test_suites_are_seeded_by_the_base_dataset_and_the_shape(tiny_mirror):
    """Every shift of a dataset draws the same images; another shape, eval seed or base dataset draws others."""
    cfg = tiny_config()
    clean, shifted = grid(cfg, ["mnist", "mnist+rotate"], [(K, N)], verbose=False)
    suite, again, rotated = build_suite(cfg, clean), build_suite(cfg, clean), build_suite(cfg, shifted)
    for a, b in ((suite, again), (suite, rotated)):
        for field in ("indices", "labels", "classes"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert suite_seed(cfg.eval.seed, clean) == suite_seed(cfg.eval.seed, shifted)
    assert suite_fingerprint(suite) == suite_fingerprint(again) == suite_fingerprint(rotated)
    other_shape = dataclasses.replace(clean, num_classes=2, num_images=12, fitted=12)
    other_base = dataclasses.replace(clean, dataset="fashion_mnist")
    assert len({suite_seed(cfg.eval.seed, c) for c in (clean, other_shape, other_base)}) == 3
    assert suite_seed(cfg.eval.seed, clean) != suite_seed(cfg.eval.seed + 1, clean)
    reseeded = build_suite(tiny_config(eval={"seed": 99}), clean)
    assert suite_fingerprint(reseeded) != suite_fingerprint(suite)
    assert suite_fingerprint(build_suite(cfg, other_shape)) != suite_fingerprint(suite)


def test_a_suite_is_balanced_k_class_tasks_of_the_test_split(tiny_mirror):
    """Every task holds N distinct test images, N / K of each of its K classes; fewer tasks are the first ones."""
    cfg = tiny_config()
    (condition,) = grid(cfg, ["mnist"], [(K, N)], verbose=False)
    labels = load_split("mnist", "test", cfg.data, progress=False).labels
    suite = suite_for(cfg, condition, labels)
    assert suite.indices.shape == suite.labels.shape == (TASKS, N) and suite.classes.shape == (TASKS, K)
    np.testing.assert_array_equal(labels[suite.indices], np.take_along_axis(suite.classes, suite.labels, 1))
    assert all(len(set(row)) == N for row in suite.indices.tolist())
    assert all(np.all(np.bincount(row, minlength=K) == N // K) for row in suite.labels)
    first = suite_for(cfg, condition, labels, num_tasks=2)
    np.testing.assert_array_equal(first.indices, suite.indices[:2])
    np.testing.assert_array_equal(build_suite(cfg, condition).indices, suite.indices)


@pytest.mark.parametrize("shape", [(2, 12), (6, 60)])
def test_the_smallest_and_the_largest_k_of_the_tiny_datasets(tiny_mirror, shape):
    """K = 2 and K = every class of the dataset both give full suites (the largest fills the whole test split)."""
    cfg = tiny_config()
    (condition,) = grid(cfg, ["mnist"], [shape], verbose=False)
    suite = build_suite(cfg, condition)
    assert suite.classes.shape == (TASKS, shape[0]) and suite.indices.shape == (TASKS, shape[1])
    assert all(len(set(row)) == shape[0] for row in suite.classes.tolist())


def test_adding_a_held_out_dataset_is_one_config_entry(tiny_mirror):
    """A new entry of meta.test_datasets (here a shifted one) is a condition of the default grid at every shape."""
    cfg = tiny_config(meta={"test_datasets": ["mnist", "mnist+rotate", "math_shapes+fog"],
                            "train_datasets": ["fashion_mnist", "hebrew_chars"]},
                      eval={"shapes": [[K, N], [2, 12]]})
    keys = [c.key for c in grid(cfg, verbose=False)]
    assert keys[-2:] == ["math_shapes+fog_K3_N18", "math_shapes+fog_K2_N12"] and len(keys) == 6
    assert build_suite(cfg, grid(cfg, ["math_shapes+fog"], [(2, 12)], verbose=False)[0]).classes.shape == (TASKS, 2)


def test_shifted_datasets_take_their_own_shapes_when_configured(tiny_mirror):
    """eval.shifted_shapes (when set) are the shapes of the shifted datasets; shapes passed explicitly are every
    dataset's."""
    cfg = tiny_config(eval={"shifted_shapes": [[2, 12]]})
    assert [c.key for c in grid(cfg, verbose=False)] == ["mnist_K3_N18", "mnist+rotate_K2_N12"]
    assert [c.key for c in grid(cfg, shapes=[(K, N)], verbose=False)] == ["mnist_K3_N18", "mnist+rotate_K3_N18"]
