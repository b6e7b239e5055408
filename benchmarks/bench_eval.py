"""Per-task latency of the whole method against the baselines, N = 256, one CPU thread, on identical tasks.

    .venv/bin/python benchmarks/bench_eval.py                                  # untrained models of the profile
    HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_eval.py --checkpoint models/hypernet_zero_shot_seed0-*.pt

The method's time is everything from the task's raw images to its clusters: VAE encoding (the conditioning),
backbone embedding, generation and the inner steps. The target: no slower than k-means on raw pixels on the
same tasks. Latency does not depend on the weights, so without a checkpoint untrained models of the profile's
architecture are timed. Images: mnist's test split when the mirror is reachable, else synthetic. Prints a table
and writes results/bench/eval.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import record, setup
from hmlib import data
from hmlib.artifacts import ArtifactError
from hmlib.backbone.embeddings import embed_images
from hmlib.backbone.model import ConvBackbone
from hmlib.cluster.estimator import default_checkpoint
from hmlib.config import load_config
from hmlib.data.registry import DatasetError
from hmlib.evaluation.methods import METHODS, run_clusterer
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.bundle import load_bundle
from hmlib.hyper.hypernet import HyperNet, TaskInputs
from hmlib.reproducibility import seeded
from hmlib.vae.model import build_vae
from hmlib.vae.train import encode_images


def models(args, cfg):
    """(hypernet, vae, backbone, adapt config, what) from a checkpoint's bundle, or untrained of the profile."""
    if args.checkpoint:
        bundle = load_bundle(args.checkpoint)
        return bundle.hypernet, bundle.vae, bundle.backbone, bundle.cfg.adapt, bundle.path.name
    with seeded(0):
        vae = build_vae(cfg.vae).eval()
        backbone = ConvBackbone(cfg.backbone.channels, cfg.backbone.embed_dim, 45).eval()
        hypernet = HyperNet(cfg.hyper, 2 * cfg.vae.latent_dim, cfg.backbone.embed_dim, cfg.task.num_classes).eval()
    return hypernet, vae, backbone, cfg.adapt, f"untrained {cfg.profile} models"


def images_and_tasks(cfg, num_tasks: int, n: int):
    """mnist test images and random K-class tasks of them, or synthetic images when no mirror is reachable."""
    try:
        split = data.load_split("mnist", "test", cfg.data, progress=False)
        images, labels, source = split.images, split.labels, "mnist test split"
    except DatasetError:
        rng = np.random.default_rng(0)
        labels = np.repeat(np.arange(10), 1000)
        images = (rng.random((10000, 28, 28)) * 255).astype(np.uint8)
        source = "synthetic images"
    return images, data.sample_tasks(labels, num_tasks, cfg.task.num_classes, n, seed=0), source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--checkpoint", help="zero-shot checkpoint (default: the newest in models/, else untrained models)")
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args(argv)
    machine = setup(1)
    if args.checkpoint is None:
        try:
            args.checkpoint = default_checkpoint()
        except ArtifactError:
            pass
    cfg = load_config(args.profile)
    hypernet, vae, backbone, adapt_cfg, what = models(args, cfg)
    images, tasks, source = images_and_tasks(cfg, args.tasks + 1, args.n)
    K, n_init = cfg.task.num_classes, cfg.eval.kmeans_n_init
    times: dict[str, list[float]] = {"method (VAE + backbone + generation + adaptation)": [], "  VAE encoding": [],
                                     "  backbone embedding": [], "  generation + inner steps": [],
                                     f"k-means on raw pixels (n_init={n_init})": [],
                                     f"k-means on the embedding (embedding + k-means, n_init={n_init})": []}
    with torch.no_grad():
        for t, idx in enumerate(tasks.indices):
            x = images[idx]
            start = time.perf_counter()
            mu, logvar = encode_images(vae, x)
            encoded = time.perf_counter()
            features = embed_images(backbone, x)
            embedded = time.perf_counter()
            inputs = TaskInputs.from_arrays(np.concatenate([mu, logvar], 1)[None], features[None])
            predict_task(hypernet, inputs, adapt_cfg)[-1].argmax(-1)
            done = time.perf_counter()
            pixel_start = time.perf_counter()
            run_clusterer(METHODS["kmeans_pixels"], x.reshape(len(x), -1).astype(np.float32) / 255.0, K, t, n_init)
            pixel_time = time.perf_counter() - pixel_start
            kmeans_start = time.perf_counter()
            run_clusterer(METHODS["kmeans_embedding"], embed_images(backbone, x), K, t, n_init)
            kmeans_time = time.perf_counter() - kmeans_start
            if t == 0:
                continue  # warm-up task: first calls pay for allocations
            for key, value in zip(times, (done - start, encoded - start, embedded - encoded, done - embedded,
                                          pixel_time, kmeans_time)):
                times[key].append(value)
    medians = {key: 1000 * float(np.median(v)) for key, v in times.items()}
    print(f"per-task latency, N = {args.n}, K = {K}, {args.tasks} tasks of the {source}, one thread, {what}, "
          f"{adapt_cfg.num_inner_steps} inner steps (median ms)")
    for key, value in medians.items():
        print(f"  {key:<70s} {value:8.1f}")
    method, pixels = medians[next(iter(medians))], medians[f"k-means on raw pixels (n_init={n_init})"]
    verdict = "met" if method <= pixels else "not met"
    print(f"target (method no slower than k-means on raw pixels): {verdict} ({method:.1f} vs {pixels:.1f} ms)")
    record("eval", {"method ms / task (N=256, 1 thread)": round(method, 1),
                    "k-means on raw pixels ms / task": round(pixels, 1),
                    "k-means on the embedding ms / task": round(medians[list(medians)[-1]], 1),
                    "target: method <= k-means on pixels": verdict, "_source": source, "_models": str(what),
                    "_machine": machine})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
