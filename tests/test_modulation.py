"""The backbone under a per-task modulation (FiLM scale and shift, statistics blend): hmlib.backbone.modulation."""
from __future__ import annotations

import copy

import pytest
import torch

from datafactory import balanced_labels, class_patterns, perturbed_backbone
from hmlib.backbone import modulation as mod
from hmlib.backbone.model import ConvBackbone, batch_statistics, batchnorm_layers, blocks
from hmlib.features import images_to_tensor

# Tiny sizes
CHANNELS = (4, 8, 8)  # three blocks: splits 0, 1, 2
EMBED_DIM = 8
T, N, M = 3, 10, 5  # tasks, images per task, other images per task
ATOL = 1e-5


def backbone(seed: int = 0) -> ConvBackbone:
    """A backbone in eval mode whose stored statistics and affine transforms are far from the defaults."""
    return perturbed_backbone(CHANNELS, EMBED_DIM, seed)


def task_images(num_tasks: int = T, num_images: int = N, seed: int = 0) -> torch.Tensor:
    """(T, N, 1, 28, 28) floats in [0, 1]: class-pattern images, every task drawn with its own noise."""
    tasks = [images_to_tensor(class_patterns(balanced_labels(num_images, 4, seed + t), 4, seed=seed + t))
             for t in range(num_tasks)]
    return torch.stack(tasks)


