"""Test inputs for ``hmlib cluster``: folders of mixed image files, and a stand-in for the model side.

:class:`BrightnessClusterer` replaces ``hmlib.cluster.estimator.HyperClusterer`` in tests of the command's input
and output handling. It is NOT the model: it puts images into K clusters by quantiles of their mean brightness,
deterministically, with the interface the real estimator implements. The end-to-end test with a trained
checkpoint lives with the estimator.
"""
from __future__ import annotations

import io
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from datafactory import class_patterns
from hmlib.artifacts import file_sha256
from hmlib.config import load_config

ESTIMATOR_MODULE = "hmlib.cluster.estimator"


class BrightnessClusterer:
    """Stand-in estimator: cluster = brightness quantile bin; confidence = closeness to the bin's centre."""

    created: list["BrightnessClusterer"] = []

    def __init__(self, path: Path, n_clusters: int, num_steps: int | None) -> None:
        self.checkpoint_path = Path(path)
        self.checkpoint_sha256 = file_sha256(path)
        self.n_clusters = n_clusters
        self.num_steps = 3 if num_steps is None else num_steps
        self.requested_steps = num_steps
        self.fitted_on: np.ndarray | None = None
        self.bundle = SimpleNamespace(cfg=load_config("smoke"))  # the command applies the checkpoint's runtime

    @classmethod
    def from_checkpoint(cls, path, n_clusters: int, num_steps: int | None = None,
                        device: str = "auto") -> "BrightnessClusterer":
        model = cls(path, n_clusters, num_steps)
        model.device = device  # what `hmlib cluster --device` asked for (tests/test_device.py)
        cls.created.append(model)
        return model

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(n, K): a soft one-hot of the brightness rank's position among K equal bins."""
        brightness = images.reshape(len(images), -1).mean(axis=1)
        rank = (np.argsort(np.argsort(brightness, kind="stable"), kind="stable") + 0.5) / len(images)
        centres = (np.arange(self.n_clusters) + 0.5) / self.n_clusters
        logits = -np.abs(rank[:, None] - centres[None]) * 4 * self.n_clusters
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        return proba / proba.sum(axis=1, keepdims=True)

    def fit(self, images: np.ndarray) -> "BrightnessClusterer":
        assert images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (28, 28)
        self.fitted_on = images.copy()
        proba = self.predict_proba(images)
        self.labels_ = proba.argmax(axis=1).astype(np.int64)
        self.confidence_ = proba.max(axis=1)
        return self

    def select_n_clusters(self, images: np.ndarray, candidates) -> int:
        """K by the silhouette of the brightness bins, with scikit-learn's own limits (2..n-1 labels), like the real
        estimator's."""
        from sklearn.metrics import silhouette_score

        brightness = images.reshape(len(images), -1).mean(axis=1, keepdims=True)
        scores = {}
        for k in candidates:
            self.n_clusters = k
            scores[k] = float(silhouette_score(brightness, self.fit(images).labels_))
        self.k_scores_ = scores
        self.n_clusters = max(scores, key=scores.get)
        self.fit(images)
        return self.n_clusters

    def describe(self) -> dict:
        return {"model": "brightness quantiles (test stand-in)", "n_clusters": self.n_clusters,
                "num_steps": self.num_steps}


def estimator_module(default: Path | Exception) -> types.ModuleType:
    """A module with the estimator interface; ``default_checkpoint`` returns ``default`` or raises it."""
    module = types.ModuleType(ESTIMATOR_MODULE)
    module.HyperClusterer = BrightnessClusterer

    def default_checkpoint() -> Path:
        if isinstance(default, Exception):
            raise default
        return default

    module.default_checkpoint = default_checkpoint
    return module


def install_estimator(monkeypatch, default: Path | Exception) -> None:
    """Make ``hmlib.cluster.estimator`` resolve to the stand-in for this test (the handler imports it by name)."""
    BrightnessClusterer.created = []
    monkeypatch.setitem(sys.modules, ESTIMATOR_MODULE, estimator_module(default))


def write_checkpoint(path: Path) -> Path:
    """A stand-in checkpoint file (the stand-in estimator only hashes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"stand-in checkpoint for hmlib cluster tests\n")
    return path


def _png_bytes(img: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


WEIRD_NAME = "we\"ird <&> name.png"


def write_mixed_folder(root: Path) -> dict[str, list[str]]:
    """A folder of many kinds of file; returns ``{"images", "skipped", "ignored", "hidden"}`` relative names."""
    patterns = class_patterns(np.arange(12) % 4, 4, size=40, seed=3)
    pil = [Image.fromarray(p, mode="L") for p in patterns]
    files: dict[str, list[str]] = {"images": [], "skipped": [], "ignored": [], "hidden": []}

    def save(name: str, kind: str, img: Image.Image | None = None, data: bytes | None = None, **kwargs) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        else:
            img.save(path, **kwargs)
        files[kind].append(name)

    save("plain_L.png", "images", pil[0])
    save("odd_size_rgb.png", "images", pil[1].convert("RGB").crop((0, 0, 23, 37)))
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (10, 20), (20, 20, 20, 255)), (10, 5))  # dark ink on transparency
    save("rgba.png", "images", rgba)
    save("palette.png", "images", pil[2].convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    save("sixteen_bit.png", "images", Image.fromarray(patterns[3].astype(np.uint16) * 257))
    save("photo.jpg", "images", pil[4].convert("RGB"), quality=90)
    save("cmyk.jpg", "images", pil[5].convert("CMYK"), quality=90)
    save("scan.tiff", "images", Image.fromarray(255 - patterns[6], mode="L"))  # dark ink on a light ground
    save("anim.gif", "images", pil[7].convert("P"))
    save("bitmap.bmp", "images", pil[8].convert("1"))
    save("UPPER.PNG", "images", pil[9])
    save("no_extension", "images", data=_png_bytes(pil[10]))
    save("nested/deeper/inner.png", "images", pil[11])
    save(WEIRD_NAME, "images", pil[0].transpose(Image.Transpose.ROTATE_90))
    good = _png_bytes(pil[1])
    save("nested/truncated.png", "skipped", data=good[: len(good) // 2])
    save("garbage.jpg", "skipped", data=b"this is not a jpeg at all" * 10)
    save("notes.txt", "ignored", data=b"some notes, not an image\n")
    save("labels.csv", "ignored", data=b"file,label\nplain_L.png,0\n")
    save(".hidden.png", "hidden", pil[0])
    save(".cache/in_hidden_folder.png", "hidden", pil[0])
    for kind in ("images", "skipped", "ignored"):
        files[kind].sort()
    return files
