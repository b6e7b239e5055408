"""Per-image features of a dataset split under a trained model (VAE posteriors, backbone embeddings).

One home for what both encoders share: uint8 images to float tensors, batched no-grad encoding, the
per-task normalisation of features, and the feature cache
``data_cache/<kind>/<model name>/<dataset>_<split>.npz`` with a JSON manifest naming the model's identity
and the images' fingerprint (a mismatch re-encodes, and says so).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor
from sklearn.manifold import TSNE
from tqdm.auto import tqdm

from hmlib import paths
from hmlib.artifacts import ArtifactError, StaleArtifactError, atomic_path, check_meta, read_json, write_json
from hmlib.config import IMAGE_SIZE

CACHE_VERSION = 2
EPS = 1e-5


def images_to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """uint8 (n, 28, 28) -> float32 (n, 1, 28, 28) in [0, 1]."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected uint8 images of shape (n, {IMAGE_SIZE}, {IMAGE_SIZE}), "
                         f"got {images.dtype} {tuple(images.shape)}")
    return images.unsqueeze(1).float().div_(255.0)


def to_device(batch: Tensor, device: torch.device | str) -> Tensor:
    """A CPU batch on ``device``: through pinned memory and a non-blocking copy to a CUDA GPU (the copy overlaps
    the work already queued there), a plain ``.to`` elsewhere (no copy at all on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


@torch.no_grad()
def encode_batches(encode: Callable[[Tensor], Tensor | tuple[Tensor, ...]], images: np.ndarray, *,
                   batch_size: int = 2048, progress: bool = False, desc: str = "encode") -> list[np.ndarray]:
    """Run ``encode`` (float images (B, 1, 28, 28) -> one or more (B, k) tensors) over uint8 images in batches."""
    outputs: list[list[np.ndarray]] = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        out = encode(images_to_tensor(images[start:start + batch_size]))
        out = out if isinstance(out, tuple) else (out,)
        outputs.append([o.float().cpu().numpy() for o in out])
    return [np.concatenate(parts).astype(np.float32) for parts in zip(*outputs)]


def standardize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(standardised x, mean, std): every column centred and scaled by the task's own rows (dim -2)."""
    mean = x.mean(dim=-2, keepdim=True)
    std = x.std(dim=-2, keepdim=True, unbiased=False) + EPS
    return (x - mean) / std, mean, std


def normalize_task(x: Tensor, *, l2: bool = False) -> Tensor:
    """Standardise every column by the task's own statistics over its rows (dim -2); then L2 per row if asked."""
    x = standardize(x)[0]
    return torch.nn.functional.normalize(x, dim=-1) if l2 else x


def normalize_task_np(x: np.ndarray, *, l2: bool = False) -> np.ndarray:
    """:func:`normalize_task` on a numpy array (the baselines' view of the same normalisation)."""
    return normalize_task(torch.as_tensor(np.asarray(x, dtype=np.float32)), l2=l2).numpy().astype(np.float64)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` (N, d) onto their first two principal components, (N, 2), with a fixed orientation."""
    centred = np.asarray(x, dtype=np.float64) - np.mean(x, axis=0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vh[:2].T
    signs = np.sign(proj[np.abs(proj).argmax(0), np.arange(proj.shape[1])])  # deterministic orientation
    proj = proj * np.where(signs == 0, 1.0, signs)
    return np.pad(proj, ((0, 0), (0, max(0, 2 - proj.shape[1]))))


def project_2d(points: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D projection (n, 2) of points (n, d): "pca" (SVD) or "tsne" (scikit-learn)."""
    points = np.asarray(points, dtype=np.float64)
    if method == "pca":
        return pca_2d(points)
    if method == "tsne":
        return TSNE(2, init="pca", perplexity=min(30.0, (len(points) - 1) / 3), random_state=seed).fit_transform(points)
    raise ValueError(f"unknown projection {method!r}; use 'pca' or 'tsne'")


# ------------------------------------------------------------------------------------------ cache

def cache_path(kind: str, model_name: str, dataset: str, split: str) -> Path:
    """``data_cache/<kind>/<model_name>/<dataset>_<split>.npz``."""
    return paths.cache_dir() / kind / model_name / f"{dataset}_{split}.npz"


def read_features(path: Path, expected: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Cached arrays; StaleArtifactError if made by another model or images, ArtifactError if unreadable."""
    manifest_path = path.with_suffix(".json")
    if not path.is_file() or not manifest_path.is_file():
        raise ArtifactError(f"no cached features at {path}")
    manifest = read_json(manifest_path)
    check_meta(manifest, expected, str(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as err:  # torn or foreign file: zip, key or value errors
        raise ArtifactError(f"{path} is corrupt ({type(err).__name__}); delete it to re-encode") from err
    if any(len(a) != manifest.get("num_images") for a in arrays.values()):
        raise ArtifactError(f"{path} does not match its manifest; delete it to re-encode")
    return arrays


def cached_features(kind: str, model_name: str, image_set: Any, identity: Mapping[str, Any],
                    compute: Callable[[np.ndarray], dict[str, np.ndarray]], *, verbose: bool = True
                    ) -> dict[str, np.ndarray]:
    """Features of ``image_set`` under a model (``identity`` names it), from the cache or computed and cached."""
    path = cache_path(kind, model_name, image_set.name, image_set.split)
    expected = {"cache_version": CACHE_VERSION, **identity, "image_fingerprint": image_set.fingerprint,
                "dataset": image_set.name, "split": image_set.split}
    try:
        return read_features(path, expected)
    except StaleArtifactError as err:
        if verbose:
            print(f"Cached features are stale, re-encoding:\n{err}")
    except ArtifactError:
        pass
    arrays = compute(image_set.images)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append '.npz' to a bare name
            np.savez(fh, **arrays)
    write_json(path.with_suffix(".json"), {**expected, "num_images": int(len(image_set.images))})
    return arrays