def random_modulation(model: ConvBackbone, num_tasks: int = T, seed: int = 1) -> mod.Modulation:
    """A modulation far from the identity: random FiLM per task and channel, blends strictly inside (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    widths = [bn.num_features for _, bn in blocks(model)]
    return mod.Modulation([0.3 * torch.randn(num_tasks, c, generator=gen) for c in widths],
                          [0.3 * torch.randn(num_tasks, c, generator=gen) for c in widths],
                          [0.1 + 0.8 * torch.rand(num_tasks, generator=gen) for _ in widths])


def task_slice(modulation: mod.Modulation, t: int) -> mod.Modulation:
    """Task ``t`` of a modulation, as a modulation of one task."""
    return mod.Modulation(*([x[t:t + 1] for x in getattr(modulation, kind)] for kind in ("scale", "shift", "blend")))


def test_identity_with_blend_zero_is_the_backbone_in_eval_mode():
    """No FiLM change and the stored statistics everywhere: exactly ConvBackbone.embed in eval mode, per task."""
    model, x = backbone(), task_images()
    identity = mod.identity(model, T, blend=0.0)
    assert identity.num_tasks == T and [s.shape for s in identity.scale] == [(T, c) for c in CHANNELS]
    with torch.no_grad():
        out = mod.embed(model, x, identity)
        expected = model.embed(x.flatten(0, 1)).view(T, N, EMBED_DIM)
    assert out.shape == (T, N, EMBED_DIM)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)


def test_blend_one_is_per_task_batch_statistics():
    """blend = 1 normalises every layer with each task's own statistics: batch_statistics applied per task (AdaBN
    per task); the stored statistics are left alone."""
    model, x = backbone(), task_images()
    stored = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in batchnorm_layers(model)]
    with torch.no_grad():
        out = mod.embed(model, x, mod.identity(model, T, blend=1.0))
        with batch_statistics(model):
            expected = torch.stack([model.embed(x[t]) for t in range(T)])
        stored_stats = model.embed(x.flatten(0, 1)).view(T, N, EMBED_DIM)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(out, stored_stats, atol=1e-2)  # the two ends of the blend really differ here
    for bn, (mean, var) in zip(batchnorm_layers(model), stored):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)


def test_blend_in_between_normalises_with_the_mixture_of_both_distributions():
    """A blend w uses the mean and variance of the mixture w * (the task's activations) + (1 - w) * (the stored
    distribution), per channel (TaskNorm); statistics the task already has make every blend the same."""
    model = backbone()
    bn = batchnorm_layers(model)[0]
    gen = torch.Generator().manual_seed(2)
    grouped = 2.0 + 1.5 * torch.randn(2, N, CHANNELS[0], 5, 5, generator=gen)  # (T, N, C, H, W)
    blend = torch.tensor([0.25, 0.8])
    zeros = torch.zeros(2, CHANNELS[0])
    gain, bias = mod.affine(grouped, bn, blend, zeros, zeros)
    # recover the statistics that were used from gain = w / sqrt(var + eps), bias = b - mean * gain
    used_var = (bn.weight / gain) ** 2 - bn.eps
    used_mean = (bn.bias - bias) / gain
    task_mean = grouped.mean(dim=(1, 3, 4))
    task_second = (grouped ** 2).mean(dim=(1, 3, 4))
    stored_second = bn.running_var + bn.running_mean ** 2
    w = blend[:, None]
    mix_mean = w * task_mean + (1 - w) * bn.running_mean
    mix_var = w * task_second + (1 - w) * stored_second - mix_mean ** 2
    torch.testing.assert_close(used_mean, mix_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(used_var, mix_var, atol=1e-4, rtol=1e-4)

    own = copy.deepcopy(bn)  # stored statistics equal to the task's own: the blend no longer matters
    own.running_mean.copy_(task_mean[0])
    own.running_var.copy_(grouped[0].var(dim=(0, 2, 3), unbiased=False))
    results = [mod.affine(grouped[:1], own, torch.tensor([w]), zeros[:1], zeros[:1]) for w in (0.0, 0.3, 1.0)]
    for gain_w, bias_w in results[1:]:
        torch.testing.assert_close(gain_w, results[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bias_w, results[0][1], atol=1e-5, rtol=1e-5)


def test_film_scale_and_shift_act_on_the_stored_affine_transform():
    """FiLM multiplies a layer's stored scale by (1 + scale) and adds shift to its stored shift, per task and
    channel: the same as a backbone whose BatchNorm weight and bias were changed that way."""
    model, x = backbone(), task_images(2)
    modulation = mod.identity(model, 2, blend=0.0)
    layer = 1
    width = CHANNELS[layer]
    modulation.scale[layer] = torch.stack([torch.full((width,), 0.5), torch.linspace(-0.5, 0.5, width)])
    modulation.shift[layer] = torch.stack([torch.zeros(width), torch.full((width,), -0.3)])
    with torch.no_grad():
        out = mod.embed(model, x, modulation)
        for t in range(2):
            changed = copy.deepcopy(model)
            bn = batchnorm_layers(changed)[layer]
            bn.weight.mul_(1 + modulation.scale[layer][t])
            bn.bias.add_(modulation.shift[layer][t])
            torch.testing.assert_close(out[t], changed.embed(x[t]), atol=ATOL, rtol=1e-5)
    assert not torch.allclose(out, mod.embed(model, x, mod.identity(model, 2)), atol=1e-3)


@pytest.mark.parametrize("split", range(len(CHANNELS)))
def test_trunk_then_top_is_embed_at_every_split(split):
    """The split forward (the blocks below ``split`` once, the rest per inner step) is the whole forward."""
    model, x = backbone(), task_images()
    modulation = random_modulation(model)
    with torch.no_grad():
        pre = mod.trunk(model, x, modulation, split)
        out = mod.top(model, pre, modulation, split, T)
        whole = mod.embed(model, x, modulation)
    assert pre.shape[0] == T * N and pre.shape[1] == CHANNELS[split]
    torch.testing.assert_close(out, whole, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("split", range(len(CHANNELS)))
def test_what_is_computed_once_changes_nothing(split):
    """The first convolution computed once (first_conv, shared by every modulation of the same images) and the
    task moments of the split block's input computed once (pre_moments): the same embedding to the last bit."""
    model, x = backbone(), task_images()
    modulation = random_modulation(model)
    with torch.no_grad():
        pre = mod.trunk(model, x, modulation, split)
        given = mod.trunk(model, x, modulation, split, mod.first_conv(model, x))
        assert torch.equal(given, pre)
        out = mod.top(model, pre, modulation, split, T)
        assert torch.equal(mod.top(model, pre, modulation, split, T, mod.pre_moments(pre, T)), out)
        other = mod.pre_moments(mod.trunk(model, 1.0 - x, modulation, split), T)  # moments of other activations
        assert not torch.allclose(mod.top(model, pre, modulation, split, T, other), out, atol=1e-3)


def test_constant_stored_statistics_skip_the_task_moments(monkeypatch):
    """Where every blend is a constant 0 the task's moments are not computed (they are weighted 0): the same
    gain and bias to the last bit; a blend that is not 0, or that carries a gradient, computes them."""
    model, x = backbone(), task_images()
    conv, bn = blocks(model)[0]
    grouped = conv(x.flatten(0, 1)).detach().view(T, N, -1, 14, 14)
    scale, shift = 0.3 * torch.randn(T, CHANNELS[0]), 0.3 * torch.randn(T, CHANNELS[0])
    zero = torch.zeros(T)
    mixture = mod.affine(grouped, bn, zero, scale, shift, mod.task_moments(grouped))  # the moments given, weighted 0
    calls = []
    real = mod.task_moments
    monkeypatch.setattr(mod, "task_moments", lambda g: calls.append(1) or real(g))
    skipped = mod.affine(grouped, bn, zero, scale, shift)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(skipped, mixture))
    mod.affine(grouped, bn, zero.clone().requires_grad_(True), scale, shift)
    mod.affine(grouped, bn, torch.full((T,), 0.5), scale, shift)
    assert len(calls) == 2


