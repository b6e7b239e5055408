"""The backbone stage: model, augmentation, training, checkpoints, normalisation statistics, embedding cache
(its per-task modulation: tests/test_modulation.py; its transductive adaptation: tests/test_transductive.py)."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hmlib.backbone.embeddings as embeddings_mod
import hmlib.backbone.train as train_mod
import hmlib.data
from datafactory import balanced_labels, class_patterns
from fakes import FakeData, install_fake_data
from hmlib.artifacts import ArtifactError, MissingArtifactError, StaleArtifactError, read_json, save_checkpoint
from hmlib.backbone import (ConvBackbone, EmbeddingSet, adapt_batchnorm, augment, batch_statistics, blocks,
                            embed_images, embed_split, get_all_backbones, get_backbone, get_embeddings,
                            load_backbone, train_backbone)
from hmlib.backbone.model import batchnorm_layers
from hmlib.backbone.train import BackboneTrainingError, nt_xent
from hmlib.config import ConfigError, load_config
from hmlib.data import ImageSet
from hmlib.features import cache_path, images_to_tensor, read_features
from hmlib.protocol import train_val_indices

# Tiny sizes
BATCH = 6
CHANNELS = (4, 8)
EMBED_DIM = 8
NUM_IMAGES = 40  # per fake dataset split
EXTRA_TEST = 5
TINY_BACKBONE = {"channels": list(CHANNELS), "embed_dim": EMBED_DIM, "epochs": 1, "images_per_dataset": 32,
                 "batch_size": 16}
PATTERN_CLASSES = 4  # classes per dataset in the learning tests
PATTERN_IMAGES = 80  # train-split images per dataset in the learning tests
LEARN_BACKBONE = {"channels": [8, 16], "embed_dim": 16, "epochs": 3, "images_per_dataset": 64, "batch_size": 32,
                  "augment": 0.0, "label_smoothing": 0.0}
MAKE_IT = "hmlib run --profile smoke --only 02"


@pytest.fixture
def fake_data(monkeypatch) -> FakeData:
    """Synthetic ImageSets in place of hmlib.data.load_split; records what was loaded."""
    return install_fake_data(monkeypatch, NUM_IMAGES, EXTRA_TEST)


def tiny_cfg(**backbone_overrides):
    return load_config("smoke", overrides={"backbone": {**TINY_BACKBONE, **backbone_overrides}})


def learn_cfg():
    return load_config("smoke", overrides={"backbone": LEARN_BACKBONE})


def pattern_set(name: str, index: int, seed: int, num_images: int = PATTERN_IMAGES) -> ImageSet:
    """A dataset of bars whose angle is the class; datasets ``index`` 0, 1, ... use disjoint angles."""
    labels = balanced_labels(num_images, PATTERN_CLASSES, seed)
    images = class_patterns(labels + PATTERN_CLASSES * index, 2 * PATTERN_CLASSES, seed=seed)
    return ImageSet(name, "train", images, labels, [str(c) for c in range(PATTERN_CLASSES)], f"{name}-{seed}")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _bn_inputs(model: ConvBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    """What every BatchNorm layer of ``model`` receives for images ``x`` (one forward pass)."""
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
             for m in batchnorm_layers(model)]
    try:
        with torch.no_grad():
            model.features(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _images(num: int, seed: int = 0) -> np.ndarray:
    return class_patterns(balanced_labels(num, PATTERN_CLASSES, seed), PATTERN_CLASSES, seed=seed)


# ------------------------------------------------------------------------------------ model and augmentation

@pytest.mark.parametrize("channels", [(4,), (4, 8, 8)])
def test_shapes(channels):
    """embed gives (B, embed_dim), forward the training head's (B, num_classes) logits; one block per width."""
    model = ConvBackbone(channels, EMBED_DIM, 5)
    x = torch.rand(BATCH, 1, 28, 28)
    assert model.embed(x).shape == (BATCH, EMBED_DIM)
    assert model(x).shape == (BATCH, 5)
    assert len(batchnorm_layers(model)) == len(channels)
    pairs = blocks(model)  # (convolution, normalisation) of every block, in order
    assert [(conv.out_channels, bn.num_features) for conv, bn in pairs] == [(c, c) for c in channels]
    assert [bn for _, bn in pairs] == batchnorm_layers(model)
    assert (model.channels, model.embed_dim, model.num_classes) == (tuple(channels), EMBED_DIM, 5)


