"""Preprocessing: every PIL mode by luminance, aspect ratio kept, antialiased resize, polarity from the border."""
from __future__ import annotations

import io

import numpy as np
import pytest
from datafactory import class_patterns
from PIL import Image

from hmlib.data import normalise_polarity, preprocess_image, preprocess_images
from hmlib.data.preprocess import border_pixels, to_luminance

SIZE = 28


def bar_image(size: int = 40) -> np.ndarray:
    """A bright diagonal bar on a dark ground, uint8 (size, size)."""
    return class_patterns(np.array([1]), 4, size, seed=0)[0]


def reference(size: int = 40) -> np.ndarray:
    return preprocess_image(Image.fromarray(bar_image(size), mode="L"), SIZE).astype(float)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def as_mode(grey: np.ndarray, mode: str) -> Image.Image:
    """The same picture in another PIL mode, built the way real files come in."""
    if mode == "I;16":
        img = Image.fromarray(grey.astype(np.uint16) * 257)
        assert img.mode == "I;16"
        return img
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 257, mode="I")
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255.0, mode="F")
    if mode == "1":  # a scanned bitmap: thresholded, not dithered
        return Image.fromarray(grey, mode="L").convert("1", dither=Image.Dither.NONE)
    if mode == "P":
        return Image.fromarray(grey, mode="L").convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    return Image.fromarray(grey, mode="L").convert(mode)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "1", "I;16", "I", "F", "LA", "CMYK"])
def test_every_mode_gives_the_same_picture(mode):
    out = preprocess_image(as_mode(bar_image(), mode), SIZE)
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
    assert correlation(out, reference()) > 0.95


@pytest.mark.parametrize("bits", [10, 12, 14, 16])
def test_a_16_bit_file_of_fewer_significant_bits_keeps_its_brightness_and_grey_levels(bits, tmp_path):
    """12-bit data in a 16-bit PNG (cameras, microscopes) used to be divided by 257: nearly black, 17 grey levels."""
    grey = bar_image()
    full = 2 ** bits - 1
    path = tmp_path / f"depth{bits}.png"
    Image.fromarray(np.round(grey.astype(np.float64) * full / 255).astype(np.uint16)).save(path)
    out = preprocess_image(str(path), grey.shape[0])
    assert np.abs(out.astype(int) - grey.astype(int)).max() <= 1
    assert out.max() >= 254 and len(np.unique(out)) == len(np.unique(grey))


def pillow_mode(grey: np.ndarray, mode: str) -> Image.Image:
    """The picture in any of Pillow's modes, built from bands where ``convert`` cannot reach the mode."""
    img = Image.fromarray(grey, mode="L")
    full, mid, zero = (Image.new("L", img.size, v) for v in (255, 128, 0))
    bands = {"La": [img, full], "RGBa": [img, img, img, full], "HSV": [zero, zero, img], "LAB": [img, mid, mid],
             "YCbCr": [img, mid, mid]}
    if mode in bands:
        return Image.merge(mode, bands[mode])
    if mode.startswith("I;16"):
        order = ">u2" if mode == "I;16B" else "<u2"
        return Image.frombytes(mode, img.size, (grey.astype(np.uint16) * 257).astype(order).tobytes())
    if mode == "PA":
        return as_mode(grey, "P").convert("PA")
    return as_mode(grey, mode)


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_is_preprocessed(mode):
    img = pillow_mode(bar_image(), mode)
    assert img.mode == mode
    assert correlation(preprocess_image(img, SIZE), reference()) > 0.95


def test_png_bytes_and_hub_dicts_are_decoded():
    buffer = io.BytesIO()
    Image.fromarray(bar_image(), mode="L").save(buffer, format="PNG")
    from_bytes = preprocess_image(buffer.getvalue(), SIZE)
    from_dict = preprocess_image({"bytes": buffer.getvalue(), "path": None}, SIZE)
    np.testing.assert_array_equal(from_bytes, reference().astype(np.uint8))
    np.testing.assert_array_equal(from_dict, from_bytes)


def test_luminance_weights_and_16_bit_scale():
    green = Image.new("RGB", (4, 4), (0, 255, 0))
    assert abs(int(to_luminance(green)[0, 0]) - 150) <= 1  # ITU-R 601: 0.587 * 255
    full = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_luminance(full).max() == 255


def test_transparent_background_with_dark_ink_becomes_bright_ink_on_dark():
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # fully transparent black everywhere...
    rgba[15:25, 5:35] = (0, 0, 0, 255)  # ...except an opaque black stroke
    out = preprocess_images([Image.fromarray(rgba, mode="RGBA")], SIZE, "auto", progress=False)[0]
    assert out[14, 14] > 200 and out[0, 0] < 30


