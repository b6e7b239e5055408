"""Same settings and seed, same weights: a stage's result depends on its own seed, not on what ran before it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hmlib.data
from datafactory import balanced_labels, class_patterns
from fakes import FakeData
from hmlib.backbone import get_backbone, get_transductive_backbone
from hmlib.backbone.model import ConvBackbone
from hmlib.config import VAEConfig, load_config
from hmlib.hyper.inputs import TaskData
from hmlib.hyper.metatrain import fit_hypernet
from hmlib.reproducibility import seeded
from hmlib.vae import get_vae
from hmlib.vae.model import build_vae
from hmlib.vae.train import encode_images

# Tiny sizes
NUM_IMAGES = 40  # per fake dataset split
TINY_VAE = {"latent_dim": 4, "epochs": 2, "batch_size": 16, "max_train_images": 64}
TINY_BACKBONE = {"channels": [4, 8], "embed_dim": 8, "epochs": 2, "images_per_dataset": 32, "batch_size": 16}
TINY_TRANSDUCTIVE = {"epochs": 2, "max_images": 100, "neighbours": 3, "clusters": 4, "batch_size": 16, "lr": 1e-3}
LATENT_DIM, NUM_CLASSES, PER_CLASS = 2, 3, 30
TINY_META = {"task": {"num_classes": NUM_CLASSES, "num_images": 24},
             "backbone": {"channels": [4, 8], "embed_dim": 8},
             "hyper": {"embed_dim": 8, "num_seeds": 2, "num_heads": 2, "num_context": 24},
             "film": {"cluster_inits": 2},
             "adapt": {"num_inner_steps": 2, "neighbours": 3},
             "meta": {"iterations": 4, "eval_every": 2, "eval_tasks": 2, "meta_batch_size": 2, "val_fraction": 0.3,
                      "max_classes": NUM_CLASSES, "task_images": 18, "shift_prob": 0.5}}
with seeded(0):  # the models meta-training reads through: the same for every run
    VAE = build_vae(VAEConfig(latent_dim=LATENT_DIM)).eval()
    BACKBONE = ConvBackbone((4, 8), 8, 3).eval()


@pytest.fixture
def fake_data(monkeypatch) -> FakeData:
    """Synthetic ImageSets in place of hmlib.data.load_split."""
    fake = FakeData(NUM_IMAGES)
    monkeypatch.setattr(hmlib.data, "load_split", fake.load_split)
    return fake


def _disturb_global_rng(run: int) -> None:
    """What a notebook kernel does between two stages: leave torch's global random stream in another state."""
    torch.manual_seed(1000 + run)
    torch.randn(77 * (run + 1))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{key} differs between two runs with the same seed"


def _trained_twice(monkeypatch, tmp_path, train) -> list[dict]:
    """Weights of ``train()`` run in two fresh homes, the global random stream disturbed differently before each."""
    states = []
    for run in range(2):
        monkeypatch.setenv("HMLIB_HOME", str(tmp_path / f"home{run}"))
        _disturb_global_rng(run)
        model, meta = train()
        assert not meta["reused"]
        states.append(_state(model))
    return states


def patterns(name: str, seed: int) -> TaskData:
    """A TaskData of NUM_CLASSES bar patterns: images and their VAE distribution as conditioning rows."""
    labels = balanced_labels(NUM_CLASSES * PER_CLASS, NUM_CLASSES, seed)
    images = class_patterns(labels, NUM_CLASSES, seed=seed)
    context = np.concatenate(encode_images(VAE, images), axis=1)
    return TaskData(name, "train", context, labels, images=images, identity={"vae_id": "v1"})


def _fit(cfg, path, seed: int = 0):
    sets = {"a": patterns("a", 0), "b": patterns("b", 1)}
    return fit_hypernet(cfg, sets, vae=VAE, backbone=BACKBONE, seed=seed, path=path,
                        upstream={"ids": {"a": "v1", "b": "v1"}}, progress=False)


