"""Procedural glyph datasets for the fold variants synthetic_<dataset>.json (docs/METHOD.md, "More meta-training
datasets: procedural glyphs"): each dataset is one style (primitives, parts, thickness, jitter, warp, noise), each
of its 10 classes a random glyph of that style, each of its 3,000 images the glyph with its control points jittered,
thickened, affinely warped, blurred and noised. Deterministic: dataset i is drawn from seed 1000 + i.

    .venv/bin/python docs/lodo/variants/make_glyphs.py        # -> data_cache/glyphs/glyphs0 .. glyphs5 (<class>/*.png)
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import draw, filters, morphology, transform

from hmlib.paths import REPO_ROOT  # the variants' configs name ./data_cache/glyphs/..., relative to it


def style(rng):
    return {"prims": str(rng.choice(["line", "bezier", "ellipse", "polygon", "mixed"])),
            "parts": int(rng.integers(1, 5)), "thick": int(rng.integers(0, 3)), "jitter": float(rng.uniform(0.5, 2.5)),
            "rot": float(rng.uniform(0, 20)), "scale": float(rng.uniform(0, 0.15)), "noise": float(rng.uniform(0, 0.08)),
            "blur": float(rng.uniform(0.3, 1.0))}


def prototype(rng, st):
    parts = []
    for _ in range(st["parts"]):
        kind = st["prims"] if st["prims"] != "mixed" else rng.choice(["line", "bezier", "ellipse", "polygon"])
        npts = {"line": 2, "bezier": 3, "ellipse": 2, "polygon": int(rng.integers(3, 6))}[kind]
        parts.append((kind, rng.uniform(5, 23, size=(npts, 2))))
    return parts


def render(parts, rng, st):
    img = np.zeros((28, 28), np.float32)
    for kind, pts in parts:
        p = np.clip(pts + rng.normal(0, st["jitter"], pts.shape), 1, 26)
        if kind == "line":
            rr, cc = draw.line(*p[0].astype(int), *p[1].astype(int))
        elif kind == "bezier":
            rr, cc = draw.bezier_curve(*p[0].astype(int), *p[1].astype(int), *p[2].astype(int), 1.0)
        elif kind == "ellipse":
            r = np.clip(np.abs(p[1] - 14) / 2 + 2, 2, 9)
            rr, cc = draw.ellipse_perimeter(int(p[0, 0]), int(p[0, 1]), int(r[0]), int(r[1]), shape=img.shape)
        else:
            rr, cc = draw.polygon_perimeter(p[:, 0], p[:, 1], shape=img.shape)
        img[rr, cc] = 1.0  # inside: points are clipped to [1, 26], ellipses and outlines cut at the image's shape
    if st["thick"]:
        img = morphology.dilation(img, morphology.disk(st["thick"]))
    angle = np.deg2rad(rng.uniform(-st["rot"], st["rot"]))
    scale = 1 + rng.uniform(-st["scale"], st["scale"])
    about_centre = (transform.AffineTransform(translation=(-14, -14))
                    + transform.AffineTransform(scale=scale, rotation=angle)
                    + transform.AffineTransform(translation=(14, 14)))
    img = transform.warp(img, about_centre.inverse, order=1)
    img = filters.gaussian(img, st["blur"])
    img = img / max(img.max(), 1e-6) + rng.normal(0, st["noise"], img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make(root, index, classes=10, per_class=300):
    rng = np.random.default_rng(1000 + index)
    st = style(rng)
    out = Path(root) / f"glyphs{index}"
    for c in range(classes):
        proto = prototype(rng, st)
        d = out / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(render(proto, rng, st)).save(d / f"{i:04d}.png")
    return st


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "data_cache" / "glyphs"),
                        help="folder of the datasets (default: the repository's data_cache/glyphs)")
    parser.add_argument("--datasets", type=int, default=6, help="how many (glyphs0, glyphs1, ...; default 6)")
    args = parser.parse_args()
    for i in range(args.datasets):
        print(f"glyphs{i}: {make(args.out, i)}", flush=True)
