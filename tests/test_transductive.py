"""The transductive stage: the backbone adapted (SCAN-style) to a held-out dataset's unlabeled train split."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hmlib.backbone.transductive as transductive
import hmlib.data
from datafactory import balanced_labels, class_patterns
from fakes import FakeData, install_fake_data
from hmlib.artifacts import (ArtifactError, MissingArtifactError, StaleArtifactError, load_checkpoint,
                             save_checkpoint, state_fingerprint)
from hmlib.backbone import adapt_batchnorm, embed_images, embed_split, get_backbone, get_transductive_backbone
from hmlib.backbone.model import ConvBackbone, batchnorm_layers
from hmlib.backbone.embeddings import training_confidence
from hmlib.backbone.transductive import (adaptation_images, coarse_silhouette, decides_before_adapting, gate,
                                        gate_message, gate_samples, mine_neighbours, recognised, scan_loss)
from hmlib.config import load_config
from hmlib.features import cache_path

# Tiny sizes
NUM_IMAGES = 80  # per fake dataset split
MAX_IMAGES = 100  # transductive.max_images (the smallest allowed): every fake train image is used
EPOCHS = 2
TINY_BACKBONE = {"channels": [4, 8], "embed_dim": 8, "epochs": 1, "images_per_dataset": 32, "batch_size": 16}
# the adaptation's mechanics are tested with the gate off (the gate's own tests below turn it on)
TINY_TRANSDUCTIVE = {"epochs": EPOCHS, "max_images": MAX_IMAGES, "neighbours": 3, "clusters": 4, "batch_size": 32,
                     "lr": 1e-3, "gate": "off"}
DATASET = "mnist"
MAKE_IT = "hmlib run --profile smoke --only 03"


@pytest.fixture
def fake_data(monkeypatch) -> FakeData:
    """Synthetic ImageSets in place of hmlib.data.load_split; records every (name, split) loaded."""
    return install_fake_data(monkeypatch, NUM_IMAGES, extra_test=5)


def tiny_cfg(**transductive_overrides):
    return load_config("smoke", overrides={"backbone": TINY_BACKBONE,
                                           "transductive": {**TINY_TRANSDUCTIVE, **transductive_overrides}})


def _backbone(cfg):
    """The meta-training backbone of seed 0 (trained on the fake meta-training datasets) and its meta."""
    return get_backbone(cfg, 0, progress=False, verbose=False)


def _adapt(cfg, backbone, meta, **kwargs):
    return get_transductive_backbone(cfg, backbone, meta, DATASET, progress=False, **kwargs)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def _use_home(monkeypatch, home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HMLIB_HOME", str(home))


# ------------------------------------------------------------------------------------------ the parts

def test_scan_loss_rewards_agreement_with_neighbours_and_every_cluster_in_use():
    """SCAN: -log <p, q> averaged, minus entropy_weight * entropy of the mean prediction; confident agreement over
    balanced clusters is best, a collapse onto one cluster or disagreement with the neighbour costs."""
    K, confident = 4, 30.0
    balanced = confident * F.one_hot(torch.arange(12) % K, K).float()
    collapsed = confident * F.one_hot(torch.zeros(12, dtype=torch.long), K).float()
    log_k = math.log(K)
    assert scan_loss(balanced, balanced, 2.0).item() == pytest.approx(-2.0 * log_k, abs=1e-4)
    assert scan_loss(collapsed, collapsed, 2.0).item() == pytest.approx(0.0, abs=1e-4)
    assert scan_loss(balanced, balanced.roll(1, dims=0), 2.0) > 10.0  # confident and disagreeing
    logits, partners = torch.randn(12, K), torch.randn(12, K)
    p, q = logits.softmax(-1), partners.softmax(-1)
    mean = p.mean(0)
    expected = -torch.log((p * q).sum(-1)).mean() + 0.5 * (mean * mean.log()).sum()
    torch.testing.assert_close(scan_loss(logits, partners, 0.5), expected, atol=1e-5, rtol=1e-5)


def test_mined_neighbours_are_other_images_of_the_same_kind():
    """Neighbours (n, k) never include the image itself; on clearly distinct patterns they share its class; the
    batch size of the search changes nothing."""
    labels = balanced_labels(40, 4, seed=0)
    images = class_patterns(labels, 4, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ConvBackbone((4, 8), 8, 3).eval()
    neighbours = mine_neighbours(model, images, 3)
    assert neighbours.shape == (40, 3) and neighbours.dtype.kind == "i"
    assert not np.any(neighbours == np.arange(40)[:, None])
    assert np.mean(labels[neighbours] == labels[:, None]) > 0.9
    np.testing.assert_array_equal(mine_neighbours(model, images, 3, batch=7), neighbours)


def test_adaptation_images_are_an_evenly_spaced_deterministic_sample():
    """At most transductive.max_images, evenly spaced from first to last; a small split is used whole."""
    images = np.arange(250, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)
    image_set = hmlib.data.ImageSet("d", "train", images, np.zeros(250, np.int64), ["0"], "f")
    cfg = tiny_cfg(max_images=100)
    sample = adaptation_images(cfg, image_set)
    assert len(sample) == 100 and sample[0, 0, 0] == 0 and sample[-1, 0, 0] == 249
    assert np.all(np.diff(sample[:, 0, 0].astype(int)) > 0)
    np.testing.assert_array_equal(adaptation_images(cfg, image_set), sample)
    small = dataclasses.replace(image_set, images=images[:60], labels=np.zeros(60, np.int64))
    assert adaptation_images(cfg, small) is small.images


# ------------------------------------------------------------------------------------------ get_transductive_backbone

def test_adaptation_trains_on_the_train_split_and_describes_itself(fake_data, capsys):
    """The adapted backbone reads the dataset's train split only, is a new model (the original is untouched) trained
    to a lower SCAN loss, and its checkpoint records settings, starting backbone, images and the adapted weights'
    identity."""
    cfg = tiny_cfg()
    backbone, meta = _backbone(cfg)
    before = _state(backbone)
    fake_data.loaded.clear()
    adapted, adapted_meta = _adapt(cfg, backbone, meta)
    assert fake_data.loaded == [(DATASET, "train")]
    _assert_same_state(before, _state(backbone))
    assert not adapted.training and adapted is not backbone
    assert not torch.equal(adapted.state_dict()["embedding.weight"], backbone.state_dict()["embedding.weight"])
    path = Path(adapted_meta["path"])
    assert path.parent.name == "models" and path.name.startswith(f"{meta['name'].split('-')[0]}_on-{DATASET}-")
    assert adapted_meta["name"] == path.stem and adapted_meta["reused"] is False
    _, recorded = load_checkpoint(path)
    assert recorded["kind"] == "transductive_backbone" and recorded["complete"] and recorded["epoch"] == EPOCHS
    assert recorded["backbone_id"] == meta["backbone_id"] and recorded["dataset"] == DATASET
    assert recorded["data_fingerprint"] == hmlib.data.load_split(DATASET, "train", cfg.data).fingerprint
    assert recorded["settings"]["epochs"] == EPOCHS and "retrain" not in recorded["settings"]
    assert [h["epoch"] for h in recorded["history"]] == list(range(1, EPOCHS + 1))
    losses = [h["loss"] for h in recorded["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]  # training lowers its SCAN objective
    assert adapted_meta["backbone_id"] == recorded["adapted_id"]
    assert adapted_meta["backbone_id"] != meta["backbone_id"]
    assert "Adapting" in capsys.readouterr().out


def test_a_matching_checkpoint_is_reused_and_other_settings_make_another(fake_data, monkeypatch):
    """A finished checkpoint of the same settings, backbone and images is loaded, not retrained; other settings
    are another file and the first one stays."""
    cfg = tiny_cfg()
    backbone, meta = _backbone(cfg)
    first, first_meta = _adapt(cfg, backbone, meta)

    def must_not_train(*args, **kwargs):
        raise AssertionError("a matching finished checkpoint must be reused")

    with monkeypatch.context() as patch:
        patch.setattr(transductive, "train_transductive", must_not_train)
        again, again_meta = _adapt(cfg, backbone, meta)
        assert again_meta["reused"] is True and again_meta["backbone_id"] == first_meta["backbone_id"]
        _assert_same_state(_state(first), _state(again))
        _, train_false = _adapt(cfg, backbone, meta, train=False)
        assert train_false["reused"] and train_false["path"] == first_meta["path"]
    _, other = _adapt(tiny_cfg(lr=5e-4), backbone, meta)
    assert other["path"] != first_meta["path"] and not other["reused"] and Path(first_meta["path"]).is_file()


def test_a_contrastive_term_adapts_otherwise_and_names_its_checkpoint_apart(fake_data):
    """transductive.contrastive > 0 adds two-view NT-Xent to SCAN's loss: other weights, another checkpoint; at 0
    the identity has no such setting, so every adaptation made before the option keeps its name."""
    cfg, contrast = tiny_cfg(), tiny_cfg(contrastive=1.0)
    backbone, meta = _backbone(cfg)
    plain, plain_meta = _adapt(cfg, backbone, meta)
    adapted, adapted_meta = _adapt(contrast, backbone, meta)
    assert adapted_meta["path"] != plain_meta["path"] and not adapted_meta["reused"]
    assert not torch.equal(plain.embedding.weight, adapted.embedding.weight)
    image_set = hmlib.data.load_split(DATASET, "train", cfg.data)
    assert "contrastive" not in transductive.transductive_identity(cfg, meta, image_set)["settings"]
    assert transductive.transductive_identity(contrast, meta, image_set)["settings"]["contrastive"] == 1.0


def test_epochs_zero_re_estimates_the_statistics_only(fake_data):
    """transductive.epochs = 0: the weights are the backbone's, the normalisation statistics those of the dataset's
    train images (AdaBN); the checkpoint is complete and reused."""
    cfg = tiny_cfg(epochs=0)
    backbone, meta = _backbone(cfg)
    adapted, adapted_meta = _adapt(cfg, backbone, meta)
    expected = adapt_batchnorm(backbone, adaptation_images(cfg, hmlib.data.load_split(DATASET, "train", cfg.data)))
    _assert_same_state(_state(expected), _state(adapted))
    original = dict(backbone.named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in adapted.named_parameters())
    assert not torch.equal(batchnorm_layers(adapted)[0].running_mean, batchnorm_layers(backbone)[0].running_mean)
    _, recorded = load_checkpoint(adapted_meta["path"])
    assert recorded["complete"] and recorded["epoch"] == 0 and recorded["history"] == []
    assert _adapt(cfg, backbone, meta)[1]["reused"]


def test_the_same_settings_make_the_same_checkpoint_head_included(fake_data, tmp_path, monkeypatch):
    """Two homes, the same settings: the adapted checkpoints hold the same tensors, the clustering head included, with
    training (epochs > 0) and without (epochs = 0, where the head is the seeded initial one, never a fresh random one)."""
    for epochs in (0, EPOCHS):
        cfg = tiny_cfg(epochs=epochs)
        states = []
        for run in ("first", "second"):
            _use_home(monkeypatch, tmp_path / f"{run}_{epochs}")
            backbone, meta = _backbone(cfg)
            states.append(load_checkpoint(_adapt(cfg, backbone, meta)[1]["path"])[0])
        _assert_same_state(states[0]["model"], states[1]["model"])
        _assert_same_state(states[0]["head"], states[1]["head"])


def test_adaptation_never_reads_the_test_split_or_any_label(fake_data, tmp_path, monkeypatch):
    """Shuffled and poisoned labels of the train split give bit-identical adapted weights: labels are never read;
    nor is the test split ever loaded."""
    cfg = tiny_cfg()
    _use_home(monkeypatch, tmp_path / "clean")
    backbone, meta = _backbone(cfg)
    clean, _ = _adapt(cfg, backbone, meta)
    original = hmlib.data.load_split

    def poisoned(name, split, data_cfg, **kwargs):
        image_set = original(name, split, data_cfg, **kwargs)
        if name != DATASET:
            return image_set
        labels = np.random.default_rng(5).permutation(image_set.labels) + 1000  # other labels, same fingerprint
        return dataclasses.replace(image_set, labels=labels, label_names=["poison"] * 1004)

    monkeypatch.setattr(hmlib.data, "load_split", poisoned)
    _use_home(monkeypatch, tmp_path / "poisoned")
    fake_data.loaded.clear()
    poisoned_model, poisoned_meta = _adapt(cfg, backbone, meta)
    assert not poisoned_meta["reused"]
    _assert_same_state(_state(clean), _state(poisoned_model))
    assert all(split == "train" for _, split in fake_data.loaded)


def test_the_adapted_backbone_embeds_into_a_cache_of_its_own(fake_data):
    """Embeddings under the adapted backbone are cached under its name and identity, apart from the original's."""
    cfg = tiny_cfg()
    backbone, meta = _backbone(cfg)
    adapted, adapted_meta = _adapt(cfg, backbone, meta)
    test_set = hmlib.data.load_split(DATASET, "test", cfg.data)
    plain, own = embed_split(backbone, meta, test_set), embed_split(adapted, adapted_meta, test_set)
    assert own.backbone_id == adapted_meta["backbone_id"] != plain.backbone_id
    np.testing.assert_array_equal(own.embeddings, embed_images(adapted, test_set.images))
    assert not np.allclose(own.embeddings, plain.embeddings)
    assert cache_path("embeddings", adapted_meta["name"], DATASET, "test").is_file()
    assert cache_path("embeddings", meta["name"], DATASET, "test").is_file()


