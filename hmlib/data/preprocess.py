"""Images of any PIL mode and size -> uint8 (n, S, S) grayscale, ink bright on a dark background.

Per image: luminance, pad to a square with the border colour (aspect ratio kept), antialiased resize.
Then, vectorised over the batch: polarity from the border (MNIST convention: dark background): an image whose
border median lies in the bright half of its own range is inverted.
"""
from __future__ import annotations

import io
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

PREPROCESS_VERSION = 2  # bump when the pixels this module produces change; caches record it
_CHUNK = 4096


def open_image(item: Any) -> Image.Image:
    """A PIL image from PIL, PNG/JPEG bytes, a hub ``{"bytes", "path"}`` dict or an absolute file path.

    A relative path is refused: what it names would depend on the working directory.
    """
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, dict):
        item = item.get("bytes") or item.get("path")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(item))
    if isinstance(item, (str, Path)):
        if not Path(item).expanduser().is_absolute():
            raise ValueError(f"relative image path {str(item)!r}: a row must hold the image bytes or an absolute path")
        return Image.open(Path(item).expanduser())
    if item is None:
        raise ValueError("the row holds neither image bytes nor a path")
    if isinstance(item, (list, np.ndarray)):  # pixel arrays (h, w) or (h, w, c), as some hub datasets store them
        pixels = np.asarray(item)
        if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
            return Image.fromarray(_scale_to_uint8(pixels)).convert("RGB" if pixels.shape[-1] == 3 else "RGBA")
        if pixels.ndim == 2:
            return Image.fromarray(_scale_to_uint8(pixels))
        raise ValueError(f"pixel array of shape {pixels.shape} is not (h, w) or (h, w, 3|4)")
    raise TypeError(f"cannot read an image from {type(item).__name__}")


# Bits per sample of the images 16-bit files hold (cameras, scanners, microscopes). Scaling by these changed the pixels
# of 16-bit sources only; PREPROCESS_VERSION was kept so that the caches (and fingerprints) of every 8-bit dataset stay
# valid: a custom 16-bit dataset cached before it is rebuilt by deleting its data_cache/images/<name>/ folder.
SAMPLE_DEPTHS = (10, 12, 14, 16)


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Pixel values of unknown range -> uint8: [0, 1] (floats, binary) x 255; above 255, the full range of the
    smallest of :data:`SAMPLE_DEPTHS` holding the brightest pixel (12-bit data in a 16-bit PNG is scaled by 4095,
    not 65535, which left it nearly black in 17 grey levels); other ranges min-max."""
    values = np.asarray(values, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low < 0.0 or high > 65535:
        values = (values - low) * (255.0 / max(high - low, 1e-12))
    elif high > 255:
        full = next(2 ** bits - 1 for bits in SAMPLE_DEPTHS if high <= 2 ** bits - 1)
        values = values * (255.0 / full)
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def to_luminance(img: Image.Image) -> np.ndarray:
    """Grayscale uint8 array by luminance (ITU-R 601); transparency composited onto a contrasting background."""
    mode = img.mode
    if mode == "La":  # premultiplied alpha: Pillow converts it to LA only
        img, mode = img.convert("LA"), "LA"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_to_uint8(np.asarray(img))
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        grey = np.asarray(rgba.convert("RGB").convert("L"), dtype=np.float32)
        if alpha.min() >= 1.0:
            return grey.astype(np.uint8)
        # Ink drawn on transparency: put it on the background that contrasts with the opaque pixels.
        opaque = alpha > 0.5
        ink_level = grey[opaque].mean() if opaque.any() else 0.0
        background = 255.0 if ink_level < 128 else 0.0
        return np.round(grey * alpha + background * (1.0 - alpha)).astype(np.uint8)
    if mode != "L":
        img = img.convert("RGB").convert("L") if mode not in ("1", "L") else img.convert("L")
    return np.asarray(img, dtype=np.uint8)


def border_pixels(images: np.ndarray) -> np.ndarray:
    """The one-pixel ring around each image: (n, h, w) -> (n, 2h + 2w - 4)."""
    return np.concatenate([images[:, 0, :], images[:, -1, :], images[:, 1:-1, 0], images[:, 1:-1, -1]], axis=1)


def pad_to_square(grey: np.ndarray) -> np.ndarray:
    """Pad a (h, w) array to a centred square with its border's median value."""
    h, w = grey.shape
    if h == w:
        return grey
    side = max(h, w)
    fill = np.median(border_pixels(grey[None]))
    out = np.full((side, side), fill, dtype=grey.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = grey
    return out


def preprocess_image(item: Any, image_size: int = 28) -> np.ndarray:
    """One image (any PIL mode, any size) -> uint8 (image_size, image_size) by luminance, padded, resized."""
    img = open_image(item)
    img.load()
    grey = pad_to_square(to_luminance(img))
    if grey.shape[0] != image_size:
        grey = np.asarray(Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.Resampling.LANCZOS,
                                                                     reducing_gap=3.0))
    return grey