def test_augment_strength_zero_is_the_identity():
    """Strength 0 (or less) returns the images unchanged."""
    x = torch.rand(BATCH, 1, 28, 28)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), 0.0), x)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), -1.0), x)


def test_augment_is_deterministic_under_a_fixed_generator():
    """The same generator seed gives the same images, another seed others; stronger moves pixels further."""
    x = images_to_tensor(_images(BATCH))
    out = augment(x, torch.Generator().manual_seed(3), 1.0)
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(3), 1.0))
    assert not torch.equal(out, augment(x, torch.Generator().manual_seed(4), 1.0))
    weak = augment(x, torch.Generator().manual_seed(3), 0.1)
    assert (weak - x).abs().mean() < (out - x).abs().mean()


def test_augment_leaves_the_global_random_stream_alone():
    """Augmentation draws from its generator only, not from torch's global stream."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    augment(torch.rand(BATCH, 1, 28, 28, generator=torch.Generator().manual_seed(1)),
            torch.Generator().manual_seed(2), 1.0)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------ normalisation statistics

def _odd_statistics(model: ConvBackbone) -> ConvBackbone:
    """The model in eval mode with running statistics far from any batch's (mean 5, variance 9)."""
    for layer in batchnorm_layers(model):
        layer.running_mean.fill_(5.0)
        layer.running_var.fill_(9.0)
    return model.eval()


def test_batch_statistics_normalises_with_the_batch_and_stores_nothing():
    """Inside the block BatchNorm uses the batch's statistics; running statistics, modes and momenta stay."""
    model = _odd_statistics(ConvBackbone(CHANNELS, EMBED_DIM, 3))
    first = batchnorm_layers(model)[0]
    outputs: list[torch.Tensor] = []
    first.register_forward_hook(lambda _m, _args, out: outputs.append(out.detach()))
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = images_to_tensor(_images(16))
    with torch.no_grad():
        with batch_statistics(model):
            inside = model.embed(x)
        outside = model.embed(x)
    in_bn, out_bn = outputs
    assert torch.allclose(in_bn.mean(dim=(0, 2, 3)), torch.zeros(CHANNELS[0]), atol=1e-5)
    assert torch.allclose(in_bn.var(dim=(0, 2, 3), unbiased=False), torch.ones(CHANNELS[0]), atol=5e-3)  # eps
    assert not torch.allclose(out_bn.mean(dim=(0, 2, 3)), torch.zeros(CHANNELS[0]), atol=0.1)
    reference = copy.deepcopy(model).train()  # train mode: normalise with the batch's statistics
    with torch.no_grad():
        assert torch.allclose(inside, reference.embed(x), atol=1e-6)
    assert not torch.allclose(inside, outside, atol=1e-3)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    _assert_same_state(before, after)
    assert not model.training and all(not m.training and m.momentum == 0.1 for m in batchnorm_layers(model))


def test_batch_statistics_restores_the_model_after_an_error():
    """An exception inside the block still restores train/eval modes and momenta."""
    model = _odd_statistics(ConvBackbone(CHANNELS, EMBED_DIM, 3))
    with pytest.raises(RuntimeError, match="boom"):
        with batch_statistics(model):
            raise RuntimeError("boom")
    assert all(not m.training and m.momentum == 0.1 for m in batchnorm_layers(model))