def test_train_false_never_trains(fake_data):
    """Without a checkpoint, train=False and retrain='never' raise MissingArtifactError naming file and command."""
    for cfg, kwargs in ((tiny_cfg(), {"train": False}), (tiny_cfg(retrain="never"), {})):
        backbone, meta = _backbone(cfg)
        with pytest.raises(MissingArtifactError) as err:
            _adapt(cfg, backbone, meta, **kwargs)
        text = str(err.value)
        assert f"_on-{DATASET}-" in text and "not found" in text and MAKE_IT in text
    models = Path(meta["path"]).parent
    assert not list(models.glob(f"*_on-{DATASET}-*"))


def _interrupt_scan_loss_at_call(monkeypatch, call: int) -> None:
    """Make the ``call``-th SCAN loss of training raise KeyboardInterrupt (Ctrl-C mid-epoch)."""
    original, calls = transductive.scan_loss, []

    def interrupting(*args):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(transductive, "scan_loss", interrupting)


def test_an_interrupted_adaptation_resumes_to_the_same_weights(fake_data, tmp_path, monkeypatch, capsys):
    """Stopped in epoch 2, the checkpoint of epoch 1 is unfinished (train=False refuses it); the next call resumes
    at epoch 1 and ends with the weights of an uninterrupted run."""
    cfg = tiny_cfg()
    steps_per_epoch = math.ceil(NUM_IMAGES / TINY_TRANSDUCTIVE["batch_size"])
    _use_home(monkeypatch, tmp_path / "whole")
    backbone, meta = _backbone(cfg)
    whole, whole_meta = _adapt(cfg, backbone, meta)
    _use_home(monkeypatch, tmp_path / "interrupted")
    with monkeypatch.context() as patch:
        _interrupt_scan_loss_at_call(patch, steps_per_epoch + 2)
        with pytest.raises(KeyboardInterrupt):
            _adapt(cfg, backbone, meta)
    path = tmp_path / "interrupted" / "models" / Path(whole_meta["path"]).name
    _, recorded = load_checkpoint(path)
    assert recorded["complete"] is False and recorded["epoch"] == 1 and len(recorded["history"]) == 1
    with pytest.raises(MissingArtifactError, match="is unfinished"):
        _adapt(cfg, backbone, meta, train=False)
    capsys.readouterr()
    resumed, resumed_meta = _adapt(cfg, backbone, meta)
    assert f"Resuming the transductive backbone {path.name} at epoch 1/{EPOCHS}" in capsys.readouterr().out
    _assert_same_state(_state(whole), _state(resumed))
    assert resumed_meta["backbone_id"] == whole_meta["backbone_id"]
    assert [h["loss"] for h in resumed_meta["history"]] == [h["loss"] for h in whole_meta["history"]]
    assert load_checkpoint(path)[1]["complete"]


