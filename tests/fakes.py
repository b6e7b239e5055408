"""A stand-in for hmlib.data.load_split with synthetic ImageSets, for tests of the stages downstream of data."""
from __future__ import annotations

import numpy as np

import hmlib.data
from hmlib.artifacts import fingerprint
from hmlib.data import ImageSet


def synthetic_images(num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) images of bright squares whose position encodes one of 4 labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, num_images)
    images = (rng.random((num_images, 28, 28)) * 40).astype(np.uint8)
    rows, cols = (labels // 2) * 14 + 3, (labels % 2) * 14 + 3
    for offset in range(8):  # vectorised over images: paint an 8x8 square per image
        images[np.arange(num_images)[:, None], rows[:, None] + offset, cols[:, None] + np.arange(8)] = 230
    return images, labels.astype(np.int64)


def install_fake_data(monkeypatch, num_images: int, extra_test: int = 0) -> "FakeData":
    """Synthetic ImageSets in place of hmlib.data.load_split (records what was loaded)."""
    fake = FakeData(num_images, extra_test)
    monkeypatch.setattr(hmlib.data, "load_split", fake.load_split)
    return fake


class FakeData:
    """Synthetic ImageSets of ``num_images`` (+ ``extra_test`` in test splits); records every (name, split) loaded."""

    def __init__(self, num_images: int, extra_test: int = 0) -> None:
        self.num_images, self.extra_test = num_images, extra_test
        self.loaded: list[tuple[str, str]] = []
        self.version = 0  # bump to simulate changed images (new fingerprint)

    def load_split(self, name, split, cfg, *, rebuild=False, progress=True) -> ImageSet:
        self.loaded.append((name, split))
        seed = sum(map(ord, name + split)) + 1000 * self.version
        images, labels = synthetic_images(self.num_images + (self.extra_test if split == "test" else 0), seed)
        return ImageSet(name=name, split=split, images=images, labels=labels,
                        label_names=[str(i) for i in range(4)], fingerprint=fingerprint(name, split, self.version))
