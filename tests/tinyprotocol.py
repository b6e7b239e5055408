"""A tiny protocol trained for real on the tiny mirror (VAEs, backbones, hypernetworks), for the tests
of the stages after meta-training. Train it once per test module into its own home with :func:`train_home`; each
test works on a copy (:func:`use_home`), so caches and results written by one test never reach another.

The held-out datasets are the smoke profile's (``mnist`` and the shifted ``mnist+rotate``); evaluation and the
ablations use one task shape (K, N) = (3, 18) of the 6-class tiny datasets unless a test asks for others.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pytest

from hmlib.backbone.transductive import get_transductive_backbone
from hmlib.config import Config, load_config
from hmlib.hyper.bundle import bundle_for, load_bundle
from hmlib.hyper.metatrain import meta_train
from hmlib.vae.train import get_vae

K, N, TASKS, STEPS, LATENT_DIM = 3, 18, 3, 2, 4
TEST_STEPS = 4  # inner steps at test time: the smoke profile's adapt.test_steps (STEPS while meta-training)
OVERRIDES: dict[str, Any] = {
    "data": {"use_hub": False, "max_images_per_split": None},
    "task": {"num_classes": K, "num_images": N},
    "vae": {"latent_dim": LATENT_DIM, "epochs": 1, "max_train_images": 240, "batch_size": 64},
    "backbone": {"channels": [4, 8], "embed_dim": 8, "epochs": 1, "images_per_dataset": 60, "batch_size": 32},
    "hyper": {"embed_dim": 8, "num_seeds": 2, "num_heads": 2, "num_context": 64},
    "film": {"cluster_inits": 2},
    "full": {"head_hidden": 16, "target_hidden": [8]},
    "adapt": {"num_inner_steps": STEPS},
    "meta": {"iterations": 2, "meta_batch_size": 2, "eval_every": 2, "eval_tasks": 2, "val_fraction": 0.3,
             "max_classes": 3, "task_images": 24},
    "eval": {"num_tasks": TASKS, "shapes": [[K, N]], "shifted_shapes": None, "kmeans_n_init": 1,
             "logreg_train_per_class": 10, "plain_steps": 2},
    # the gate off: the protocol's tests read the adapted backbone (tests/test_transductive.py tests the gate, and
    # test_evaluation.py a declined adaptation)
    "transductive": {"epochs": 1, "max_images": 100, "batch_size": 32, "neighbours": 5, "clusters": 6, "gate": "off"},
    "ablation": {"step_grid": [0, 1, 2, 4], "lr_grid": [0.5, 2.0], "num_tasks": 3, "shapes": [[K, N]],
                 "meta_iterations": 2, "num_seeds": 1},
}


def tiny_config(**sections: Any) -> Config:
    """The smoke profile shrunk to the tiny mirror (6 classes, 120 train / 60 test images per dataset)."""
    overrides = {key: {**OVERRIDES.get(key, {}), **value} if isinstance(value, dict) else value
                 for key, value in {**OVERRIDES, **sections}.items()}
    return load_config("smoke", overrides=overrides)


@dataclass
class TrainedHome:
    """An HMLIB_HOME holding trained models, and the config and checkpoint names that made them."""

    home: Path
    cfg: Config
    checkpoints: dict[tuple[str, int], str]  # (setting, seed) -> file name in models/ (one hypernetwork per seed)


def _run_key(run: int | tuple[str, int]) -> tuple[str, int]:
    """A run is a replicate seed, or (setting, seed) as before the settings shared one hypernetwork."""
    return ("zero_shot", int(run)) if isinstance(run, int) else (str(run[0]), int(run[1]))


def train_home(home: Path, mirror: Path, runs: Iterable[int | tuple[str, int]], *, cfg: Config | None = None,
               own_vaes: Iterable[str] = ()) -> TrainedHome:
    """Meta-train the hypernetwork of each replicate seed of ``runs`` (with its VAE and backbone) into ``home``.
    A run ``("transductive", s)`` also adapts seed s's backbone to every dataset of ``transductive.datasets`` (what
    a transductive evaluation reads); ``own_vaes`` trains those datasets' own VAEs too."""
    cfg = cfg or tiny_config()
    checkpoints = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("HMLIB_HOME", home), ("HMLIB_DATA_DIR", mirror), ("HF_HUB_OFFLINE", "1"),
                            ("HF_DATASETS_OFFLINE", "1")):
            patch.setenv(name, str(value))
        for run in runs:
            setting, seed = _run_key(run)
            bundle_for(cfg, seed, train=True)  # the shared VAE and the backbone (notebook 02), reused when present
            path = meta_train(cfg, seed, progress=False).checkpoint_path
            checkpoints[(setting, seed)] = path.name
            if setting == "transductive":
                bundle = load_bundle(path)
                for dataset in cfg.transductive.datasets or cfg.meta.test_datasets:
                    get_transductive_backbone(cfg, bundle.backbone, bundle.backbone_meta, dataset, progress=False)
        for dataset in own_vaes:
            get_vae(cfg, dataset, 0, progress=False, verbose=False)
    return TrainedHome(home, cfg, checkpoints)


def use_home(trained: TrainedHome, home: Path) -> dict[tuple[str, int], Path]:
    """Copy a trained home into ``home`` (the test's HMLIB_HOME); return its checkpoints' paths there."""
    shutil.copytree(trained.home, home, dirs_exist_ok=True)
    return {key: home / "models" / name for key, name in trained.checkpoints.items()}