def test_a_stale_or_corrupt_checkpoint_is_set_aside(fake_data, capsys):
    """A file at the checkpoint's name made from other inputs, or a corrupt one, is refused with train=False and
    otherwise kept under a new name while a new one is trained."""
    cfg = tiny_cfg()
    backbone, meta = _backbone(cfg)
    _, adapted_meta = _adapt(cfg, backbone, meta)
    path = Path(adapted_meta["path"])
    state, recorded = load_checkpoint(path)
    save_checkpoint(path, state, {**recorded, "data_fingerprint": "other images"})
    stale = path.read_bytes()
    with pytest.raises(StaleArtifactError, match="data_fingerprint"):
        _adapt(cfg, backbone, meta, train=False)
    assert path.read_bytes() == stale
    capsys.readouterr()
    _, again = _adapt(cfg, backbone, meta)
    assert not again["reused"] and "cannot be reused" in capsys.readouterr().out
    assert (path.parent / f"{path.stem}.stale-1.pt").read_bytes() == stale
    assert again["backbone_id"] == adapted_meta["backbone_id"]  # the same settings train the same weights
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ArtifactError, match="corrupt"):
        _adapt(cfg, backbone, meta, train=False)
    assert not _adapt(cfg, backbone, meta)[1]["reused"]
    assert (path.parent / f"{path.stem}.corrupt-1.pt").read_bytes() == b"not a checkpoint"