def normalise_polarity(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Invert images whose border lies in the bright half of their range (dark ink on a light ground).

    The border's median is compared with the midpoint of the image's darkest and brightest pixel (not its
    mean, which an outline running along the frame drags below a light border). Returns (images, inverted).
    """
    flat = images.reshape(images.shape[0], -1)
    border = np.median(border_pixels(images), axis=1)
    inverted = border > (flat.min(axis=1).astype(np.float64) + flat.max(axis=1)) / 2
    out = images.copy()
    out[inverted] = 255 - out[inverted]
    return out, inverted


def describe_error(err: BaseException, limit: int = 160, *, root: bool = False) -> str:
    """``Type: first line`` of an exception (``root``: of the exception that started its chain), without memory
    addresses, for one-line messages."""
    for _ in range(20 if root else 0):  # bounded: a chain can loop
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    text = str(err).splitlines()[0] if str(err) else ""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(image bytes)", text)
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _preprocess_chunk(args: tuple[Sequence[Any], int]) -> tuple[np.ndarray, dict[int, str]]:
    """Preprocessed images of a chunk (a zero image where one fails) and ``{position: reason}`` of the failures."""
    items, image_size = args
    out = np.zeros((len(items), image_size, image_size), dtype=np.uint8)
    failed: dict[int, str] = {}
    for i, item in enumerate(items):  # decoding is inherently per image; everything after is batched
        try:
            out[i] = preprocess_image(item, image_size)
        except Exception as err:  # undecodable bytes, missing file, unsupported mode: the caller decides
            failed[i] = describe_error(err)
    return out, failed


def preprocess_batch(items: Sequence[Any], image_size: int = 28, polarity: str = "auto", *,
                     num_workers: int | None = None, progress: bool = True, desc: str = "preprocess"
                     ) -> tuple[np.ndarray, dict[int, str]]:
    """``(images, failed)``: the decodable items preprocessed -> uint8 (m, S, S), in order, chunked over worker
    processes; ``failed`` maps the position of every item that could not be decoded to the reason."""
    if polarity not in ("auto", "keep"):
        raise ValueError(f"polarity must be 'auto' or 'keep', got {polarity!r}")
    chunks = [(items[i:i + _CHUNK], image_size) for i in range(0, len(items), _CHUNK)]
    if num_workers is None:
        num_workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False)
    parts: list[np.ndarray] = []
    failed: dict[int, str] = {}

    def collect(part: np.ndarray, part_failed: dict[int, str]) -> None:
        offset = sum(len(p) for p in parts)
        failed.update({offset + i: reason for i, reason in part_failed.items()})
        parts.append(part)
        bar.update(len(part))

    if num_workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=min(num_workers, len(chunks))) as pool:
            for part, part_failed in pool.map(_preprocess_chunk, chunks):
                collect(part, part_failed)
    else:
        for chunk in chunks:
            collect(*_preprocess_chunk(chunk))
    bar.close()
    images = np.concatenate(parts) if parts else np.empty((0, image_size, image_size), dtype=np.uint8)
    if failed:
        keep = np.ones(images.shape[0], dtype=bool)
        keep[list(failed)] = False
        images = images[keep]
    if polarity == "auto" and len(images):
        images, _ = normalise_polarity(images)
    return images, failed


def preprocess_images(items: Sequence[Any], image_size: int = 28, polarity: str = "auto", *,
                      num_workers: int | None = None, progress: bool = True, desc: str = "preprocess"
                      ) -> np.ndarray:
    """Decode and preprocess many images -> uint8 (n, image_size, image_size); ValueError naming the first item
    that cannot be decoded (use :func:`preprocess_batch` to skip such items instead)."""
    images, failed = preprocess_batch(items, image_size, polarity, num_workers=num_workers, progress=progress,
                                      desc=desc)
    if failed:
        first = min(failed)
        raise ValueError(f"{len(failed)} of {len(items)} images cannot be decoded; item {first}: {failed[first]}")
    return images
