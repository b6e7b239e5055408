"""Meta-training episodes: meta-batches of varying K from the meta-training datasets, under random training shifts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hmlib.config import ConfigError, VAEConfig, load_config
from hmlib.data.corruptions import benchmark_corruptions, train_corruptions
from hmlib.hyper.episodes import Episode, EpisodeSampler
from hmlib.hyper.inputs import TaskData
from hmlib.reproducibility import seeded
from hmlib.vae.model import build_vae
from hmlib.vae.train import encode_images

# Tiny sizes
PER_CLASS, TASK_IMAGES, BATCH, LATENT_DIM = 12, 24, 4, 2
MIN_K, MAX_K = 2, 4


def config(**meta):
    return load_config("smoke", overrides={"meta": {"min_classes": MIN_K, "max_classes": MAX_K,
                                                    "task_images": TASK_IMAGES, "meta_batch_size": BATCH,
                                                    "shift_prob": 0.0, **meta}})


def part(name: str, num_classes: int, seed: int) -> TaskData:
    """A meta-training part whose images say their class: pixel (0, 0) is 20 + 40 x class, the rest is noise."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), PER_CLASS)).astype(np.int64)
    images = rng.integers(0, 200, size=(len(labels), 28, 28)).astype(np.uint8)
    images[:, 0, 0] = 20 + 40 * labels
    return TaskData(name, "train", np.zeros((len(labels), 2 * LATENT_DIM), np.float32), labels, images=images)


@pytest.fixture(scope="module")
def vae():
    with seeded(0):
        return build_vae(VAEConfig(latent_dim=LATENT_DIM)).eval()


def sampler(vae, cfg=None, classes=(5, 5)) -> EpisodeSampler:
    return EpisodeSampler([part(f"d{i}", c, seed=i) for i, c in enumerate(classes)], cfg or config(), vae)


def as_uint8(images: torch.Tensor) -> np.ndarray:
    """Episode images (T, N, 1, 28, 28) floats back to uint8 (T, N, 28, 28) (they were uint8 / 255)."""
    return (images[:, :, 0] * 255).round().to(torch.uint8).numpy()


def test_an_episode_is_a_batch_of_k_class_tasks_with_one_n(vae):
    """meta.meta_batch_size tasks of one K, each with every one of its K labels, all of one N; K varies over
    batches within meta.min_classes .. meta.max_classes."""
    source = sampler(vae)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        episode = source.sample(rng)
        assert isinstance(episode, Episode)
        K = episode.num_classes
        seen.add(K)
        T, N = episode.labels.shape
        assert T == BATCH and N <= TASK_IMAGES and N >= 2 * K
        assert episode.inputs.images.shape == (T, N, 1, 28, 28)
        assert episode.inputs.context.shape == (T, N, 2 * LATENT_DIM) and episode.inputs.features is None
        assert all(sorted(set(row.tolist())) == list(range(K)) for row in episode.labels)
        assert episode.shifts == ["none"] * T
    assert seen == set(range(MIN_K, MAX_K + 1))


def test_k_is_capped_by_the_classes_of_every_dataset(vae):
    """A dataset with fewer classes than meta.max_classes caps K for every batch; a requested K is capped too."""
    source = sampler(vae, classes=(5, 3))
    rng = np.random.default_rng(1)
    assert max(source.sample(rng).num_classes for _ in range(20)) == 3
    assert source.sample(rng, num_classes=4).num_classes == 3
    assert source.sample(rng, num_classes=2).num_classes == 2


def test_labels_follow_the_images(vae):
    """Within a clean task, images of one label are of one class of their dataset, and different labels of
    different classes."""
    source = sampler(vae)
    episode = source.sample(np.random.default_rng(2))
    images = as_uint8(episode.inputs.images)
    for t in range(BATCH):
        marks = images[t, :, 0, 0]
        mapping = {}
        for label, mark in zip(episode.labels[t].tolist(), marks.tolist()):
            assert mapping.setdefault(label, mark) == mark
        assert len(set(mapping.values())) == episode.num_classes


def test_the_context_is_the_vae_distribution_of_the_tasks_images(vae):
    """Conditioning rows are [mu, logvar] of the task's images as they are in the episode (after any shift)."""
    source = sampler(vae, config(shift_prob=1.0))
    episode = source.sample(np.random.default_rng(3))
    images = as_uint8(episode.inputs.images)
    mu, logvar = encode_images(vae, images.reshape(-1, 28, 28))
    expected = np.concatenate([mu, logvar], 1).reshape(*images.shape[:2], -1)
    np.testing.assert_allclose(episode.inputs.context.numpy(), expected, atol=1e-5, rtol=1e-5)


def test_shifts_come_from_the_train_family_with_probability_shift_prob(vae):
    """Each task is shifted with probability meta.shift_prob by a train-family corruption (meta.shifts when given),
    never a benchmark one; a shifted task's images are changed copies."""
    originals = {image.tobytes() for p in sampler(vae).parts for image in p.images}
    everything = sampler(vae, config(shift_prob=1.0))
    rng = np.random.default_rng(4)
    names = []
    for _ in range(10):
        episode = everything.sample(rng)
        names += episode.shifts
        images = as_uint8(episode.inputs.images)
        for t in range(BATCH):
            assert np.mean([image.tobytes() in originals for image in images[t]]) < 1.0
    assert set(names) <= set(train_corruptions()) and not set(names) & set(benchmark_corruptions())
    assert len(set(names)) > 3  # a random corruption per task
    chosen = sampler(vae, config(shift_prob=1.0, shifts=["contrast", "thin"]))
    assert {s for _ in range(5) for s in chosen.sample(rng).shifts} == {"contrast", "thin"}
    half = sampler(vae, config(shift_prob=0.5))
    shifted = [s != "none" for _ in range(25) for s in half.sample(rng).shifts]
    assert 0.3 < np.mean(shifted) < 0.7
    with pytest.raises(ConfigError, match="shifts"):
        config(shifts=[benchmark_corruptions()[0]])


def test_episodes_are_deterministic_given_the_rng(vae):
    """The same random generator state gives the same episode (K, images, labels, shifts, context); another seed
    another one."""
    source = sampler(vae, config(shift_prob=0.5))
    first, second = (source.sample(np.random.default_rng(7)) for _ in range(2))
    assert first.num_classes == second.num_classes and first.shifts == second.shifts
    assert torch.equal(first.labels, second.labels) and torch.equal(first.inputs.images, second.inputs.images)
    assert torch.equal(first.inputs.context, second.inputs.context)
    other = source.sample(np.random.default_rng(8))
    assert other.labels.shape != first.labels.shape or not torch.equal(other.inputs.images, first.inputs.images)


def test_the_full_generator_reads_the_context_rows_as_features(vae):
    """For generation 'full' the target network reads the same [mu, logvar] rows the encoder conditions on."""
    cfg = load_config("seed", overrides={"meta": {"task_images": TASK_IMAGES, "meta_batch_size": BATCH}})
    episode = sampler(vae, cfg).sample(np.random.default_rng(0))
    assert episode.inputs.images is None and torch.equal(episode.inputs.features, episode.inputs.context)
    assert episode.num_classes == 4 and episode.shifts == ["none"] * BATCH  # seed profile: K = 4, no shifts