def test_aspect_ratio_kept_by_padding_not_stretching():
    wide = np.zeros((20, 60), dtype=np.uint8)  # 60 wide, 20 high, bright band in the middle 6 rows
    wide[7:13, :] = 255
    out = preprocess_image(Image.fromarray(wide, mode="L"), SIZE).astype(int)
    rows_lit = np.flatnonzero(out.max(axis=1) > 128)
    # the band covers 6/60 of the padded square: about 3 of 28 rows, centred; stretching would give ~8
    assert 2 <= rows_lit.size <= 4 and abs(rows_lit.mean() - 13.5) <= 1
    assert out[:9].max() < 10 and out[-9:].max() < 10  # padding uses the (dark) border colour


def test_resize_is_antialiased():
    stripes = np.zeros((112, 112), dtype=np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: a point-sampled resize would alias them to black or white
    out = preprocess_image(Image.fromarray(stripes, mode="L"), SIZE)
    assert abs(out[4:-4, 4:-4].mean() - 127.5) < 15 and out[4:-4, 4:-4].std() < 20


def test_polarity_inverts_dark_ink_on_light_ground_only():
    bright_ink = bar_image(SIZE)[None]
    dark_ink = 255 - bright_ink
    out, inverted = normalise_polarity(np.concatenate([bright_ink, dark_ink]))
    assert inverted.tolist() == [False, True]
    np.testing.assert_array_equal(out[0], bright_ink[0])
    np.testing.assert_array_equal(out[1], bright_ink[0])


def test_polarity_of_an_outline_along_the_frame():
    # A dark square outline drawn right next to the frame (math_shapes' largest squares): the resize smears it
    # into a grey border, darker than the image's mean (mostly white paper) but still in its bright half.
    frame = np.full((SIZE, SIZE), 255, dtype=np.uint8)
    frame[2, 2:-2] = frame[-3, 2:-2] = frame[2:-2, 2] = frame[2:-2, -3] = 0
    frame[0, :] = frame[-1, :] = frame[:, 0] = frame[:, -1] = 200
    assert np.median(border_pixels(frame[None])) < frame.mean()  # what fooled a border-vs-mean rule
    out, inverted = normalise_polarity(frame[None])
    assert inverted.tolist() == [True] and out[0, SIZE // 2, SIZE // 2] == 0


def test_polarity_keep_leaves_images_alone():
    dark_ink = [Image.fromarray(255 - bar_image(SIZE), mode="L")]
    kept = preprocess_images(dark_ink, SIZE, "keep", progress=False)
    auto = preprocess_images(dark_ink, SIZE, "auto", progress=False)
    assert kept[0, 0, 0] > 200 and auto[0, 0, 0] < 60
    with pytest.raises(ValueError, match="polarity"):
        preprocess_images(dark_ink, SIZE, "flip", progress=False)


def test_batch_of_mixed_sizes_and_modes():
    items = [as_mode(bar_image(s), m) for s, m in [(13, "L"), (40, "RGB"), (97, "P"), (28, "1")]]
    items.append(Image.fromarray(bar_image(50)[:, 10:40], mode="L"))  # 30 wide x 50 high
    out = preprocess_images(items, SIZE, "auto", progress=False)
    assert out.shape == (5, SIZE, SIZE) and out.dtype == np.uint8
    assert all(correlation(o, reference()) > 0.8 for o in out[:4])


def test_pixel_arrays_are_read_like_images():
    floats = bar_image().astype(np.float32) / 255.0  # (h, w) floats in [0, 1], as in some hub datasets
    rgb = np.repeat(bar_image()[..., None], 3, axis=2).tolist()  # nested lists (h, w, 3)
    for item in (floats, rgb, bar_image().tolist()):
        assert correlation(preprocess_image(item, SIZE), reference()) > 0.99
    with pytest.raises(ValueError, match="pixel array"):
        preprocess_image(np.zeros((2, 3, 4, 5)), SIZE)


def test_worker_processes_give_the_same_pixels(monkeypatch):
    import hmlib.data.preprocess as preprocess

    monkeypatch.setattr(preprocess, "_CHUNK", 4)  # 13 images -> 4 chunks over 2 processes
    items = [as_mode(bar_image(s), m) for s in (13, 28, 40, 61) for m in ("L", "RGB", "P")] + [bar_image(9)]
    pooled = preprocess_images(items, SIZE, "auto", num_workers=2, progress=False)
    single = preprocess_images(items, SIZE, "auto", num_workers=1, progress=False)
    np.testing.assert_array_equal(pooled, single)
    assert pooled.shape == (13, SIZE, SIZE)
