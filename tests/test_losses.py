"""Inner losses (the INNER_LOSSES registry, what an InnerView shows them) and the label-aligned outer losses."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hmlib.config import AdaptConfig, ConfigError, load_config
from hmlib.hyper import losses
from hmlib.hyper.losses import (INNER_LOSSES, InnerLoss, InnerView, agreement_loss, aligned_cross_entropy,
                                augmentation_loss, best_alignment, entropy_loss, geometry_loss, infomax_loss,
                                inner_loss, marginal_entropy, neighbour_loss, task_accuracy)
from hmlib.metrics import clustering_accuracy

# Tiny sizes
T, K, N = 2, 3, 12
LOG_K = math.log(K)


def onehot_logits(assignments: list[int], scale: float = 30.0) -> torch.Tensor:
    """Confident logits (n, K) for the given cluster of every image."""
    return scale * F.one_hot(torch.tensor(assignments), K).float()


def grouped_reference(assignments: list[int], seed: int = 0) -> torch.Tensor:
    """Reference features (n, 4) in tight groups, one per cluster id of ``assignments``: neighbours share a group."""
    gen = torch.Generator().manual_seed(seed)
    centres = 5.0 * torch.randn(K, 4, generator=gen)
    return centres[torch.tensor(assignments)] + 0.01 * torch.randn(len(assignments), 4, generator=gen)


BALANCED = [0, 1, 2] * 4


# ------------------------------------------------------------------------------------------ the losses

def test_entropy_of_uniform_logits_is_log_k_and_confidence_lowers_it():
    """TENT's entropy: log K for uniform predictions, ~0 for confident ones, balanced or not."""
    confident, collapsed, uniform = onehot_logits(BALANCED), onehot_logits([0] * N), torch.zeros(N, K)
    torch.testing.assert_close(entropy_loss(uniform), torch.tensor(LOG_K))
    assert entropy_loss(confident) < 1e-6
    torch.testing.assert_close(entropy_loss(confident), entropy_loss(collapsed))
    assert entropy_loss(torch.zeros(T, N, K)).shape == (T,)


def test_marginal_entropy_is_high_when_every_cluster_is_used():
    """The entropy of the mean prediction: log K for balanced confident predictions, 0 for a collapse."""
    torch.testing.assert_close(marginal_entropy(onehot_logits(BALANCED)), torch.tensor(LOG_K), atol=1e-4, rtol=0)
    assert marginal_entropy(onehot_logits([0] * N)) < 1e-4


