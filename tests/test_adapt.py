"""The inner loop: zero steps, gradients through the steps, adapted parameter sets, losses, alignment."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmlib.adapt import (adapt, aligned_cross_entropy, best_alignment, entropy_loss, geometry_loss, infomax_loss,
                         predict_task, task_accuracy)
from hmlib.config import AdaptConfig, HyperConfig
from hmlib.hypernet import HyperNet, TaskInputs, target_forward
from hmlib.metrics import clustering_accuracy

LATENT_DIM, NUM_CLASSES, NUM_IMAGES, NUM_STEPS = 5, 3, 24, 3
HYPER = HyperConfig(target_hidden=(8,), embed_dim=16, head_hidden=16, num_seeds=2, num_heads=2)
ADAPT = AdaptConfig(inner_loss="infomax", num_inner_steps=NUM_STEPS, inner_lr=0.5)


@pytest.fixture
def hypernet():
    torch.manual_seed(0)
    return HyperNet(HYPER, LATENT_DIM, NUM_CLASSES)


def _inputs(*lead: int) -> TaskInputs:
    torch.manual_seed(1)
    return TaskInputs(torch.randn(*lead, NUM_IMAGES, LATENT_DIM), torch.randn(*lead, NUM_IMAGES, LATENT_DIM))


@pytest.mark.parametrize("adapt_params", ["generated", "last", "hypernet"])
def test_zero_steps_return_the_unadapted_outputs(hypernet, adapt_params):
    inputs = _inputs()
    cfg = dataclasses.replace(ADAPT, adapt_params=adapt_params)
    unadapted = target_forward(hypernet(hypernet.context(inputs)), hypernet.target_features(inputs)).detach()
    zero = predict_task(hypernet, inputs, cfg, num_steps=0)
    assert zero.shape == (1, NUM_IMAGES, NUM_CLASSES)
    torch.testing.assert_close(zero[0], unadapted)
    logits = predict_task(hypernet, inputs, cfg)
    assert logits.shape == (NUM_STEPS + 1, NUM_IMAGES, NUM_CLASSES) and not logits.requires_grad
    torch.testing.assert_close(logits[0], unadapted)
    assert not torch.allclose(logits[-1], unadapted)


@pytest.mark.parametrize("adapt_params", ["generated", "last", "hypernet"])
def test_inner_steps_lower_the_inner_loss(hypernet, adapt_params):
    cfg = dataclasses.replace(ADAPT, adapt_params=adapt_params, inner_lr=0.05 if adapt_params == "hypernet" else 0.3)
    logits = predict_task(hypernet, _inputs(), cfg, num_steps=5)
    losses = infomax_loss(logits)
    assert losses[-1] < losses[0]


def test_test_time_adaptation_leaves_the_hypernet_unchanged(hypernet):
    before = {k: v.clone() for k, v in hypernet.state_dict().items()}
    predict_task(hypernet, _inputs(), dataclasses.replace(ADAPT, adapt_params="hypernet"))
    for key, value in hypernet.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_last_mode_adapts_only_the_last_layer(hypernet):
    inputs = _inputs()
    generated = hypernet(hypernet.context(inputs))
    result = adapt(hypernet, inputs, dataclasses.replace(ADAPT, adapt_params="last"))
    last = set(hypernet.last_layer_keys)
    for key, value in result.target_params.items():
        assert torch.allclose(value, generated[key]) != (key in last)


def test_batched_tasks_adapt_independently(hypernet):
    inputs = _inputs(2)
    batched = predict_task(hypernet, inputs, ADAPT)
    assert batched.shape == (NUM_STEPS + 1, 2, NUM_IMAGES, NUM_CLASSES)
    for t in range(2):
        single = predict_task(hypernet, TaskInputs(inputs.mu[t], inputs.logvar[t]), ADAPT)
        torch.testing.assert_close(batched[:, t], single, atol=1e-4, rtol=1e-4)


def _update_gradient(hypernet, first_order: bool) -> list[torch.Tensor | None]:
    """Gradient w.r.t. the hypernet of the inner update alone (adapted minus generated params)."""
    inputs = _inputs()
    result = adapt(hypernet, inputs, dataclasses.replace(ADAPT, first_order=first_order), create_graph=True)
    generated = hypernet(hypernet.context(inputs))
    update = sum(((result.target_params[k] - generated[k]) ** 2).sum() for k in generated)
    if not update.requires_grad:
        return [None]
    return list(torch.autograd.grad(update, list(hypernet.parameters()), allow_unused=True))


def test_second_order_gradients_reach_the_hypernet_through_the_inner_steps(hypernet):
    grads = _update_gradient(hypernet, first_order=False)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_first_order_mode_cuts_the_inner_gradients(hypernet):
    grads = _update_gradient(hypernet, first_order=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads)
    # ... yet the outer loss still reaches the hypernet through the generated parameters
    result = adapt(hypernet, _inputs(), dataclasses.replace(ADAPT, first_order=True), create_graph=True)
    loss = aligned_cross_entropy(result.logits[-1], torch.arange(NUM_IMAGES) % NUM_CLASSES)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in hypernet.parameters())


def test_hypernet_mode_keeps_second_order_graph(hypernet):
    result = adapt(hypernet, _inputs(), dataclasses.replace(ADAPT, adapt_params="hypernet", inner_lr=0.05),
                   create_graph=True)
    loss = aligned_cross_entropy(result.logits[-1], torch.arange(NUM_IMAGES) % NUM_CLASSES)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in hypernet.parameters() if p.grad is not None)
    assert sum(p.grad.abs().sum() for p in hypernet.parameters() if p.grad is not None) > 0


# ------------------------------------------------------------------------------------------- losses
def _onehot_logits(assignments: list[int], scale: float = 20.0) -> torch.Tensor:
    return scale * F.one_hot(torch.tensor(assignments), NUM_CLASSES).float()


def test_infomax_prefers_balanced_confident_assignments():
    balanced = _onehot_logits([0, 1, 2] * 4)
    collapsed = _onehot_logits([0] * 12)
    uncertain = torch.zeros(12, NUM_CLASSES)
    assert infomax_loss(balanced) < infomax_loss(collapsed)
    assert infomax_loss(balanced) < infomax_loss(uncertain)
    torch.testing.assert_close(infomax_loss(balanced), -torch.log(torch.tensor(3.0)), atol=1e-3, rtol=0)


def test_entropy_prefers_confident_assignments_balanced_or_not():
    confident, collapsed, uncertain = _onehot_logits([0, 1, 2] * 4), _onehot_logits([0] * 12), torch.zeros(12, 3)
    assert entropy_loss(confident) < entropy_loss(uncertain)
    torch.testing.assert_close(entropy_loss(confident), entropy_loss(collapsed))
    torch.testing.assert_close(entropy_loss(uncertain), torch.log(torch.tensor(3.0)))


def test_geometry_is_zero_when_geometries_match():
    reference = torch.randn(10, NUM_CLASSES)
    assert geometry_loss(2.5 * reference, reference).item() == pytest.approx(0.0, abs=1e-6)
    assert geometry_loss(torch.randn(10, NUM_CLASSES), reference) > 0.01
    assert geometry_loss(torch.randn(2, 10, NUM_CLASSES), torch.randn(2, 10, 4)).shape == (2,)


# ---------------------------------------------------------------------------------- aligned outer loss
@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_alignment_matches_brute_force_over_permutations(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    for _ in range(5):
        logits = torch.randn(30, num_classes, generator=generator) * 2
        labels = torch.randint(0, num_classes, (30,), generator=generator)
        brute = min(F.cross_entropy(logits, torch.tensor(perm)[labels]).item()
                    for perm in itertools.permutations(range(num_classes)))
        assert aligned_cross_entropy(logits, labels).item() == pytest.approx(brute, rel=1e-5)


def test_aligned_loss_ignores_the_order_of_output_units():
    logits, labels = torch.randn(2, 16, 4), torch.randint(0, 4, (2, 16))
    shuffled = logits[..., torch.tensor([2, 0, 3, 1])]
    torch.testing.assert_close(aligned_cross_entropy(shuffled, labels), aligned_cross_entropy(logits, labels))
    perm = best_alignment(logits, labels)
    assert perm.shape == (2, 4) and all(sorted(p.tolist()) == [0, 1, 2, 3] for p in perm)


def test_task_accuracy_matches_metrics():
    logits, labels = torch.randn(3, 40, 4), torch.randint(0, 4, (3, 40))
    expected = [clustering_accuracy(logits[t].argmax(-1).numpy(), labels[t].numpy(), 4) for t in range(3)]
    np.testing.assert_allclose(task_accuracy(logits, labels), expected)
    with pytest.raises(ValueError, match="do not match"):
        task_accuracy(logits, labels[:, :5])
