"""The corruption registry: distribution shifts applied to any dataset, named ``<dataset>+<corruption>``.

Two disjoint families. The **benchmark** family is the 15 corruptions of MNIST-C (Mu & Gilmer 2019), written
anew, each at one documented severity: held-out shifts for evaluation, never meta-trained on. The **train**
family covers other kinds of noise, blur, geometry, intensity, compression and occlusion, each with a
``strength`` in [0, 1] scaling its documented severity, for meta-training under shifts.

A corruption maps uint8 images (n, h, w), ink bright on dark, and a ``numpy.random.Generator`` to uint8
images of the same shape; all randomness comes from the generator, labels are never touched. Adding one is
one :func:`register` call (``hmlib.data.load_split("<dataset>+<name>", ...)`` then works).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np

from hmlib.artifacts import fingerprint
from hmlib.data import corruption_ops as ops
from hmlib.errors import DatasetError

FAMILIES = ("benchmark", "train")
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,49}")  # a corruption name ends a dataset name: no '+', '.' or '/'
CHUNK = 8192  # images per call of an op: bounds float temporaries; changing it changes the pixels (bump versions)


@dataclass(frozen=True)
class Corruption:
    """One registered shift: ``op(float images in [0, 1], rng[, strength]) -> float images`` and its severity."""

    name: str
    family: str  # "benchmark" (held out, one severity) or "train" (meta-training, strength in [0, 1])
    description: str  # one line stating the documented severity (recorded in shifted datasets' manifests)
    op: Callable[..., np.ndarray]
    params: Mapping[str, Any] = field(default_factory=dict)  # the severity's parameters, for the record
    version: int = 1  # bump when this corruption's pixels change: shifted caches made with another are rebuilt

    def __call__(self, images: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
        """The corrupted copy of uint8 images (n, h, w), in chunks of ``CHUNK``; ``images`` is left untouched."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise DatasetError(f"corruption '{self.name}' takes uint8 images (n, h, w), got {images.dtype} "
                               f"{images.shape}")
        if not 0.0 <= strength <= 1.0:
            raise DatasetError(f"corruption '{self.name}': strength must be in [0, 1], got {strength}")
        if self.family == "benchmark" and strength != 1.0:
            raise DatasetError(f"corruption '{self.name}' is a benchmark corruption with one documented severity; "
                               "strength applies to the train family only")
        out = np.empty_like(images)
        for start in range(0, images.shape[0], CHUNK):
            x = images[start:start + CHUNK].astype(np.float32) / 255.0
            x = self.op(x, rng) if self.family == "benchmark" else self.op(x, rng, strength)
            out[start:start + CHUNK] = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
        return out

    def record(self) -> dict[str, Any]:
        """What a shifted dataset's manifest records about it."""
        return {"corruption": self.name, "family": self.family, "severity": self.description,
                "params": dict(self.params), "corruption_version": self.version}


CORRUPTIONS: dict[str, Corruption] = {}


def register(corruption: Corruption) -> Corruption:
    """Add ``corruption`` to the registry (name and family checked); returns it."""
    if not isinstance(corruption.name, str) or not NAME_PATTERN.fullmatch(corruption.name):
        raise DatasetError(f"invalid corruption name {corruption.name!r}: use up to 50 lower-case letters, digits "
                           "or '_', starting with a letter")
    if corruption.family not in FAMILIES:
        raise DatasetError(f"corruption '{corruption.name}': family must be one of {FAMILIES}, got "
                           f"{corruption.family!r}")
    CORRUPTIONS[corruption.name] = corruption
    return corruption


def _add(family: str, name: str, description: str, op: Callable[..., np.ndarray], **params: Any) -> None:
    """Register a built-in: ``op`` with its severity ``params`` bound, stated in ``description``."""
    register(Corruption(name, family, description, partial(op, **params), params))


# The benchmark family: MNIST-C's 15 corruptions, each at one severity.
_add("benchmark", "shot_noise", "Poisson photon noise, 6 photons at full ink (x = Poisson(6x) / 6)", ops.shot_noise,
     photons=6.0)
_add("benchmark", "impulse_noise", "salt and pepper: 12% of the pixels set to black or white (6% each)",
     ops.impulse_noise, amount=0.12)
_add("benchmark", "glass_blur", "Gaussian blur sigma 0.6 px, each pixel replaced by a random neighbour within 1 px, "
     "blur sigma 0.6 px again", ops.glass_blur, sigma=0.6, max_delta=1, iterations=1)
_add("benchmark", "motion_blur", "blur along a centred 6 px line at an angle uniform in [0, 180) degrees",
     ops.motion_blur, length=6.0)
_add("benchmark", "shear", "shear factor uniform in [-0.6, 0.6] about the centre, horizontal or vertical (even odds)",
     ops.shear, max_shear=0.6)
_add("benchmark", "scale", "zoomed out about the centre by a factor uniform in [0.5, 0.6] (antialiased)", ops.scale,
     low=0.5, high=0.6)