def test_infomax_balance_term():
    """Infomax = entropy - w * entropy of the mean prediction: -w log K when balanced and confident, 0 collapsed."""
    balanced, collapsed, uniform = onehot_logits(BALANCED), onehot_logits([0] * N), torch.zeros(N, K)
    torch.testing.assert_close(infomax_loss(balanced), torch.tensor(-LOG_K), atol=1e-3, rtol=0)
    torch.testing.assert_close(infomax_loss(balanced, balance_weight=2.5), torch.tensor(-2.5 * LOG_K), atol=1e-3,
                               rtol=0)
    torch.testing.assert_close(infomax_loss(collapsed), torch.tensor(0.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(infomax_loss(uniform), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(infomax_loss(collapsed, balance_weight=0.0), entropy_loss(collapsed))
    assert infomax_loss(balanced) < infomax_loss(collapsed) and infomax_loss(balanced) < infomax_loss(uniform)


def test_agreement_is_minus_log_of_the_overlap_of_two_assignments():
    """-log <p, q> averaged over images (and over partners when there are several): 0 for confident agreement,
    large for confident disagreement."""
    p = torch.softmax(onehot_logits(BALANCED), -1).unsqueeze(0)
    assert agreement_loss(p, p).item() == pytest.approx(0.0, abs=1e-4)
    assert agreement_loss(p, p.roll(1, dims=1)) > 10.0
    probs, partners = torch.rand(T, N, K).softmax(-1), torch.rand(T, N, 4, K).softmax(-1)
    expected = torch.stack([agreement_loss(probs, partners[:, :, j]) for j in range(4)]).mean(0)
    torch.testing.assert_close(agreement_loss(probs, partners), expected)
    assert agreement_loss(probs, partners).shape == (T,)


def test_neighbour_loss_rewards_agreement_with_reference_neighbours():
    """SCAN's inner loss: confident predictions that agree with the neighbours in the reference features and use
    every cluster score -w log K; the same predictions on neighbourhoods they cut across score far worse."""
    groups = [0, 1, 2] * 4
    agreeing = onehot_logits(groups).unsqueeze(0)
    reference = grouped_reference(groups).unsqueeze(0)
    good = neighbour_loss(agreeing, reference, neighbours=3, balance_weight=1.0)
    assert good.shape == (1,) and good.item() == pytest.approx(-LOG_K, abs=1e-3)
    crossing = onehot_logits([0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 0, 0]).unsqueeze(0)  # neighbours in other clusters
    assert neighbour_loss(crossing, reference, neighbours=3) > good + 5.0
    collapsed = onehot_logits([0] * N).unsqueeze(0)  # agrees with every neighbour, but one cluster only
    assert neighbour_loss(collapsed, reference, neighbours=3).item() == pytest.approx(0.0, abs=1e-3)


def test_neighbour_loss_with_neighbours_mined_once_is_the_same_loss():
    """The inner loop mines the reference's neighbours once (InnerView.neighbour_index): the loss and its gradient
    are exactly those of mining them in the loss; other neighbours give another loss."""
    torch.manual_seed(0)
    reference, logits = torch.randn(T, N, 5), torch.randn(T, N, K, requires_grad=True)
    index = losses.nearest_neighbours(reference, 3)
    cfg = dataclasses.replace(AdaptConfig(), inner_loss="neighbours", neighbours=3)
    mined = inner_loss(InnerView(logits, reference), cfg)
    given = inner_loss(InnerView(logits, reference, neighbour_index=index), cfg)
    assert torch.equal(mined, given) and INNER_LOSSES["neighbours"].neighbours
    assert torch.equal(torch.autograd.grad(mined.sum(), logits)[0], torch.autograd.grad(given.sum(), logits)[0])
    other = inner_loss(InnerView(logits, reference, neighbour_index=index.roll(1, dims=1)), cfg)
    assert not torch.allclose(other, mined)


def test_augmentation_loss_compares_an_image_with_its_augmented_copy():
    """IIC / MT3: agreement of each image's assignment with its augmented copy's, minus the balance term; without
    augmented logits it is refused."""
    logits = onehot_logits(BALANCED).unsqueeze(0)
    assert augmentation_loss(logits, logits).item() == pytest.approx(-LOG_K, abs=1e-3)
    assert augmentation_loss(logits, logits.roll(1, dims=1)) > 10.0
    with pytest.raises(ValueError, match="augmented copies"):
        augmentation_loss(logits, None)


def test_geometry_is_zero_when_geometries_match():
    """The prototype's geometry loss compares pairwise cosine distances of outputs and reference features."""
    reference = torch.randn(10, K)
    assert geometry_loss(2.5 * reference, reference).item() == pytest.approx(0.0, abs=1e-6)
    assert geometry_loss(torch.randn(10, K), reference) > 0.01
    assert geometry_loss(torch.randn(T, 10, K), torch.randn(T, 10, 4)).shape == (T,)
    other = torch.randn(10, K)
    torch.testing.assert_close(geometry_loss(other, reference, weight=2.0), 2.0 * geometry_loss(other, reference, 1.0))


# ------------------------------------------------------------------------------------------ the registry

def test_inner_loss_dispatches_on_the_config():
    """inner_loss reads the registry entry named by adapt.inner_loss, with its weights from the config."""
    logits, reference, augmented = torch.randn(T, N, K), torch.randn(T, N, 4), torch.randn(T, N, K)
    view = InnerView(logits, reference, augmented)
    expected = {"entropy": entropy_loss(logits), "infomax": infomax_loss(logits, 0.3),
                "geometry": geometry_loss(logits, reference, 1.5),
                "neighbours": neighbour_loss(logits, reference, 2, 0.3),
                "augmentation": augmentation_loss(logits, augmented, 0.3)}
    assert set(expected) == set(INNER_LOSSES)
    for name, value in expected.items():
        cfg = AdaptConfig(inner_loss=name, balance_weight=0.3, geometry_weight=1.5, neighbours=2)
        out = inner_loss(view, cfg)
        assert out.shape == (T,)
        torch.testing.assert_close(out, value)


def test_registry_entries_say_what_they_read():
    """Every entry has a label for tables and widgets and is a valid adapt.inner_loss; only the augmentation loss
    asks for augmented copies."""
    for name, entry in INNER_LOSSES.items():
        assert isinstance(entry, InnerLoss) and isinstance(entry.label, str) and entry.label, name
    assert {name for name, entry in INNER_LOSSES.items() if entry.augmented} == {"augmentation"}
    for name in INNER_LOSSES:  # config validation reads the registry
        assert load_config("default", overrides={"adapt": {"inner_loss": name}}).adapt.inner_loss == name


def test_a_registered_inner_loss_is_a_valid_config_value(monkeypatch):
    """Adding an inner loss is one entry in INNER_LOSSES: the config accepts its name, inner_loss calls it."""

    def max_logit(view, cfg):
        return -view.logits.max(-1).values.mean(-1)

    with pytest.raises(ConfigError, match="inner_loss"):
        load_config("default", overrides={"adapt": {"inner_loss": "max_logit"}})
    monkeypatch.setitem(losses.INNER_LOSSES, "max_logit", InnerLoss(max_logit, "largest logit"))
    cfg = load_config("default", overrides={"adapt": {"inner_loss": "max_logit"}})
    logits = torch.randn(T, N, K)
    torch.testing.assert_close(inner_loss(InnerView(logits, logits), cfg.adapt), -logits.max(-1).values.mean(-1))


# ---------------------------------------------------------------------------------- aligned outer loss

@pytest.mark.parametrize("num_classes", [2, 3, 4])
def test_alignment_matches_brute_force_over_permutations(num_classes):
    """The Hungarian-aligned cross-entropy is the lowest cross-entropy over every relabelling of the units."""
    generator = torch.Generator().manual_seed(num_classes)
    for _ in range(5):
        logits = torch.randn(30, num_classes, generator=generator) * 2
        labels = torch.randint(0, num_classes, (30,), generator=generator)
        brute = min(F.cross_entropy(logits, torch.tensor(perm)[labels]).item()
                    for perm in itertools.permutations(range(num_classes)))
        assert aligned_cross_entropy(logits, labels).item() == pytest.approx(brute, rel=1e-5)


def test_aligned_cross_entropy_is_invariant_to_permuting_output_units():
    """Shuffling the output units leaves the aligned loss unchanged; alignments are permutations, even of NaNs."""
    logits, labels = torch.randn(T, 16, 4), torch.randint(0, 4, (T, 16))
    shuffled = logits[..., torch.tensor([2, 0, 3, 1])]
    torch.testing.assert_close(aligned_cross_entropy(shuffled, labels), aligned_cross_entropy(logits, labels))
    perm = best_alignment(logits, labels)
    assert perm.shape == (T, 4) and all(sorted(p.tolist()) == [0, 1, 2, 3] for p in perm)
    nan_logits = torch.full((1, 16, 4), float("nan"))
    assert sorted(best_alignment(nan_logits, labels[:1])[0].tolist()) == [0, 1, 2, 3]


def test_task_accuracy_matches_metrics():
    """Per-task Hungarian accuracy of the argmax equals hmlib.metrics.clustering_accuracy; shapes must match."""
    logits, labels = torch.randn(3, 40, 4), torch.randint(0, 4, (3, 40))
    expected = [clustering_accuracy(logits[t].argmax(-1).numpy(), labels[t].numpy(), 4) for t in range(3)]
    np.testing.assert_allclose(task_accuracy(logits, labels), expected)
    np.testing.assert_allclose(task_accuracy(logits[0], labels[0]), expected[:1])
    np.testing.assert_allclose(task_accuracy(logits, labels.numpy()), expected)
    with pytest.raises(ValueError, match="do not match"):
        task_accuracy(logits, labels[:, :5])
