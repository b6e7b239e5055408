"""Baselines on suites of synthetic tasks: they recover well-separated blobs and sit near chance on noise."""
from __future__ import annotations

import numpy as np
import pytest

from hmlib import baselines
from hmlib.data import sample_tasks

NUM_CLASSES = 3
NUM_TASKS = 4
NUM_IMAGES = 30
PER_CLASS = 40  # images per class in each synthetic split
NUM_ALL_CLASSES = 5
DIM = 4
N_INIT = 2


def blob_split(seed: int, separation: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, DIM) of NUM_ALL_CLASSES tight Gaussian blobs, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_ALL_CLASSES), PER_CLASS)
    centres = np.random.default_rng(99).normal(size=(NUM_ALL_CLASSES, DIM)) * separation
    return centres[labels] + rng.normal(size=(len(labels), DIM)), labels


def noise_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features that carry no class information."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_ALL_CLASSES), PER_CLASS)
    return rng.normal(size=(len(labels), DIM)), labels


def suite_for(labels: np.ndarray, seed: int = 0):
    return sample_tasks(labels, NUM_TASKS, NUM_CLASSES, NUM_IMAGES, mode="random", seed=seed)


@pytest.mark.parametrize("method", ["kmeans_latent", "gmm_latent", "gmm_bic", "kmeans_pixels"])
def test_clusterers_recover_blobs_and_fail_on_noise(method):
    features, labels = blob_split(0)
    suite = suite_for(labels)
    run = getattr(baselines, "gmm_latent" if method == "gmm_bic" else method)
    kwargs = {"gmm_latent": {}, "gmm_bic": {"covariance_type": "bic"}}.get(method, {"n_init": N_INIT})
    if method == "kmeans_pixels":  # pixels arrive as images; the baseline flattens them
        features = features.reshape(len(features), 2, DIM // 2)
    scores = run(features, suite, seed=0, progress=False, **kwargs)
    assert scores.acc.shape == scores.seconds.shape == (NUM_TASKS,)
    assert np.all(scores.acc == 1.0)
    assert np.all(scores.seconds > 0)

    noise, noise_labels = noise_split(1)
    noisy = run(noise, suite_for(noise_labels), seed=0, progress=False, **kwargs)
    assert noisy.acc.mean() < 0.6  # chance with Hungarian matching at N=30, K=3 is about 0.45


def test_clusterers_are_seeded():
    features, labels = noise_split(2)
    suite = suite_for(labels)
    first = baselines.kmeans_latent(features, suite, n_init=1, seed=5, progress=False)
    again = baselines.kmeans_latent(features, suite, n_init=1, seed=5, progress=False)
    np.testing.assert_array_equal(first.acc, again.acc)
    gmm_first = baselines.gmm_latent(features, suite, seed=5, progress=False)
    gmm_again = baselines.gmm_latent(features, suite, seed=5, progress=False)
    np.testing.assert_array_equal(gmm_first.acc, gmm_again.acc)


def test_logreg_ceiling_uses_train_split_of_the_task_classes():
    train_x, train_y = blob_split(3)
    test_x, test_y = blob_split(4)
    suite = suite_for(test_y)
    scores = baselines.logreg_ceiling(train_x, train_y, test_x, suite, train_per_class=10, seed=0, progress=False)
    assert np.all(scores.acc == 1.0)

    # Training labels that disagree with the test classes (a shifted labelling) make the ceiling collapse:
    # it really reads the train labels of the task's classes.
    shifted = (train_y + 1) % NUM_ALL_CLASSES
    wrong = baselines.logreg_ceiling(train_x, shifted, test_x, suite, train_per_class=10, seed=0, progress=False)
    assert wrong.acc.mean() < 0.5

    noise_train, noise_train_y = noise_split(5)
    noise_test, noise_test_y = noise_split(6)
    noisy = baselines.logreg_ceiling(noise_train, noise_train_y, noise_test, suite_for(noise_test_y),
                                     train_per_class=10, seed=0, progress=False)
    assert noisy.acc.mean() < 0.6


def test_bad_inputs_raise_clear_errors():
    features, labels = blob_split(0)
    suite = suite_for(labels)
    with pytest.raises(ValueError, match="covariance_type"):
        baselines.gmm_latent(features, suite, covariance_type="round", progress=False)
    with pytest.raises(ValueError, match="split has"):
        baselines.kmeans_latent(features[:10], suite, n_init=1, progress=False)
    with pytest.raises(ValueError, match="do not match"):
        baselines.logreg_ceiling(features[:, :2], labels, features, suite, progress=False)
    missing = labels.copy()
    missing[missing == suite.classes[0, 0]] = NUM_ALL_CLASSES + 1  # the task's first class absent from train
    with pytest.raises(ValueError, match="no images in the train split"):
        baselines.logreg_ceiling(features, missing, features, suite, progress=False)