def test_adapt_batchnorm_estimates_the_data_statistics_on_a_copy():
    """adapt_batchnorm returns a copy whose running statistics are those of the images; the original is unchanged."""
    model = _odd_statistics(ConvBackbone(CHANNELS, EMBED_DIM, 3))
    before = _state(model)
    images = _images(64)
    adapted = adapt_batchnorm(model, images, batch_size=64)  # one batch: statistics of all the images
    assert adapted is not model and not adapted.training
    _assert_same_state(before, _state(model))
    reference = copy.deepcopy(model).train()  # what each layer sees when normalising with these images
    for layer, seen in zip(batchnorm_layers(adapted), _bn_inputs(reference, images_to_tensor(images))):
        assert torch.allclose(layer.running_mean, seen.mean(dim=(0, 2, 3)), atol=1e-5)
        assert torch.allclose(layer.running_var, seen.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
        assert layer.momentum == 0.1 and not layer.training
    params = dict(model.named_parameters())
    for name, value in adapted.named_parameters():
        assert torch.equal(value, params[name]) and value.data_ptr() != params[name].data_ptr()


def test_adapt_batchnorm_averages_equal_batches():
    """In equal batches the running mean is the mean over all the images, whatever the batch size."""
    model = _odd_statistics(ConvBackbone(CHANNELS, EMBED_DIM, 3))
    images = _images(64)
    whole = adapt_batchnorm(model, images, batch_size=64)
    quarters = adapt_batchnorm(model, images, batch_size=16)
    first_whole, first_quarters = batchnorm_layers(whole)[0], batchnorm_layers(quarters)[0]
    assert torch.allclose(first_whole.running_mean, first_quarters.running_mean, atol=1e-5)
    assert int(first_quarters.num_batches_tracked) == 4
    assert not torch.allclose(first_quarters.running_mean, torch.full_like(first_quarters.running_mean, 5.0))


# ------------------------------------------------------------------------------------ training

def test_training_on_class_patterns_raises_accuracy():
    """Training on two pattern datasets learns their union of classes: accuracy rises from chance to near 1."""
    sets = [pattern_set("fashion_mnist", 0, seed=0), pattern_set("hebrew_chars", 1, seed=1)]
    model, record = train_backbone(sets, learn_cfg(), seed=0, progress=False)
    history = record["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and record["metrics"]["num_classes"] == 2 * PATTERN_CLASSES
    assert history[0]["train_accuracy"] < 0.6 and history[-1]["train_accuracy"] >= 0.9
    assert history[-1]["loss"] < history[0]["loss"]
    assert not model.training
    labels = np.arange(40) % (2 * PATTERN_CLASSES)  # fresh images of every class of both datasets
    with torch.no_grad():
        predicted = model(images_to_tensor(class_patterns(labels, 2 * PATTERN_CLASSES, seed=9))).argmax(1).numpy()
    assert (predicted == labels).mean() >= 0.8  # chance: 1/8


def test_nt_xent_rewards_views_that_find_each_other():
    """SimCLR's loss is low where each view's nearest row is its partner, high where the pairing is random, and it
    reaches both views' embeddings through the gradient."""
    base = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    paired_views = torch.cat([base, base + 0.01 * torch.randn(16, 8, generator=torch.Generator().manual_seed(1))])
    shuffled = torch.cat([base, base[torch.randperm(16, generator=torch.Generator().manual_seed(2))]])
    assert float(nt_xent(paired_views, 0.2)) < 0.5 < 2.0 < float(nt_xent(shuffled, 0.2))
    embedded = paired_views.clone().requires_grad_(True)
    nt_xent(embedded, 0.2).backward()
    assert torch.isfinite(embedded.grad).all() and embedded.grad[:16].abs().sum() > 0 < embedded.grad[16:].abs().sum()


def test_the_contrastive_term_trains_another_backbone_and_names_it_apart():
    """With backbone.contrastive > 0 (the default) the backbone learns from two views per image (other weights, still
    the classes); at 0 the identity has no contrastive settings, so a backbone made before the option keeps its name."""
    sets = [pattern_set("fashion_mnist", 0, seed=0), pattern_set("hebrew_chars", 1, seed=1)]
    contrast_cfg = learn_cfg()
    assert contrast_cfg.backbone.contrastive == 0.3 and contrast_cfg.backbone.contrastive_head == 128  # the default
    plain_cfg = dataclasses.replace(contrast_cfg, backbone=dataclasses.replace(contrast_cfg.backbone, contrastive=0.0))
    plain, _ = train_backbone(sets, plain_cfg, seed=0, progress=False)
    contrast, record = train_backbone(sets, contrast_cfg, seed=0, progress=False)
    assert record["history"][-1]["train_accuracy"] >= 0.9
    assert not torch.equal(plain.embedding.weight, contrast.embedding.weight)
    identity = train_mod.backbone_identity(plain_cfg, 0, {})
    assert not [key for key in identity["settings"] if key.startswith("contrastive")]
    other = train_mod.backbone_identity(contrast_cfg, 0, {})["settings"]
    assert other["contrastive"] == 0.3 and other["contrastive_temperature"] == plain_cfg.backbone.contrastive_temperature


def test_the_validation_part_is_never_trained_on():
    """Changing only the validation images leaves every weight identical; changing the training part does not."""
    # the split (train_val_indices) is drawn from the labels, so only images change
    cfg = load_config("smoke", overrides={"backbone": {**TINY_BACKBONE, "epochs": 2}})
    sets = [pattern_set("fashion_mnist", 0, seed=0), pattern_set("hebrew_chars", 1, seed=1)]
    reference = _state(train_backbone(sets, cfg, seed=0, progress=False)[0])

    def changed(part: int) -> list[ImageSet]:
        out = []
        for s in sets:
            index = train_val_indices(s.labels, cfg)[part]
            images = s.images.copy()
            images[index] = 255 - images[index]
            out.append(dataclasses.replace(s, images=images))
        return out

    assert all(len(train_val_indices(s.labels, cfg)[1]) > 0 for s in sets)
    _assert_same_state(reference, _state(train_backbone(changed(1), cfg, seed=0, progress=False)[0]))
    other = _state(train_backbone(changed(0), cfg, seed=0, progress=False)[0])
    assert not torch.equal(other["embedding.weight"], reference["embedding.weight"])


def test_non_finite_loss_stops_training_and_writes_nothing(fake_data, monkeypatch, hmlib_home):
    """A NaN loss stops training with BackboneTrainingError; no checkpoint is written."""
    monkeypatch.setattr(train_mod.F, "cross_entropy", lambda logits, *a, **k: logits.sum() * float("nan"))
    with pytest.raises(BackboneTrainingError, match="no checkpoint.*backbone.lr"):
        get_backbone(tiny_cfg(), 0, progress=False)
    models = hmlib_home / "models"
    assert not models.exists() or not list(models.iterdir())


# ------------------------------------------------------------------------------------ get_backbone

def test_backbone_trains_on_meta_training_datasets_only(fake_data):
    """The full backbone reads the meta-training train splits only, never the held-out dataset."""
    cfg = tiny_cfg()
    _, meta = get_backbone(cfg, 0, progress=False)
    assert sorted(fake_data.loaded) == sorted((d, "train") for d in cfg.meta.train_datasets)
    assert sorted(meta["data_fingerprints"]) == sorted(cfg.meta.train_datasets)
    assert meta["kind"] == "backbone" and meta["seed"] == 0 and meta["name"].startswith("backbone_seed0-")
    assert meta["val_fraction"] == cfg.meta.val_fraction and meta["settings"]["channels"] == list(CHANNELS)


def test_backbone_datasets_restrict_what_it_learns_from(fake_data):
    """backbone.datasets: the backbone reads only those meta-training datasets, and is a different checkpoint from
    the one that learns from all of them; setting it to all of them names the same checkpoint as leaving it unset."""
    cfg = tiny_cfg()
    first = cfg.meta.train_datasets[0]
    _, meta = get_backbone(tiny_cfg(datasets=[first]), 0, progress=False)
    assert fake_data.loaded == [(first, "train")] and list(meta["data_fingerprints"]) == [first]
    _, full = get_backbone(cfg, 0, progress=False)
    assert full["path"] != meta["path"]
    _, same = get_backbone(tiny_cfg(datasets=list(cfg.meta.train_datasets)), 0, progress=False)
    assert same["path"] == full["path"] and same["reused"]


def test_backbone_datasets_must_be_meta_training_datasets():
    with pytest.raises(ConfigError, match="backbone.datasets .*'mnist'.* not meta-training datasets"):
        tiny_cfg(datasets=["mnist"])


def test_checkpoint_round_trip_and_reuse(fake_data, capsys):
    """A trained backbone is saved, loads back to the same embeddings and is reused when settings match."""
    cfg = tiny_cfg()
    model, meta = get_backbone(cfg, 0, progress=False)
    assert meta["reused"] is False and len(meta["history"]) == TINY_BACKBONE["epochs"]
    images = _images(10)
    loaded, loaded_meta = load_backbone(meta["path"])
    np.testing.assert_array_equal(embed_images(model, images), embed_images(loaded, images))
    capsys.readouterr()
    again, again_meta = get_backbone(cfg, 0, progress=False)
    assert again_meta["reused"] is True
    assert again_meta["backbone_id"] == meta["backbone_id"] == loaded_meta["backbone_id"]
    assert "Reusing backbone" in capsys.readouterr().out
    np.testing.assert_array_equal(embed_images(again, images), embed_images(model, images))
    _, other = get_backbone(tiny_cfg(lr=1e-3), 0, progress=False)
    assert other["path"] != meta["path"] and not other["reused"] and Path(meta["path"]).is_file()


def test_load_backbone_refuses_other_kinds(tmp_path):
    """load_backbone refuses a checkpoint that is not a backbone's."""
    path = save_checkpoint(tmp_path / "v.pt", {}, {"kind": "vae"})
    with pytest.raises(ArtifactError, match="not a backbone checkpoint"):
        load_backbone(path)


def test_train_false_and_retrain_never_refuse_to_train(fake_data):
    """Without a checkpoint, train=False and retrain='never' raise MissingArtifactError naming file and command."""
    for cfg, kwargs in ((tiny_cfg(), {"train": False}), (tiny_cfg(retrain="never"), {})):
        with pytest.raises(MissingArtifactError) as err:
            get_backbone(cfg, 0, progress=False, **kwargs)
        text = str(err.value)
        assert "backbone_seed0-" in text and "not found" in text and MAKE_IT in text
    _, meta = get_backbone(tiny_cfg(), 0, progress=False)
    _, again = get_backbone(tiny_cfg(), 0, train=False, progress=False)
    assert again["reused"] and again["backbone_id"] == meta["backbone_id"]


def test_corrupt_checkpoint_is_set_aside_and_retrained(fake_data):
    """A corrupt checkpoint is refused with train=False; otherwise renamed aside (kept) and retrained."""
    _, first = get_backbone(tiny_cfg(), 0, progress=False)
    path = Path(first["path"])
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(MissingArtifactError, match="cannot be reused"):
        get_backbone(tiny_cfg(), 0, train=False, progress=False)
    assert path.read_bytes() == b"not a checkpoint"
    _, meta = get_backbone(tiny_cfg(), 0, progress=False)
    assert meta["reused"] is False and meta["backbone_id"] == first["backbone_id"]
    assert (path.parent / f"{path.stem}.corrupt-1.pt").read_bytes() == b"not a checkpoint"


def test_retrain_always_keeps_the_previous_beside(fake_data):
    """retrain='always' trains again and keeps the previous checkpoint as '.previous-1'."""
    _, first = get_backbone(tiny_cfg(), 0, progress=False)
    path = Path(first["path"])
    before = path.read_bytes()
    _, second = get_backbone(tiny_cfg(retrain="always"), 0, progress=False)
    assert not second["reused"] and second["path"] == first["path"]
    assert (path.parent / f"{path.stem}.previous-1.pt").read_bytes() == before


def test_get_all_backbones_trains_one_per_seed(fake_data):
    """Every replicate seed gets its own backbone, with its own weights."""
    cfg = load_config("smoke", overrides={"backbone": TINY_BACKBONE, "seeds": [0, 1]})
    backbones = get_all_backbones(cfg, progress=False)
    assert list(backbones) == [0, 1]
    assert len({meta["backbone_id"] for _, meta in backbones.values()}) == 2
    assert list(get_all_backbones(cfg, train=False, progress=False)) == [0, 1]


# ------------------------------------------------------------------------------------ embeddings

def test_get_embeddings_matches_contract_and_is_cached(fake_data, monkeypatch):
    """Embeddings are float32 (n, D) with int64 labels, written once and then read from the cache."""
    cfg = tiny_cfg()
    out = get_embeddings(cfg, "mnist", "test", 0, progress=False)
    _, meta = get_backbone(cfg, 0, progress=False, verbose=False)
    assert isinstance(out, EmbeddingSet) and (out.name, out.split, out.backbone_id) == ("mnist", "test",
                                                                                          meta["backbone_id"])
    assert out.embeddings.shape == (NUM_IMAGES + EXTRA_TEST, EMBED_DIM) and out.embeddings.dtype == np.float32
    assert out.labels.dtype == np.int64 and len(out) == NUM_IMAGES + EXTRA_TEST
    path = cache_path("embeddings", meta["name"], "mnist", "test")
    assert path.is_file() and read_json(path.with_suffix(".json"))["backbone_id"] == meta["backbone_id"]

    def must_not_embed(*args, **kwargs):
        raise AssertionError("a fresh cache must be read, not re-embedded")

    monkeypatch.setattr(embeddings_mod, "embed_images", must_not_embed)
    cached = get_embeddings(cfg, "mnist", "test", 0, progress=False)
    np.testing.assert_array_equal(cached.embeddings, out.embeddings)


def test_embeddings_are_reencoded_when_the_backbone_changes(fake_data, capsys):
    """A cache made by another backbone under the same name is stale: re-embedded, and says so."""
    cfg = tiny_cfg()
    model, meta = get_backbone(cfg, 0, progress=False)
    image_set = hmlib.data.load_split("mnist", "test", cfg.data)
    first = embed_split(model, meta, image_set)
    path = cache_path("embeddings", meta["name"], "mnist", "test")
    with pytest.raises(StaleArtifactError, match="backbone_id"):
        read_features(path, {**read_json(path.with_suffix(".json")), "backbone_id": "0" * 16})
    other, other_meta = get_backbone(cfg, 1, progress=False)
    capsys.readouterr()
    again = embed_split(other, {**other_meta, "name": meta["name"]}, image_set)
    out = capsys.readouterr().out
    assert "stale" in out and "backbone_id" in out
    assert again.backbone_id == other_meta["backbone_id"] != first.backbone_id
    np.testing.assert_array_equal(again.embeddings, embed_images(other, image_set.images))
    assert not np.allclose(again.embeddings, first.embeddings)


def test_embeddings_are_reencoded_when_the_images_change(fake_data, capsys):
    """A cache of other images (other fingerprint) is stale: re-embedded from the new images."""
    cfg = tiny_cfg()
    model, meta = get_backbone(cfg, 0, progress=False)
    image_set = hmlib.data.load_split("mnist", "test", cfg.data)
    first = embed_split(model, meta, image_set)
    changed = dataclasses.replace(image_set, images=255 - image_set.images, fingerprint="other images")
    capsys.readouterr()
    again = embed_split(model, meta, changed)
    assert "image_fingerprint" in capsys.readouterr().out
    np.testing.assert_array_equal(again.embeddings, embed_images(model, changed.images))
    assert not np.allclose(again.embeddings, first.embeddings)
    path = cache_path("embeddings", meta["name"], "mnist", "test")
    path.write_bytes(b"garbage")  # a corrupt cache is re-embedded too
    np.testing.assert_array_equal(embed_split(model, meta, changed).embeddings, again.embeddings)
