"""Hypernetwork: shapes, the param-dict contract with TargetNet, conditioning/generation variants, errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call

from hmlib.config import HyperConfig
from hmlib.hypernet import HyperNet, TargetNet, TaskInputs, normalize_task, target_forward, target_layer_shapes

LATENT_DIM, NUM_CLASSES, NUM_IMAGES, NUM_TASKS = 6, 3, 20, 2
SMALL = HyperConfig(generation="compact", target_hidden=(8,), embed_dim=16, head_hidden=16, num_seeds=2, num_heads=2, pixel_dim=4,
                    random_features=12, num_components=2)


def _inputs(*lead: int, pixels: bool = False, seed: int = 0) -> TaskInputs:
    generator = torch.Generator().manual_seed(seed)
    shape = (*lead, NUM_IMAGES)
    return TaskInputs(torch.randn(*shape, LATENT_DIM, generator=generator),
                      torch.randn(*shape, LATENT_DIM, generator=generator),
                      torch.rand(*shape, 784, generator=generator) if pixels else None)


@pytest.mark.parametrize("conditioning", ["attention", "multihead", "stats", "hyperfast"])
@pytest.mark.parametrize("generation", ["full", "compact"])
def test_shapes_and_functional_call_round_trip(conditioning, generation):
    cfg = dataclasses.replace(SMALL, conditioning=conditioning, generation=generation)
    hypernet = HyperNet(cfg, LATENT_DIM, NUM_CLASSES)
    inputs = _inputs()
    params = hypernet(hypernet.context(inputs))
    expected = target_layer_shapes(2 * LATENT_DIM, cfg.target_hidden, NUM_CLASSES)
    assert {k: tuple(v.shape) for k, v in params.items()} == expected
    target = TargetNet(2 * LATENT_DIM, cfg.target_hidden, NUM_CLASSES)
    features = hypernet.target_features(inputs)
    via_module = functional_call(target, params, (features,))
    assert via_module.shape == (NUM_IMAGES, NUM_CLASSES)
    torch.testing.assert_close(via_module, target_forward(params, features))
    # loading the generated dict into the module reproduces the same outputs
    target.load_state_dict(params)
    torch.testing.assert_close(target(features), via_module)


@pytest.mark.parametrize("conditioning", ["attention", "multihead", "stats", "hyperfast"])
def test_batched_tasks_match_one_at_a_time(conditioning):
    hypernet = HyperNet(dataclasses.replace(SMALL, conditioning=conditioning), LATENT_DIM, NUM_CLASSES)
    inputs = _inputs(NUM_TASKS)
    batched = hypernet(hypernet.context(inputs))
    for t in range(NUM_TASKS):
        single = hypernet(hypernet.context(TaskInputs(inputs.mu[t], inputs.logvar[t])))
        for key in single:
            torch.testing.assert_close(batched[key][t], single[key], atol=1e-5, rtol=1e-4)


def test_conditioning_depends_on_the_task():
    hypernet = HyperNet(SMALL, LATENT_DIM, NUM_CLASSES)
    a, b = _inputs(seed=0), _inputs(seed=1)
    b = TaskInputs(b.mu * 3.0 + 1.0, b.logvar)
    pa, pb = hypernet(hypernet.context(a)), hypernet(hypernet.context(b))
    assert any(not torch.allclose(pa[k], pb[k]) for k in pa)


def test_task_normalisation_gives_shift_and_scale_invariance():
    hypernet = HyperNet(SMALL, LATENT_DIM, NUM_CLASSES)
    inputs = _inputs()
    moved = TaskInputs(inputs.mu * 5.0 - 2.0, inputs.logvar + 1.0)
    torch.testing.assert_close(hypernet.target_features(moved), hypernet.target_features(inputs), atol=1e-4, rtol=1e-4)
    x = normalize_task(torch.randn(50, 4) * 3 + 7)
    torch.testing.assert_close(x.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    raw = HyperNet(dataclasses.replace(SMALL, normalize="none"), LATENT_DIM, NUM_CLASSES)
    assert not torch.allclose(raw.target_features(moved), raw.target_features(inputs))


def test_pixels_as_extra_target_input():
    cfg = dataclasses.replace(SMALL, target_input="latent+pixels")
    hypernet = HyperNet(cfg, LATENT_DIM, NUM_CLASSES)
    inputs = _inputs(pixels=True)
    features = hypernet.target_features(inputs)
    assert features.shape == (NUM_IMAGES, 2 * LATENT_DIM + cfg.pixel_dim)
    assert target_forward(hypernet(hypernet.context(inputs)), features).shape == (NUM_IMAGES, NUM_CLASSES)
    with pytest.raises(ValueError, match="needs TaskInputs.pixels"):
        hypernet.target_features(_inputs())


def test_bad_inputs_raise_clear_errors():
    hypernet = HyperNet(SMALL, LATENT_DIM, NUM_CLASSES)
    with pytest.raises(ValueError, match="differ in shape"):
        TaskInputs(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="built for"):
        hypernet.target_features(TaskInputs(torch.randn(5, LATENT_DIM + 1), torch.randn(5, LATENT_DIM + 1)))
    with pytest.raises(ValueError, match="columns"):
        hypernet(torch.randn(5, 3))
    with pytest.raises(ValueError, match="divisible"):
        HyperNet(dataclasses.replace(SMALL, num_heads=3), LATENT_DIM, NUM_CLASSES)


def test_whitening_decorrelates_each_task():
    from hmlib.hypernet import whiten_task

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 300, 5, generator=generator) @ (torch.randn(5, 5, generator=generator) + 3 * torch.eye(5)) + 4.0
    z = whiten_task(x, shrinkage=0.0)
    cov = z.transpose(-1, -2) @ z / x.shape[-2]
    torch.testing.assert_close(cov, torch.eye(5).expand(2, 5, 5), atol=1e-3, rtol=0)
    hypernet = HyperNet(dataclasses.replace(SMALL, normalize="whiten"), LATENT_DIM, NUM_CLASSES)
    assert hypernet.target_features(_inputs()).shape == (NUM_IMAGES, 2 * LATENT_DIM)


def test_task_inputs_from_arrays_accepts_images_or_flat_pixels():
    import numpy as np

    mu, logvar = np.zeros((2, 7, LATENT_DIM), np.float32), np.ones((2, 7, LATENT_DIM), np.float32)
    images = np.full((2, 7, 28, 28), 255, np.uint8)
    inputs = TaskInputs.from_arrays(mu, logvar, images)
    assert inputs.pixels.shape == (2, 7, 784) and float(inputs.pixels.max()) == 1.0
    flat = TaskInputs.from_arrays(mu[0], logvar[0], np.full((7, 784), 0.5, np.float32))
    assert flat.pixels.shape == (7, 784) and float(flat.pixels.max()) == 0.5
