"""``hmlib cluster`` on folders of images: throughput end to end, and accuracy where labels exist.

    HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_cluster.py [--checkpoint models/hypernet_seed0-*.pt]

Writes folders of 1,000 PNG images drawn from a test split (K = 4 and K = 10 classes; three independent draws each,
figures are their mean) and, after one untimed warm-up run, clusters each folder as ``hmlib cluster`` does, on one
thread (one decoding process): decode and preprocess (``load_images``), load the checkpoint, then
``HyperClusterer.fit``: the VAE rows, the hypernetwork's generation and inner steps for every test-time candidate
through the backbone, the label-free choice, and the assignment of every image. Beside it, from the same decoded
images: k-means on raw pixels, k-means on the backbone embedding, and the plain adaptation (``eval.plain_steps``
steps in both normalisation modes, k-means, silhouette choice: the benchmark's ``plain_choice`` row, the folder as
one task); their images/s include the same decoding. Then ``--k auto`` (silhouette, K = 2..12) chooses K and we
count how often it finds the true K.
Writes results/bench/cluster.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from common import record, setup
from hmlib import data
from hmlib.cluster.estimator import HyperClusterer, default_checkpoint
from hmlib.cluster.images import export_image_folder, load_images
from hmlib.evaluation.methods import METHODS, MethodContext, kmeans_clusters
from hmlib.features import normalize_task_np
from hmlib.hyper.bundle import load_bundle
from hmlib.metrics import clustering_accuracy

K_MAX = 12  # --k auto tries K = 2..K_MAX


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="hypernetwork checkpoint (default: the pipeline's first)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    parser.add_argument("--ks", nargs="+", type=int, default=[4, 10], help="classes per folder")
    parser.add_argument("--folders", type=int, default=3, help="folders (independent draws of classes and images) per "
                                                                "dataset and K; figures are their mean")
    parser.add_argument("--no-auto", action="store_true", help="skip --k auto (11 fits per folder)")
    args = parser.parse_args()
    machine = setup(1)
    args.checkpoint = args.checkpoint or default_checkpoint()
    cfg = load_bundle(args.checkpoint).cfg
    print(f"{machine}; {Path(args.checkpoint).name}; {args.folders} folders of up to {args.images} images per dataset "
          "and K (mean [min, max])")
    figures, rng = {}, np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            split = data.load_split(dataset, "test", cfg.data, progress=False)
            if dataset == args.datasets[0]:  # first calls pay one-time costs (allocations, lazy imports): not timed
                warm_up(args.checkpoint, cfg, split.images[:200], np.arange(200) % 2)
            for k in args.ks:
                rows = [score_folder(args, cfg, split, k, rng, Path(tmp) / f"{dataset}_k{k}_{i}")
                        for i in range(args.folders)]
                row = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
                spread = {key: (min(r[key] for r in rows), max(r[key] for r in rows)) for key in rows[0]}
                print(f"{dataset}, K = {k}:")
                for key, value in row.items():
                    print(f"  {key:<62s} {value:8.1f} [{spread[key][0]:.1f}, {spread[key][1]:.1f}]")
                figures.update({f"{dataset} K={k}: {key}": round(v, 1) for key, v in row.items()})
    record("cluster", {**figures, "_machine": machine, "_checkpoint": str(args.checkpoint)})


def score_folder(args: argparse.Namespace, cfg, split, k: int, rng: np.random.Generator, where: Path) -> dict:
    """Draw K classes and ``args.images`` images of them, write them as PNGs, cluster the folder; the figures."""
    classes = np.sort(rng.choice(np.unique(split.labels), size=k, replace=False))
    pool = np.flatnonzero(np.isin(split.labels, classes))
    pick = np.sort(rng.choice(pool, size=min(args.images, len(pool)), replace=False))
    folder = export_image_folder(split.images[pick], where)
    start = time.perf_counter()
    collection = load_images(folder, progress=False, num_workers=1)
    decoded = time.perf_counter()
    clusterer = HyperClusterer.from_checkpoint(args.checkpoint, n_clusters=k).fit(collection.images)
    seconds = time.perf_counter() - start
    decode = decoded - start
    order = np.argsort(collection.names)  # names are the row order written above
    labels = np.searchsorted(classes, split.labels[pick])
    images = collection.images[order]
    n = len(images)

    def timed(fn):
        begin = time.perf_counter()
        clusters = fn()
        return clusters, n / (decode + time.perf_counter() - begin)

    pixels, pixels_rate = timed(lambda: kmeans_clusters(images.reshape(n, -1) / 255.0, k, 0, cfg.eval.kmeans_n_init))
    embedding, embedding_rate = timed(lambda: kmeans_clusters(normalize_task_np(clusterer.transform(images), l2=True),
                                                              k, 0, cfg.eval.kmeans_n_init))
    plain_acc, plain_rate = timed(lambda: plain_choice(clusterer.bundle.backbone, images, labels, k, cfg))
    figures = {"hmlib cluster %": 100 * clustering_accuracy(clusterer.labels_[order], labels, k),
               "k-means on raw pixels %": 100 * clustering_accuracy(pixels, labels, k),
               "k-means on the embedding %": 100 * clustering_accuracy(embedding, labels, k),
               "plain adaptation %": 100 * plain_acc,
               "images/s end to end": n / seconds,
               "decoding + preprocessing ms (in each end to end)": 1000 * decode,
               "k-means on raw pixels, images/s end to end": pixels_rate,
               "k-means on the embedding, images/s end to end": embedding_rate,
               "plain adaptation, images/s end to end": plain_rate}
    if not args.no_auto:
        chosen = clusterer.select_n_clusters(collection.images, candidates=range(2, K_MAX + 1))
        figures.update({"--k auto: true K found (share of folders)": float(chosen == k),
                        "--k auto: K chosen": float(chosen)})
    return figures


def warm_up(checkpoint, cfg, images: np.ndarray, labels: np.ndarray) -> None:
    """Run the method and the plain adaptation once on a few images."""
    clusterer = HyperClusterer.from_checkpoint(checkpoint, n_clusters=2).fit(images)
    plain_choice(clusterer.bundle.backbone, images, labels, 2, cfg)


def plain_choice(backbone, images: np.ndarray, labels: np.ndarray, k: int, cfg) -> float:
    """Accuracy of the plain adaptation on the folder as one task, as the ``plain_choice`` row computes it."""
    suite = data.TaskBatch(np.arange(len(images))[None], labels[None], np.arange(k)[None])
    ctx = MethodContext(cfg, SimpleNamespace(images=images, backbone=backbone), suite, 0)
    return float(METHODS["plain_choice"].score(ctx)[0])


if __name__ == "__main__":
    main()