def test_the_report_curve_is_recorded_and_changes_nothing(fake_data, tmp_path, monkeypatch):
    """``curve`` is evaluated before training and after every epoch and recorded; the weights are those of a run
    without it."""
    cfg = tiny_cfg()
    _use_home(monkeypatch, tmp_path / "plain")
    backbone, meta = _backbone(cfg)
    plain, _ = _adapt(cfg, backbone, meta)
    _use_home(monkeypatch, tmp_path / "curve")
    seen = []

    def curve(model):
        seen.append(model.training)
        return float(len(seen))

    with_curve, curve_meta = _adapt(cfg, backbone, meta, curve=curve)
    assert curve_meta["curve"] == [float(i) for i in range(1, EPOCHS + 2)] and seen == [False] * (EPOCHS + 1)
    _assert_same_state(_state(plain), _state(with_curve))


def test_a_non_finite_loss_stops_adaptation(fake_data, monkeypatch):
    """A NaN SCAN loss stops with an ArtifactError naming transductive.lr; no finished checkpoint is written."""
    cfg = tiny_cfg()
    backbone, meta = _backbone(cfg)
    monkeypatch.setattr(transductive, "scan_loss", lambda logits, *a: logits.sum() * float("nan"))
    with pytest.raises(ArtifactError, match="transductive.lr"):
        _adapt(cfg, backbone, meta)
    assert not list(Path(meta["path"]).parent.glob(f"*_on-{DATASET}-*"))