_add("benchmark", "rotate", "rotated about the centre by an angle uniform in [-70, 70] degrees", ops.rotate,
     max_degrees=70.0)
_add("benchmark", "translate", "shifted by a vector of length uniform in [4, 6] px in a uniform direction, rounded "
     "to whole pixels, no wraparound", ops.translate, low=4.0, high=6.0)
_add("benchmark", "brightness", "a constant uniform in [0.3, 0.5] of the range added to every pixel (grey background)",
     ops.brightness, low=0.3, high=0.5)
_add("benchmark", "stripe", "3 stripes 2 px wide at random places, all vertical or all horizontal, inverted",
     ops.stripe, count=3, width=2)
_add("benchmark", "fog", "4-octave fractal noise (persistence 0.6) scaled to [0, a], a uniform in [0.5, 0.7], added",
     ops.fog, low=0.5, high=0.7, octaves=4, persistence=0.6)
_add("benchmark", "spatter", "grey blobs (level uniform in [0.4, 0.7]) over 12% of the image, smoothed noise sigma "
     "1.5 px", ops.spatter, coverage=0.12, sigma=1.5, low=0.4, high=0.7)
_add("benchmark", "dotted_line", "a line of 1 px white dots every 2 px between random points of two opposite edges",
     ops.dotted_line, spacing=2)
_add("benchmark", "zigzag", "a 1 px white zigzag of 4 strokes across the image, amplitude uniform in [3, 6] px",
     ops.zigzag, segments=4, low=3.0, high=6.0)
_add("benchmark", "canny_edges", "Canny edge map (skimage, default thresholds), sigma uniform in [0.8, 1.2] px",
     ops.canny_edges, low=0.8, high=1.2)

# The train family: every severity is at strength 1 and scales with strength (0: clean).
_add("train", "gaussian_noise", "additive Gaussian noise, sd uniform in [0.5, 1] x 0.35 of the range",
     ops.gaussian_noise, sigma=0.35)
_add("train", "gaussian_blur", "Gaussian blur, sigma uniform in [0.75, 1.5] px", ops.gaussian_blur, sigma=1.5)
_add("train", "elastic", "elastic deformation: uniform noise smoothed by sigma 4 px, times alpha 34 (Simard 2003)",
     ops.elastic, alpha=34.0, sigma=4.0)
_add("train", "contrast", "contrast about the image mean cut by a share uniform in [0.35, 0.7]", ops.contrast,
     reduction=0.7)
_add("train", "pixelate", "averaged over square blocks of side 2 to 4 px (1 + uniform [1.5, 3], rounded) on a "
     "randomly shifted grid", ops.pixelate, block=4)
_add("train", "jpeg", "JPEG block-DCT quantisation at a quality uniform in [2, 10]", ops.jpeg, low=2.0, high=10.0)
_add("train", "erase", "a box of sides uniform in [5, 10] px centred in the middle half set to background",
     ops.erase, low=5.0, high=10.0)
_add("train", "thicken", "grey dilation over 3x3, blended in by a share uniform in [0.5, 1]", ops.thicken, size=3)
_add("train", "thin", "grey erosion over 2x2, blended in by a share uniform in [0.5, 1]", ops.thin, size=2)
_add("train", "illumination", "multiplied by a linear ramp from 1 to 1 - d across the image in a random direction, "
     "d uniform in [0.4, 0.8]", ops.illumination, dimming=0.8)


def benchmark_corruptions() -> list[str]:
    """Names of the benchmark family (held-out shifts), in registry order."""
    return [name for name, c in CORRUPTIONS.items() if c.family == "benchmark"]


def train_corruptions() -> list[str]:
    """Names of the train family (shifts for meta-training), in registry order."""
    return [name for name, c in CORRUPTIONS.items() if c.family == "train"]


def get_corruption(name: str) -> Corruption:
    """The registered corruption ``name``; DatasetError listing the registered ones otherwise."""
    if name not in CORRUPTIONS:
        raise DatasetError(f"unknown corruption '{name}'; registered: benchmark {', '.join(benchmark_corruptions())}; "
                           f"train {', '.join(train_corruptions())}")
    return CORRUPTIONS[name]


def apply(name: str, images: np.ndarray, seed: int, strength: float = 1.0) -> np.ndarray:
    """``images`` (uint8 (n, h, w)) corrupted by ``name``, its generator seeded by ``seed`` (same call, same pixels)."""
    return get_corruption(name)(images, np.random.default_rng(seed), strength)


def shift_seed(corruption: str, base: str, split: str) -> int:
    """The seed of a shifted split, derived from (corruption, base dataset, split) only."""
    return int(fingerprint("corruption", corruption, base, split), 16)


def corruption_table() -> list[dict[str, str]]:
    """One row per corruption: name, family and documented severity (benchmark family first)."""
    return [{"name": c.name, "family": c.family, "severity": c.description}
            for c in sorted(CORRUPTIONS.values(), key=lambda c: FAMILIES.index(c.family))]