def test_a_split_beyond_the_last_block_is_refused():
    """trunk at a split the backbone does not have: a ValueError naming the number of blocks."""
    model = backbone()
    with pytest.raises(ValueError, match=f"has {len(CHANNELS)} blocks"):
        mod.trunk(model, task_images(1), mod.identity(model, 1), len(CHANNELS))


def test_tasks_are_independent():
    """A batch of tasks gives what each task gives alone; changing one task's images changes only its embedding."""
    model, x = backbone(), task_images()
    modulation = random_modulation(model)
    with torch.no_grad():
        batched = mod.embed(model, x, modulation)
        for t in range(T):
            torch.testing.assert_close(batched[t], mod.embed(model, x[t:t + 1], task_slice(modulation, t))[0],
                                       atol=ATOL, rtol=1e-5)
        changed = x.clone()
        changed[1] = 1.0 - changed[1]
        other = mod.embed(model, changed, modulation)
    torch.testing.assert_close(other[0], batched[0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(other[2], batched[2], atol=ATOL, rtol=1e-5)
    assert not torch.allclose(other[1], batched[1], atol=1e-3)


def test_embed_beside_reads_other_images_with_the_tasks_statistics():
    """Other images are normalised with the task's statistics only: the task's own images as 'other' give the task's
    embedding, an image's embedding does not depend on the other images beside it, and with blend 0 (stored
    statistics) it is the plain backbone's."""
    model, x = backbone(), task_images()
    modulation = random_modulation(model)
    other = task_images(T, M, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(mod.embed_beside(model, x, x, modulation), mod.embed(model, x, modulation),
                                   atol=ATOL, rtol=1e-5)
        beside = mod.embed_beside(model, x, other, modulation)
        assert beside.shape == (T, M, EMBED_DIM)
        torch.testing.assert_close(mod.embed_beside(model, x, other[:, :2], modulation), beside[:, :2],
                                   atol=ATOL, rtol=1e-5)
        flipped = mod.embed_beside(model, 1.0 - x, other, modulation)  # other task statistics: other embeddings
        assert not torch.allclose(flipped, beside, atol=1e-3)
        stored = mod.embed_beside(model, x, other, mod.identity(model, T, blend=0.0))
        torch.testing.assert_close(stored, model.embed(other.flatten(0, 1)).view(T, M, EMBED_DIM),
                                   atol=ATOL, rtol=1e-5)


def test_gradients_reach_every_modulation_tensor():
    """The modulated embedding is differentiable in FiLM scale, shift and blend of every layer (the inner loop and
    the hypernetwork's heads learn through it)."""
    model, x = backbone(), task_images(2)
    modulation = random_modulation(model, 2)
    tensors = modulation.tensors()
    for t in tensors.values():
        t.requires_grad_(True)
    out = mod.embed(model, x, mod.Modulation.from_tensors(tensors, len(CHANNELS)))
    grads = torch.autograd.grad(out.pow(2).sum(), list(tensors.values()))
    for name, grad in zip(tensors, grads):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_modulation_helpers():
    """tensors/from_tensors round-trip; with_blend sets every blend; detached cuts the graph; num_tasks is T."""
    model = backbone()
    modulation = random_modulation(model)
    tensors = modulation.tensors()
    assert sorted(tensors) == sorted(f"{k}.{l}" for k in ("scale", "shift", "blend") for l in range(len(CHANNELS)))
    back = mod.Modulation.from_tensors(tensors, len(CHANNELS))
    for kind in ("scale", "shift", "blend"):
        assert all(a is b for a, b in zip(getattr(back, kind), getattr(modulation, kind)))
    ones = modulation.with_blend(1.0)
    assert all(torch.equal(b, torch.ones(T)) for b in ones.blend) and ones.scale is modulation.scale
    assert all(torch.equal(b, before) for b, before in zip(modulation.blend, back.blend))  # the original unchanged
    graph = mod.Modulation(*([t.clone().requires_grad_(True) * 2 for t in getattr(modulation, k)]
                             for k in ("scale", "shift", "blend")))
    assert all(t.grad_fn is None for t in graph.detached().tensors().values())
    assert modulation.num_tasks == T