# ------------------------------------------------------------------------------------------ when not to adapt

def _blobs(n: int, separated: bool, seed: int = 0) -> np.ndarray:
    """(n, 8) rows: four well-separated clusters, or one shapeless cloud."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(8)[:4] if separated else np.zeros((4, 8))
    return (centres[np.arange(n) % 4] + rng.normal(size=(n, 8))).astype(np.float32)


def _scripted_embeddings(monkeypatch, rows_of: dict) -> list:
    """embed_images in the transductive module returns rows_of[id(backbone)](images); returns the calls' sizes."""
    calls = []

    def embed(model, images):
        calls.append(len(images))
        return rows_of[id(model)](images)

    monkeypatch.setattr(transductive, "embed_images", embed)
    return calls


def test_gate_samples_are_deterministic_and_come_from_outside_the_adaptation_sample():
    """transductive.gate_repeats subsamples of transductive.gate_images distinct images each, none of them in the
    adaptation sample, the same on every call; all images are candidates when the adaptation uses every one."""
    cfg = tiny_cfg(max_images=100, gate_images=50, gate_repeats=4)
    samples = gate_samples(cfg, 300)
    used = set(np.linspace(0, 299, 100).astype(np.int64).tolist())
    assert len(samples) == 4 and all(len(np.unique(s)) == len(s) == 50 for s in samples)
    assert not used & set(np.concatenate(samples).tolist())
    assert len({tuple(s) for s in samples}) == 4  # different subsamples
    assert all(np.array_equal(a, b) for a, b in zip(samples, gate_samples(cfg, 300)))
    small = gate_samples(tiny_cfg(max_images=100, gate_images=500, gate_repeats=2), 80)
    assert all(np.array_equal(s, np.arange(80)) for s in small)  # at most the whole set, each image once


def test_coarse_silhouette_is_high_for_separated_clusters_and_low_for_a_cloud():
    """k-means' silhouette on the standardised, normalised rows separates four blobs from one cloud, and is
    deterministic for its seed."""
    high, low = coarse_silhouette(_blobs(200, True), 4), coarse_silhouette(_blobs(200, False), 4)
    assert high > 0.3 and low < 0.15 and coarse_silhouette(_blobs(200, True), 4) == high


