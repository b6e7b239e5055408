"""``hmlib cluster`` on folders of images: throughput end to end, and accuracy where labels exist.

    HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_cluster.py --checkpoint models/hypernet_zero_shot_seed0-*.pt

Writes folders of 1,000 PNG images drawn from a test split (K = 4 and K = 10 classes; three independent draws each,
figures are their mean), clusters each folder as
``hmlib cluster`` does (decode, preprocess, embed, generate, adapt, assign), times it on one thread, and scores the
clusters against the labels the folder was drawn from, beside k-means on raw pixels and on the backbone embedding
of the same images; then lets ``--k auto`` (silhouette, K = 2..12) choose K and counts how often it finds the true K.
Writes results/bench/cluster.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import record, setup
from hmlib import data
from hmlib.cluster.estimator import HyperClusterer, default_checkpoint
from hmlib.cluster.images import export_image_folder, load_images
from hmlib.config import load_config
from hmlib.evaluation.methods import METHODS, run_clusterer
from hmlib.metrics import clustering_accuracy

K_MAX = 12  # --k auto tries K = 2..K_MAX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="zero-shot checkpoint (default: the newest in models/)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--folders", type=int, default=3, help="folders (independent draws of classes and images) per "
                                                                "dataset and K; figures are their mean")
    args = parser.parse_args()
    machine = setup(1)
    args.checkpoint = args.checkpoint or default_checkpoint()
    cfg = load_config("default")
    figures, rng = {}, np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            split = data.load_split(dataset, "test", cfg.data, progress=False)
            for k in (4, 10):
                rows = [score_folder(args, cfg, split, k, rng, Path(tmp) / f"{dataset}_k{k}_{i}")
                        for i in range(args.folders)]
                row = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
                spread = {key: (min(r[key] for r in rows), max(r[key] for r in rows)) for key in rows[0]}
                print(f"{dataset}, K = {k}, {args.folders} folders of {args.images} images (mean, range): " + ", ".join(
                    f"{key} {v:.1f} [{spread[key][0]:.1f}, {spread[key][1]:.1f}]" for key, v in row.items()))
                figures.update({f"{dataset} K={k}: {key}": round(v, 1) for key, v in row.items()})
    print(machine)
    record("cluster", {**figures, "_machine": machine, "_checkpoint": str(args.checkpoint)})


def score_folder(args: argparse.Namespace, cfg, split, k: int, rng: np.random.Generator, where: Path) -> dict:
    """Draw K classes and ``args.images`` images of them, write them as PNGs, cluster the folder; the figures."""
    classes = np.sort(rng.choice(np.unique(split.labels), size=k, replace=False))
    pool = np.flatnonzero(np.isin(split.labels, classes))
    pick = np.sort(rng.choice(pool, size=args.images, replace=False))
    folder = export_image_folder(split.images[pick], where)
    labels = np.searchsorted(classes, split.labels[pick])
    start = time.perf_counter()
    collection = load_images(folder, progress=False)
    clusterer = HyperClusterer.from_checkpoint(args.checkpoint, n_clusters=k).fit(collection.images)
    seconds = time.perf_counter() - start
    order = np.argsort(collection.names)  # names are the row order written above
    pred = clusterer.labels_[order]
    pixels = run_clusterer(METHODS["kmeans_pixels"], collection.images.reshape(len(pick), -1) / 255.0,
                           k, 0, cfg.eval.kmeans_n_init)[0][order]
    embedding = run_clusterer(METHODS["kmeans_embedding"], clusterer.transform(collection.images), k, 0,
                              cfg.eval.kmeans_n_init)[0][order]
    chosen = clusterer.select_n_clusters(collection.images, candidates=range(2, K_MAX + 1))  # after the K = k figures
    return {"hmlib cluster %": 100 * clustering_accuracy(pred, labels, k),
            "--k auto: true K found (share of folders)": float(chosen == k),
            "--k auto: K chosen": float(chosen),
            "k-means on raw pixels %": 100 * clustering_accuracy(pixels, labels, k),
            "k-means on the embedding %": 100 * clustering_accuracy(embedding, labels, k),
            "images/s end to end": len(pick) / seconds}


if __name__ == "__main__":
    main()
