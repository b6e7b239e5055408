"""The pixel operations behind :mod:`hmlib.data.corruptions`, vectorised over a batch of images.

Every operation takes float32 images in [0, 1], shape (n, h, w), ink bright on dark, and a
``numpy.random.Generator``; it returns float images of the same shape (the registry clips and rounds
them back to uint8). Per-image parameters are arrays drawn from the generator, so the result is fixed
by the seed. Severities are arguments here; the registry binds them next to their description.
Operations of the train family also take ``strength`` in [0, 1], which scales the severity (0: clean).
"""
from __future__ import annotations

import numpy as np
from scipy import fft, ndimage, special
from skimage.feature import canny

# JPEG's luminance quantisation table (ITU-T T.81, Annex K), the table that quality 50 uses as is.
JPEG_LUMINANCE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float32)


# ---------------------------------------------------------------------------------------------- helpers


def _column(values: np.ndarray) -> np.ndarray:
    """Per-image values (n,) as float32 (n, 1, 1), to broadcast over pixels."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column index of every pixel, float32 (h, w) each."""
    rows, cols = np.mgrid[0:h, 0:w]
    return rows.astype(np.float32), cols.astype(np.float32)


def _warp(x: np.ndarray, src_rows: np.ndarray, src_cols: np.ndarray) -> np.ndarray:
    """Image i sampled bilinearly at (src_rows[i], src_cols[i]) (n, h, w); zero outside the image."""
    index = np.broadcast_to(np.arange(x.shape[0], dtype=np.float32)[:, None, None], src_rows.shape)
    return ndimage.map_coordinates(x, [index, src_rows, src_cols], order=1, mode="constant", cval=0.0)


def _identities(n: int) -> np.ndarray:
    """n identity matrices, float32 (n, 2, 2), to edit into per-image affine maps."""
    return np.tile(np.eye(2, dtype=np.float32), (n, 1, 1))