def test_the_gate_declines_an_adaptation_only_where_clusters_become_less_clear_beyond_the_noise(monkeypatch):
    """'silhouette': declined where the adapted embedding's coarse silhouette is lower with a t-interval over the
    subsamples below zero; kept where it is higher, and where the two are alike up to noise (two draws of a cloud);
    each image is embedded once per backbone; 'off' always keeps it without embedding anything."""
    start, adapted = object(), object()
    images = np.arange(300)  # stand-ins: the scripted embeddings read only which images they are given
    cfg = tiny_cfg(gate="silhouette", max_images=100, gate_images=100, gate_repeats=5, gate_clusters=4)
    table = {True: _blobs(300, True), False: _blobs(300, False)}
    noise = _blobs(300, False, seed=1)
    for start_clear, adapted_clear, kept in ((True, False, "start"), (False, True, "adapted"),
                                             (False, False, "adapted")):
        calls = _scripted_embeddings(monkeypatch, {
            id(start): lambda idx, c=start_clear: table[c][idx],
            id(adapted): lambda idx, c=adapted_clear: (table[c] if c else noise)[idx]})
        decision = gate(cfg, start, adapted, images)
        assert decision["kept"] == kept and decision["images"] == 100 and decision["repeats"] == 5
        low, high = decision["change_ci"]
        assert low <= decision["after"] - decision["before"] <= high and (high < 0) == (kept == "start")
        if start_clear != adapted_clear:
            assert (decision["after"] > decision["before"]) == adapted_clear
        union = len(np.unique(np.concatenate(gate_samples(cfg, len(images)))))
        assert calls == [union, union]
    calls = _scripted_embeddings(monkeypatch, {})
    assert gate(tiny_cfg(gate="off"), start, adapted, images) == {"rule": "off", "kept": "adapted"} and not calls