def test_vae_trains_to_bit_identical_weights(fake_data, tmp_path, monkeypatch):
    """The shared VAE trained twice from the same seed has identical weights and the same vae_id."""
    cfg = load_config("smoke", overrides={"vae": TINY_VAE})
    ids = []

    def train():
        model, meta = get_vae(cfg, "shared", 0, progress=False)
        ids.append(meta["vae_id"])
        return model, meta

    _assert_identical(*_trained_twice(monkeypatch, tmp_path, train))
    assert ids[0] == ids[1]


def test_vae_seed_changes_the_weights(fake_data):
    """Another replicate seed trains another VAE."""
    cfg = load_config("smoke", overrides={"vae": {**TINY_VAE, "epochs": 1}})
    first, second = (get_vae(cfg, "shared", seed, progress=False) for seed in (0, 1))
    assert not torch.equal(first[0].state_dict()["to_mu.weight"], second[0].state_dict()["to_mu.weight"])
    assert first[1]["vae_id"] != second[1]["vae_id"] and first[1]["path"] != second[1]["path"]


def test_backbone_trains_to_bit_identical_weights(fake_data, tmp_path, monkeypatch):
    """The backbone (with augmentation) trained twice from the same seed has identical weights and backbone_id."""
    cfg = load_config("smoke", overrides={"backbone": TINY_BACKBONE})
    assert cfg.backbone.augment > 0
    ids = []

    def train():
        model, meta = get_backbone(cfg, 0, progress=False)
        ids.append(meta["backbone_id"])
        return model, meta

    _assert_identical(*_trained_twice(monkeypatch, tmp_path, train))
    assert ids[0] == ids[1]


def test_backbone_seed_changes_the_weights(fake_data):
    """Another replicate seed trains another backbone."""
    cfg = load_config("smoke", overrides={"backbone": TINY_BACKBONE})
    (first, first_meta), (second, second_meta) = (get_backbone(cfg, seed, progress=False) for seed in (0, 1))
    assert not torch.equal(first.state_dict()["embedding.weight"], second.state_dict()["embedding.weight"])
    assert first_meta["backbone_id"] != second_meta["backbone_id"]


def test_transductive_backbone_trains_to_bit_identical_weights(fake_data, tmp_path, monkeypatch):
    """The backbone adapted to a held-out dataset twice from the same backbone has identical weights and identity."""
    cfg = load_config("smoke", overrides={"backbone": TINY_BACKBONE, "transductive": TINY_TRANSDUCTIVE})
    monkeypatch.setenv("HMLIB_HOME", str(tmp_path / "upstream"))
    backbone, meta = get_backbone(cfg, 0, progress=False)
    ids = []

    def train():
        model, adapted = get_transductive_backbone(cfg, backbone, meta, "mnist", progress=False)
        ids.append(adapted["backbone_id"])
        return model, adapted

    _assert_identical(*_trained_twice(monkeypatch, tmp_path, train))
    assert ids[0] == ids[1] != meta["backbone_id"]


def test_hypernetwork_trains_to_bit_identical_weights(tmp_path):
    """Meta-training twice from the same seed (random tasks, shifts, K) gives identical weights and history."""
    cfg = load_config("smoke", overrides=TINY_META)
    results = []
    for run in range(2):
        _disturb_global_rng(run)
        results.append(_fit(cfg, tmp_path / f"h{run}.pt"))
        assert not results[-1].reused and len(results[-1].history["outer_loss"]) == cfg.meta.iterations
    _assert_identical(*(_state(r.hypernet) for r in results))
    assert results[0].history["outer_loss"] == results[1].history["outer_loss"]


def test_hypernetwork_seed_changes_the_weights(tmp_path):
    """Another seed meta-trains another hypernetwork."""
    cfg = load_config("smoke", overrides=TINY_META)
    first, second = (_state(_fit(cfg, tmp_path / f"s{seed}.pt", seed=seed).hypernet) for seed in (0, 1))
    assert any(not torch.equal(first[k], second[k]) for k in first)
