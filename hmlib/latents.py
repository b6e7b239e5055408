"""Latents: every dataset/split encoded once to (mu, logvar), cached beside a manifest tying it to its VAE.

Cache layout: ``data_cache/latents/<vae_name>/<dataset>_<split>.npz`` plus ``.json`` manifest recording
the VAE checkpoint's id (sha256 of the file) and the images' fingerprint; a mismatch means stale latents,
which are re-encoded (and said so).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hmlib import paths
from hmlib.artifacts import ArtifactError, StaleArtifactError, atomic_path, check_meta, read_json, write_json
from hmlib.config import Config
from hmlib.vae import VAE, encode_images, vae_for_setting

SETTINGS = ("zero_shot", "transductive")
CACHE_VERSION = 1


@dataclass
class LatentSet:
    """Posterior parameters of one dataset split under one VAE."""

    name: str
    split: str
    mu: np.ndarray  # (n, d) float32
    logvar: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64
    vae_id: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def distribution(self) -> np.ndarray:
        """The VAE distribution: rows [mu, logvar], (n, 2d)."""
        return np.concatenate([self.mu, self.logvar], axis=1)


def latent_cache_path(vae_name: str, dataset: str, split: str) -> Path:
    """``data_cache/latents/<vae_name>/<dataset>_<split>.npz``."""
    return paths.cache_dir() / "latents" / vae_name / f"{dataset}_{split}.npz"


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def write_latents(path: Path, latents: LatentSet, manifest: dict[str, Any]) -> None:
    """Write arrays then manifest, both atomically (the manifest last, so a torn write reads as missing)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=latents.mu, logvar=latents.logvar, labels=latents.labels)
    write_json(_manifest_path(path), manifest)


def read_latents(path: Path, expected: dict[str, Any]) -> LatentSet:
    """Load cached latents; StaleArtifactError if the manifest differs from ``expected``, ArtifactError if unreadable."""
    manifest_path = _manifest_path(path)
    if not path.is_file() or not manifest_path.is_file():
        raise ArtifactError(f"no cached latents at {path}")
    manifest = read_json(manifest_path)
    check_meta(manifest, expected, str(path))
    try:
        with np.load(path) as arrays:
            mu, logvar, labels = arrays["mu"], arrays["logvar"], arrays["labels"]
    except Exception as err:  # zip/pickle/key errors from a torn or foreign file
        raise ArtifactError(f"{path} is corrupt ({type(err).__name__}: {err}); delete it to re-encode") from err
    if len(mu) != manifest.get("num_images") or mu.shape[1] != manifest.get("latent_dim"):
        raise ArtifactError(f"{path} does not match its manifest (shape {mu.shape}); delete it to re-encode")
    return LatentSet(manifest["dataset"], manifest["split"], mu, logvar, labels, manifest["vae_id"])


def encode_split(vae: VAE, vae_id: str, image_set: Any, *, progress: bool = False) -> LatentSet:
    """Encode one ImageSet with ``vae`` into a LatentSet (no caching)."""
    mu, logvar = encode_images(vae, image_set.images, progress=progress)
    return LatentSet(image_set.name, image_set.split, mu, logvar, np.asarray(image_set.labels, np.int64), vae_id)


def get_latents(cfg: Config, dataset: str, split: str, setting: str, *, progress: bool = True) -> LatentSet:
    """Latents of one dataset split under the setting's VAE (zero_shot: shared, transductive: own); cached."""
    from hmlib.data import load_split

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; use one of {', '.join(SETTINGS)}")
    vae, vae_meta = vae_for_setting(cfg, setting, dataset, progress=progress, verbose=False)
    image_set = load_split(dataset, split, cfg.data, progress=progress)
    path = latent_cache_path(vae_meta["name"], dataset, split)
    expected = {"cache_version": CACHE_VERSION, "vae_id": vae_meta["vae_id"], "vae_name": vae_meta["name"],
                "image_fingerprint": image_set.fingerprint, "dataset": dataset, "split": split}
    try:
        return read_latents(path, expected)
    except StaleArtifactError as err:
        print(f"Cached latents are stale, re-encoding:\n{err}")
    except ArtifactError:
        pass
    latents = encode_split(vae, vae_meta["vae_id"], image_set, progress=progress)
    write_latents(path, latents, {**expected, "num_images": len(latents), "latent_dim": int(latents.mu.shape[1]),
                                  "vae_path": vae_meta["path"]})
    return latents


def kmeans_task_accuracy(latents: LatentSet, num_tasks: int, num_classes: int, num_images: int, *,
                         seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Clustering accuracy (Hungarian) of k-means on mu, one value per random K-class task (quality check)."""
    from hmlib.baselines import kmeans_clusters
    from hmlib.data import sample_tasks
    from hmlib.metrics import clustering_accuracy

    tasks = sample_tasks(latents.labels, num_tasks, num_classes, num_images, mode="random", seed=seed)
    scores = np.empty(len(tasks.indices))
    for t, (idx, labels) in enumerate(zip(tasks.indices, tasks.labels)):
        pred = kmeans_clusters(latents.mu[idx], num_classes, n_init=n_init, seed=seed + t)
        scores[t] = clustering_accuracy(pred, labels, num_classes)
    return scores


def get_all_latents(cfg: Config, settings: tuple[str, ...] = SETTINGS, splits: tuple[str, ...] = ("train", "test"),
                    *, progress: bool = True) -> dict[tuple[str, str, str], LatentSet]:
    """Latents of every dataset of the protocol, keyed (setting, dataset, split); encoded once, then cached."""
    keys = [(s, d, sp) for s in settings for d in cfg.datasets for sp in splits]
    return {key: get_latents(cfg, key[1], key[2], key[0], progress=False)
            for key in tqdm(keys, desc="latents", disable=not progress, leave=False)}


def kmeans_summary(cfg: Config, latents: dict[tuple[str, str, str], LatentSet], *, split: str = "test",
                   num_tasks: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """k-means-on-mu accuracy (Hungarian) per dataset and setting, mean and 95% CI over random K-class tasks."""
    from hmlib.data import fit_task_size
    from hmlib.metrics import mean_ci

    rows = []
    for (setting, dataset, key_split), latent_set in latents.items():
        if key_split != split:
            continue
        num_images = fit_task_size(latent_set.labels, cfg.task.num_classes, cfg.task.num_images)
        scores = kmeans_task_accuracy(latent_set, num_tasks, cfg.task.num_classes, num_images,
                                      seed=seed, n_init=cfg.eval.kmeans_n_init)
        mean, half = mean_ci(scores)
        rows.append({"dataset": dataset, "role": "held out" if dataset in cfg.meta.test_datasets else "meta-train",
                     "setting": setting, "tasks": num_tasks, "images/task": num_images,
                     "accuracy %": round(100 * mean, 1), "95% CI ±": round(100 * half, 1)})
    return rows
