"""Per-task latency of every evaluated method at N = 256 (one CPU thread each), printed as a table.

    .venv/bin/python benchmarks/bench_eval.py                       # synthetic latents of the default shapes
    HMLIB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_eval.py --dataset mnist \
        --setting zero_shot [--checkpoint models/hypernet_zero_shot_seed0.pt]

Methods: hypernetwork generation + test-time adaptation (``predict_task``; a checkpoint, else an untrained
HyperNet of the configured architecture: latency does not depend on the weights), k-means on the VAE
means (n_init = ``cfg.eval.kmeans_n_init``), a Gaussian mixture on them, k-means on pixels, and the
supervised logistic-regression ceiling (fit + predict).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from hmlib import baselines, evaluate
from hmlib.config import load_config


def synthetic_inputs(num_classes: int, latent_dim: int, per_class: int = 1000, seed: int = 0) -> evaluate.EvalInputs:
    """Gaussian-blob latents and blob-coded pixels of plausible shapes (when no real latents are asked for)."""
    from hmlib.latents import LatentSet

    rng = np.random.default_rng(seed)
    classes = 10
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(size=(classes, latent_dim)) * 1.5
    mu = (centres[labels] + rng.normal(size=(len(labels), latent_dim))).astype(np.float32)
    logvar = rng.normal(-2.0, 0.3, size=mu.shape).astype(np.float32)
    latents = LatentSet("synthetic", "test", mu, logvar, labels, "synthetic")
    prototypes = rng.random((classes, 784)) < 0.2
    pixels = np.clip(prototypes[labels] * 0.8 + rng.random((len(labels), 784)) * 0.3, 0, 1).astype(np.float32)
    return evaluate.EvalInputs("synthetic", "zero_shot", latents, latents, pixels, labels, "synthetic")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--dataset", help="real dataset (needs its latents / VAE); default: synthetic blobs")
    parser.add_argument("--setting", default="zero_shot", choices=evaluate.SETTINGS)
    parser.add_argument("--checkpoint", help="hypernetwork checkpoint (default: untrained HyperNet of the config)")
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--n", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    cfg = load_config(args.profile, overrides={"eval": {"num_tasks": args.tasks}})
    if args.checkpoint:
        from hmlib.metatrain import load_hypernet

        hypernet, meta = load_hypernet(args.checkpoint)
        adapt_cfg = evaluate.checkpoint_adapt_config(meta, cfg.adapt)
    else:
        from hmlib.hypernet import HyperNet

        torch.manual_seed(0)
        hypernet, adapt_cfg = HyperNet(cfg.hyper, cfg.vae.latent_dim, cfg.task.num_classes), cfg.adapt
    if args.dataset:
        inputs = evaluate.load_inputs(cfg, args.dataset, args.setting)
    else:
        inputs = synthetic_inputs(cfg.task.num_classes, hypernet.latent_dim)
    suite = evaluate.suite_from_labels(inputs.labels, cfg, inputs.dataset, args.n)
    seed, n_init = 0, cfg.eval.kmeans_n_init

    with threadpool_limits(1):
        # warm-up (first calls pay for imports / allocations)
        evaluate.score_hypernet(hypernet, adapt_cfg, inputs.test.mu, inputs.test.logvar, suite[0],
                                pixels=inputs.pixels, progress=False)
        baselines.kmeans_latent(inputs.test.mu, suite[0], n_init=n_init, progress=False)
        results = {
            f"hypernet: generation + {adapt_cfg.num_inner_steps} inner steps": evaluate.score_hypernet(
                hypernet, adapt_cfg, inputs.test.mu, inputs.test.logvar, suite, pixels=inputs.pixels,
                progress=False).seconds,
            f"k-means on VAE means (n_init={n_init})": baselines.kmeans_latent(
                inputs.test.mu, suite, n_init=n_init, seed=seed, progress=False).seconds,
            "GMM on VAE means": baselines.gmm_latent(inputs.test.mu, suite, seed=seed, progress=False).seconds,
            f"k-means on pixels (n_init={n_init})": baselines.kmeans_pixels(
                inputs.pixels, suite, n_init=n_init, seed=seed, progress=False).seconds,
            f"logreg ceiling (fit on {cfg.eval.logreg_train_per_class}/class + predict)": baselines.logreg_ceiling(
                inputs.train.mu, inputs.train.labels, inputs.test.mu, suite,
                train_per_class=cfg.eval.logreg_train_per_class, seed=seed, progress=False).seconds,
        }
    source = f"{args.dataset} ({args.setting})" if args.dataset else "synthetic latents"
    print(f"Per-task latency, N = {args.n}, K = {cfg.task.num_classes}, {args.tasks} tasks, {source}, "
          f"latent dim {hypernet.latent_dim}, 1 thread, hypernet {'checkpoint' if args.checkpoint else 'untrained'}")
    print("| method | median ms | mean ms | p90 ms |\n|---|---:|---:|---:|")
    for name, seconds in results.items():
        ms = 1000 * np.asarray(seconds)
        print(f"| {name} | {np.median(ms):.2f} | {ms.mean():.2f} | {np.percentile(ms, 90):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