def _affine(x: np.ndarray, matrix: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """Output pixel p of image i reads the source at matrix[i] @ (p - centre) + centre + offset[i] (rows, cols)."""
    n, h, w = x.shape
    rows, cols = _grid(h, w)
    dy, dx = rows - (h - 1) / 2, cols - (w - 1) / 2
    offset = np.zeros((n, 2), dtype=np.float32) if offset is None else offset
    m = matrix.astype(np.float32)[:, :, :, None, None]  # (n, 2, 2, 1, 1)
    src_rows = m[:, 0, 0] * dy + m[:, 0, 1] * dx + (h - 1) / 2 + _column(offset[:, 0])
    src_cols = m[:, 1, 0] * dy + m[:, 1, 1] * dx + (w - 1) / 2 + _column(offset[:, 1])
    return _warp(x, src_rows, src_cols)


def _interpolation(points: int, size: int) -> np.ndarray:
    """(size, points) matrix of linear interpolation from ``points`` evenly spread samples to ``size`` pixels."""
    position = np.linspace(0, points - 1, size)
    lower = np.minimum(position.astype(np.intp), points - 2)
    matrix = np.zeros((size, points), dtype=np.float32)
    matrix[np.arange(size), lower] = 1.0 - (position - lower)
    matrix[np.arange(size), lower + 1] = position - lower
    return matrix


def _convolve(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Image i convolved with its own odd-sized kernel (n, k, k); same size, zero beyond the border (FFT)."""
    from scipy.signal import fftconvolve  # here: importing scipy.signal costs a second, most runs never blur

    return fftconvolve(x, kernels, mode="same", axes=(1, 2))


def _draw(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, value: float = 1.0) -> np.ndarray:
    """``x`` with the pixels nearest to the points (rows[i], cols[i]) (n, m) of image i set to ``value``."""
    n, h, w = x.shape
    r, c = np.rint(rows).astype(np.intp), np.rint(cols).astype(np.intp)
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    image = np.broadcast_to(np.arange(n)[:, None], r.shape)
    x = x.copy()
    x[image[inside], r[inside], c[inside]] = value
    return x


def _across(rng: np.random.Generator, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points (n, m) drawn left to right, transposed (top to bottom) for a random half of the images."""
    vertical = rng.random(rows.shape[0]) < 0.5
    return np.where(vertical[:, None], cols, rows), np.where(vertical[:, None], rows, cols)


def _blend(x: np.ndarray, target: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """``x`` moved towards ``target`` by a per-image fraction uniform in [0.5, 1] x strength."""
    return x + _column(_scaled(rng, x.shape[0], 1.0, strength)) * (target - x)


def _scaled(rng: np.random.Generator, n: int, value: float, strength: float) -> np.ndarray:
    """Per-image severities (n,): ``value`` x strength x a factor uniform in [0.5, 1]."""
    return value * strength * rng.uniform(0.5, 1.0, n)


# ---------------------------------------------------------------------------------------------- benchmark family


def shot_noise(x: np.ndarray, rng: np.random.Generator, photons: float) -> np.ndarray:
    """Poisson photon noise: full ink collects ``photons`` photons on average."""
    return rng.poisson(x * photons).astype(np.float32) / photons


def impulse_noise(x: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Salt and pepper: a share ``amount`` of the pixels set to black or white, half each."""
    u = rng.random(x.shape, dtype=np.float32)
    return np.where(u < amount / 2, 0.0, np.where(u > 1 - amount / 2, 1.0, x))


def glass_blur(x: np.ndarray, rng: np.random.Generator, sigma: float, max_delta: int, iterations: int) -> np.ndarray:
    """Gaussian blur, then every pixel replaced by a random neighbour within ``max_delta``, repeated, then blur."""
    n, h, w = x.shape
    x = ndimage.gaussian_filter(x, (0, sigma, sigma))
    image = np.arange(n)[:, None, None]
    rows, cols = np.mgrid[0:h, 0:w]
    for _ in range(iterations):
        dy, dx = rng.integers(-max_delta, max_delta + 1, size=(2, n, h, w))
        x = x[image, np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)]
    return ndimage.gaussian_filter(x, (0, sigma, sigma))


def motion_blur(x: np.ndarray, rng: np.random.Generator, length: float) -> np.ndarray:
    """Blur along a centred line of ``length`` pixels at a random angle (an antialiased line kernel per image)."""
    n = x.shape[0]
    angle = rng.uniform(0.0, np.pi, n)
    half = int(np.ceil(length / 2))
    dy, dx = _grid(2 * half + 1, 2 * half + 1)
    dy, dx = dy - half, dx - half
    uy, ux = _column(np.sin(angle)), _column(np.cos(angle))
    along = np.clip(dy * uy + dx * ux, -length / 2, length / 2)  # nearest point of the segment
    kernels = np.clip(1.0 - np.hypot(dy - along * uy, dx - along * ux), 0.0, None)
    return _convolve(x, kernels / kernels.sum(axis=(1, 2), keepdims=True))


def shear(x: np.ndarray, rng: np.random.Generator, max_shear: float) -> np.ndarray:
    """Sheared about the centre by a factor uniform in [-max_shear, max_shear], horizontally or vertically."""
    n = x.shape[0]
    factor, vertical = rng.uniform(-max_shear, max_shear, n), rng.random(n) < 0.5
    matrix = _identities(n)
    matrix[:, 1, 0] = np.where(vertical, 0.0, -factor)  # horizontal: the column read shifts with the row
    matrix[:, 0, 1] = np.where(vertical, -factor, 0.0)
    return _affine(x, matrix)


def scale(x: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """Zoomed out about the centre by a factor uniform in [low, high] (antialiased first)."""
    factor = rng.uniform(low, high, x.shape[0])
    sigma = 0.5 * (2.0 / (low + high) - 1.0)  # the usual antialiasing width for the mean factor
    matrix = _identities(x.shape[0]) / factor[:, None, None]
    return _affine(ndimage.gaussian_filter(x, (0, sigma, sigma)), matrix)


def rotate(x: np.ndarray, rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """Rotated about the centre by an angle uniform in [-max_degrees, max_degrees]."""
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees, x.shape[0]))
    cos, sin = np.cos(angle), np.sin(angle)
    return _affine(x, np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1))


def translate(x: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """Shifted by a vector of length uniform in [low, high] in a random direction, rounded to whole pixels (no
    wraparound)."""
    n = x.shape[0]
    angle, length = rng.uniform(0.0, 2 * np.pi, n), rng.uniform(low, high, n)
    shift = np.rint(np.stack([length * np.sin(angle), length * np.cos(angle)], 1))
    return _affine(x, _identities(n), -shift)


def brightness(x: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A constant uniform in [low, high] (of the range) added to every pixel: the background turns grey."""
    return x + _column(rng.uniform(low, high, x.shape[0]))


def stripe(x: np.ndarray, rng: np.random.Generator, count: int, width: int) -> np.ndarray:
    """``count`` stripes ``width`` pixels wide, all vertical or all horizontal, at random places, inverted."""
    n, h, w = x.shape
    rows, cols = _grid(h, w)
    position = np.where((rng.random(n) < 0.5)[:, None, None], cols, rows)  # (n, h, w)
    starts = rng.integers(0, min(h, w) - width + 1, size=(n, 1, 1, count))
    inside = (position[..., None] >= starts) & (position[..., None] < starts + width)
    return np.where(inside.any(axis=-1), 1.0 - x, x)


def fog(x: np.ndarray, rng: np.random.Generator, low: float, high: float, octaves: int, persistence: float
        ) -> np.ndarray:
    """Fractal noise (``octaves`` bilinear octaves, grids of 3, 5, 9 ... points) scaled to [0, a] with a uniform
    in [low, high], added."""
    n, h, w = x.shape
    noise = np.zeros_like(x)
    for octave in range(octaves):
        points = 2 ** (octave + 1) + 1
        coarse = rng.random((n, points, points), dtype=np.float32)
        noise += persistence ** octave * (_interpolation(points, h) @ coarse @ _interpolation(points, w).T)
    noise -= noise.min(axis=(1, 2), keepdims=True)
    noise /= np.maximum(noise.max(axis=(1, 2), keepdims=True), 1e-6)
    return x + _column(rng.uniform(low, high, n)) * noise


def spatter(x: np.ndarray, rng: np.random.Generator, coverage: float, sigma: float, low: float, high: float
            ) -> np.ndarray:
    """Grey blobs (smoothed noise above its (1 - coverage) quantile, soft edges) of a level uniform in
    [low, high] painted over the image."""
    n = x.shape[0]
    field = ndimage.gaussian_filter(rng.standard_normal(x.shape, dtype=np.float32), (0, sigma, sigma))
    field = (field - field.mean(axis=(1, 2), keepdims=True)) / field.std(axis=(1, 2), keepdims=True)
    alpha = np.clip((field - special.ndtri(1.0 - coverage)) / 0.5, 0.0, 1.0)
    return x + alpha * (_column(rng.uniform(low, high, n)) - x)


def dotted_line(x: np.ndarray, rng: np.random.Generator, spacing: int) -> np.ndarray:
    """A line of one-pixel dots every ``spacing`` pixels between random points of two opposite edges."""
    n, h, w = x.shape
    start, end = rng.uniform(2, h - 3, (2, n, 1))
    cols = np.arange(0, w, spacing, dtype=np.float32)[None] + rng.integers(0, spacing, (n, 1))
    rows = start + (end - start) * cols / (w - 1)
    return _draw(x, *_across(rng, rows, cols))


def zigzag(x: np.ndarray, rng: np.random.Generator, segments: int, low: float, high: float) -> np.ndarray:
    """A one-pixel zigzag of ``segments`` strokes across the image, amplitude uniform in [low, high] pixels."""
    n, h, w = x.shape
    centre, amplitude = rng.uniform(h / 4, 3 * h / 4, (n, 1)), rng.uniform(low, high, (n, 1))
    corners = centre + amplitude * rng.choice([-1.0, 1.0], (n, 1)) * (-1.0) ** np.arange(segments + 1)
    cols = np.linspace(0, w - 1, 4 * w * segments, dtype=np.float32)[None]  # dense enough for steep strokes
    position = cols[0] * segments / (w - 1)
    stroke = np.minimum(position.astype(np.intp), segments - 1)
    rows = corners[:, stroke] + (corners[:, stroke + 1] - corners[:, stroke]) * (position - stroke)
    return _draw(x, *_across(rng, rows, np.broadcast_to(cols, rows.shape)))


def canny_edges(x: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """The Canny edge map (skimage, default thresholds) at a smoothing sigma uniform in [low, high]."""
    sigma = rng.uniform(low, high, x.shape[0])
    return np.stack([canny(image, sigma=s) for image, s in zip(x, sigma)]).astype(np.float32) if len(x) else x


# ---------------------------------------------------------------------------------------------- train family


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, strength: float, sigma: float) -> np.ndarray:
    """Additive Gaussian noise of standard deviation uniform in [0.5, 1] x sigma x strength."""
    return x + _column(_scaled(rng, x.shape[0], sigma, strength)) * rng.standard_normal(x.shape, dtype=np.float32)


def gaussian_blur(x: np.ndarray, rng: np.random.Generator, strength: float, sigma: float) -> np.ndarray:
    """Gaussian blur of width uniform in [0.5, 1] x sigma x strength pixels (a kernel per image)."""
    widths = np.maximum(_scaled(rng, x.shape[0], sigma, strength), 1e-3)
    half = int(np.ceil(3 * sigma))
    dy, dx = _grid(2 * half + 1, 2 * half + 1)
    kernels = np.exp(-((dy - half) ** 2 + (dx - half) ** 2) / (2 * _column(widths) ** 2))
    return _convolve(x, kernels / kernels.sum(axis=(1, 2), keepdims=True))


def elastic(x: np.ndarray, rng: np.random.Generator, strength: float, alpha: float, sigma: float) -> np.ndarray:
    """Elastic deformation (Simard et al. 2003): uniform noise smoothed by ``sigma``, times alpha x strength,
    as a displacement field."""
    n, h, w = x.shape
    field = ndimage.gaussian_filter(rng.uniform(-1, 1, (2, n, h, w)).astype(np.float32), (0, 0, sigma, sigma))
    rows, cols = _grid(h, w)
    return _warp(x, rows + alpha * strength * field[0], cols + alpha * strength * field[1])


def contrast(x: np.ndarray, rng: np.random.Generator, strength: float, reduction: float) -> np.ndarray:
    """Contrast about each image's mean cut by a share uniform in [0.5, 1] x reduction x strength."""
    mean = x.mean(axis=(1, 2), keepdims=True)
    return mean + (x - mean) * (1.0 - _column(_scaled(rng, x.shape[0], reduction, strength)))


def pixelate(x: np.ndarray, rng: np.random.Generator, strength: float, block: int) -> np.ndarray:
    """Averaged over square blocks of side 1 + round(uniform [0.5, 1] x (block - 1) x strength) on a randomly
    shifted grid."""
    n, h, w = x.shape
    side = 1 + np.rint(_scaled(rng, n, block - 1, strength)).astype(np.intp)[:, None, None]
    shift = rng.integers(0, side)  # (n, 1, 1): the grid's offset, below the block side
    rows, cols = np.mgrid[0:h, 0:w]
    cells = max(h, w)
    ids = (np.arange(n)[:, None, None] * cells + (rows + shift) // side) * cells + (cols + shift) // side
    sums = np.bincount(ids.ravel(), weights=x.ravel(), minlength=n * cells * cells)
    counts = np.bincount(ids.ravel(), minlength=n * cells * cells)
    return (sums / np.maximum(counts, 1))[ids].astype(np.float32)


def jpeg(x: np.ndarray, rng: np.random.Generator, strength: float, low: float, high: float) -> np.ndarray:
    """JPEG's lossy step: 8x8 block DCT quantised with the luminance table at a quality q uniform in [low, high]
    (at strength s: 100 - s x (100 - q))."""
    n, h, w = x.shape
    quality = 100.0 - strength * (100.0 - rng.uniform(low, high, n))
    factor = np.where(quality < 50, 5000.0 / np.maximum(quality, 1.0), 200.0 - 2.0 * quality)  # libjpeg's scaling
    table = np.clip(np.floor((JPEG_LUMINANCE[None] * _column(factor) + 50.0) / 100.0), 1.0, None)
    ph, pw = -h % 8, -w % 8
    blocks = np.pad(x * 255.0 - 128.0, ((0, 0), (0, ph), (0, pw)), mode="edge")
    blocks = blocks.reshape(n, (h + ph) // 8, 8, (w + pw) // 8, 8)
    table = table[:, None, :, None, :]  # (n, 1, 8, 1, 8)
    coefficients = np.rint(fft.dctn(blocks, axes=(2, 4), norm="ortho") / table) * table
    pixels = fft.idctn(coefficients, axes=(2, 4), norm="ortho").reshape(n, h + ph, w + pw)[:, :h, :w]
    return ((pixels + 128.0) / 255.0).astype(np.float32)


def erase(x: np.ndarray, rng: np.random.Generator, strength: float, low: float, high: float) -> np.ndarray:
    """A box of sides uniform in [low, high] x strength pixels, centred in the middle half, set to background."""
    n, h, w = x.shape
    height, width = strength * rng.uniform(low, high, (2, n, 1, 1))
    top = np.rint(rng.uniform(h / 4, 3 * h / 4, (n, 1, 1)) - height / 2)
    left = np.rint(rng.uniform(w / 4, 3 * w / 4, (n, 1, 1)) - width / 2)
    rows, cols = _grid(h, w)
    inside = (rows >= top) & (rows < top + np.rint(height)) & (cols >= left) & (cols < left + np.rint(width))
    return np.where(inside, 0.0, x)


def thicken(x: np.ndarray, rng: np.random.Generator, strength: float, size: int) -> np.ndarray:
    """Strokes thickened: blended towards the grey dilation over a ``size`` x ``size`` square."""
    return _blend(x, ndimage.grey_dilation(x, size=(1, size, size)), rng, strength)


def thin(x: np.ndarray, rng: np.random.Generator, strength: float, size: int) -> np.ndarray:
    """Strokes thinned: blended towards the grey erosion over a ``size`` x ``size`` square."""
    return _blend(x, ndimage.grey_erosion(x, size=(1, size, size)), rng, strength)


def illumination(x: np.ndarray, rng: np.random.Generator, strength: float, dimming: float) -> np.ndarray:
    """Uneven light: multiplied by a linear ramp from 1 down to 1 - uniform [0.5, 1] x dimming x strength, across
    the image in a random direction."""
    n, h, w = x.shape
    angle = rng.uniform(0.0, 2 * np.pi, n)
    rows, cols = _grid(h, w)
    along = _column(np.sin(angle)) * (rows - (h - 1) / 2) + _column(np.cos(angle)) * (cols - (w - 1) / 2)
    ramp = (along - along.min(axis=(1, 2), keepdims=True)) / np.ptp(along, axis=(1, 2), keepdims=True)
    return x * (1.0 - _column(_scaled(rng, n, dimming, strength)) * ramp)