class _Head(torch.nn.Module):
    """A backbone stand-in for training_confidence: each image's embedding is its first pixel, mapped by a fixed
    two-class head to logits (0, pixel / 10), so its largest softmax probability rises with the pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0], [0.1]]))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)[:, :1] * 255.0


def test_training_confidence_is_the_largest_softmax_probability_of_the_training_head():
    """Per image, max softmax of head(embed(image)); 0.5 where the two classes tie, rising with the logit gap."""
    images = np.zeros((3, 28, 28), np.uint8)
    images[:, 0, 0] = (0, 10, 40)  # logit gaps 0, 1, 4
    expected = 1 / (1 + np.exp(-np.array([0.0, 1.0, 4.0])))
    np.testing.assert_allclose(training_confidence(_Head(), images), expected, rtol=1e-5)


def test_the_confidence_gate_declines_only_where_the_backbone_recognises_the_images_beyond_the_noise():
    """'confidence': declined where the starting backbone's mean confidence over the subsamples is at least
    transductive.gate_confidence with its whole interval; kept where it is below, and where the interval straddles
    the threshold; the adapted backbone is not read."""
    rng = np.random.default_rng(0)
    cfg = tiny_cfg(gate="confidence", gate_confidence=0.75, max_images=100, gate_images=50, gate_repeats=5)
    for gap, kept in ((60, "start"), (5, "adapted")):  # confidence 0.998 / 0.62
        images = np.zeros((300, 28, 28), np.uint8)
        images[:, 0, 0] = gap
        decision = gate(cfg, _Head(), None, images)  # the adaptation is not needed (decided before training it)
        assert decision["rule"] == "confidence" and decision["threshold"] == 0.75 and decision["kept"] == kept
        assert decision["images"] == 50 and decision["repeats"] == 5
        low, high = decision["confidence_ci"]
        assert low <= decision["confidence"] <= high and (low >= 0.75) == (kept == "start")
    # half the images sure (1.0), half unsure (0.505), 10 per subsample: a wide interval. A threshold between its low
    # end and the mean is not beyond the noise (kept); one just below its low end is (declined)
    images = np.zeros((300, 28, 28), np.uint8)
    images[:, 0, 0] = rng.choice([2, 255], 300)
    wide = {"max_images": 100, "gate_images": 10, "gate_repeats": 5}
    decision = gate(tiny_cfg(gate="confidence", **wide), _Head(), object(), images)
    low, mean = decision["confidence_ci"][0], decision["confidence"]
    assert mean - low > 0.02
    assert gate(tiny_cfg(gate="confidence", gate_confidence=(low + mean) / 2, **wide), _Head(), object(),
                images)["kept"] == "adapted"
    assert gate(tiny_cfg(gate="confidence", gate_confidence=low - 1e-3, **wide), _Head(), object(),
                images)["kept"] == "start"
    assert "recognises these images" in gate_message("x", gate(cfg, _Head(), object(), np.full((300, 28, 28), 60,
                                                                                                np.uint8)))


def test_recognised_declines_only_where_the_whole_interval_is_at_or_above_the_threshold():
    """The confidence rule's verdict from the subsamples' mean confidences (also what docs/lodo's recipe replays)."""
    values = np.array([0.60, 0.62, 0.61, 0.60, 0.61])
    mean, half, declined = recognised(values, 0.55)
    assert mean == pytest.approx(0.608) and half > 0 and declined
    assert not recognised(values, 0.605)[2]  # below the mean, above the interval's low end: not beyond the noise
    assert recognised(values, mean - half)[2] and not recognised(values, mean - half + 1e-9)[2]
    assert recognised(np.array([0.99]), 0.5) == (pytest.approx(0.99), None, False)  # one subsample: no interval
    assert decides_before_adapting(tiny_cfg(gate="confidence")) and decides_before_adapting(tiny_cfg(gate="off"))
    assert not decides_before_adapting(tiny_cfg(gate="silhouette"))  # reads the adapted backbone


def test_a_declined_adaptation_returns_the_starting_backbone_and_keeps_its_checkpoint(fake_data, monkeypatch,
                                                                                    capsys):
    """Where the gate declines, the starting backbone (its weights and backbone_id) is returned with the decision,
    and one line says why; the adapted checkpoint is written and reused all the same, and the gate's settings are
    not part of its identity (turning the gate off reads the same file)."""
    cfg = tiny_cfg(gate="silhouette")
    backbone, meta = _backbone(cfg)
    declined = {"rule": "silhouette", "clusters": 4, "images": 80, "repeats": 3, "before": 0.5, "after": 0.4,
                "change_ci": [-0.12, -0.08], "kept": "start"}
    with monkeypatch.context() as patch:
        patch.setattr(transductive, "gate", lambda *args: declined)
        model, model_meta = _adapt(cfg, backbone, meta)
    _assert_same_state(_state(backbone), _state(model))
    assert model is not backbone and not model.training
    assert model_meta["backbone_id"] == meta["backbone_id"] and model_meta["gate"] == declined
    out = capsys.readouterr().out
    assert "not using the adaptation" in out and "0.500 -> 0.400" in out and "used as trained" in out
    _, recorded = load_checkpoint(model_meta["path"])
    assert recorded["complete"] and recorded["adapted_id"] != meta["backbone_id"]
    monkeypatch.setattr(transductive, "train_transductive", lambda *a, **k: pytest.fail("must reuse"))
    adapted, adapted_meta = _adapt(tiny_cfg(gate="off"), backbone, meta)
    assert adapted_meta["reused"] and adapted_meta["path"] == model_meta["path"]
    assert adapted_meta["backbone_id"] == recorded["adapted_id"]
    assert adapted_meta["gate"] == {"rule": "off", "kept": "adapted"}


def test_the_gate_decides_on_real_embeddings_once_and_is_recorded(fake_data, monkeypatch):
    """Unpatched, the gate compares the two backbones on the dataset's train images, records its decision, and
    returns what it decided; asked again in the same process it is not recomputed."""
    cfg = tiny_cfg(gate="silhouette")
    backbone, meta = _backbone(cfg)
    model, model_meta = _adapt(cfg, backbone, meta)
    decision = model_meta["gate"]
    adapted, _ = _adapt(tiny_cfg(gate="off"), backbone, meta)
    images = hmlib.data.load_split(DATASET, "train", cfg.data).images
    assert gate(cfg, backbone, adapted, images) == decision
    expected = backbone if decision["kept"] == "start" else adapted
    _assert_same_state(_state(expected), _state(model))
    monkeypatch.setattr(transductive, "gate", lambda *args: pytest.fail("decided already"))
    assert _adapt(cfg, backbone, meta)[1]["gate"] == decision
