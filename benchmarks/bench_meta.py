"""Benchmark: meta-training iterations per second and per-task latency of generation + adaptation.

Run: ``.venv/bin/python benchmarks/bench_meta.py [--profile default] [--iterations 30] [--tasks 50]``.
Uses synthetic latents of the configured dimension (speed does not depend on their values), one torch
thread, and prints the figures; k-means (n_init from the config) on the same task is timed for reference.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.cluster import KMeans

from hmlib.adapt import adapt, aligned_cross_entropy, predict_task
from hmlib.config import load_config
from hmlib.hypernet import HyperNet, TaskInputs, target_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--iterations", type=int, default=30, help="timed meta-training iterations")
    parser.add_argument("--tasks", type=int, default=50, help="timed test tasks")
    parser.add_argument("--num-images", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.profile)
    d, K, N, Q, T = cfg.vae.latent_dim, cfg.task.num_classes, cfg.task.num_images, cfg.meta.query_size, \
        cfg.meta.meta_batch_size
    torch.manual_seed(0)
    hypernet = HyperNet(cfg.hyper, d, K)
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=cfg.meta.outer_lr)
    print(f"profile={args.profile} conditioning={cfg.hyper.conditioning} generation={cfg.hyper.generation} "
          f"adapt_params={cfg.adapt.adapt_params} inner_loss={cfg.adapt.inner_loss} S={cfg.adapt.num_inner_steps} "
          f"d={d} K={K} threads={torch.get_num_threads()} params={sum(p.numel() for p in hypernet.parameters())}")

    def outer_step() -> None:
        support = TaskInputs(torch.randn(T, N, d), torch.randn(T, N, d))
        query = TaskInputs(torch.randn(T, Q, d), torch.randn(T, Q, d))
        result = adapt(hypernet, support, cfg.adapt, create_graph=True)
        logits = target_forward(result.target_params, hypernet.target_features(query))
        loss = aligned_cross_entropy(logits, torch.randint(0, K, (T, Q)))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hypernet.parameters(), cfg.meta.grad_clip)
        optimizer.step()

    for _ in range(3):
        outer_step()
    start = time.perf_counter()
    for _ in range(args.iterations):
        outer_step()
    per_iter = (time.perf_counter() - start) / args.iterations
    print(f"meta-training: {1 / per_iter:.1f} iterations/s ({per_iter * 1000:.1f} ms/iteration, meta-batch {T}, "
          f"N={N} support + {Q} query) -> {cfg.meta.iterations} iterations ~ {per_iter * cfg.meta.iterations:.0f} s "
          "(without periodic validation)")

    hypernet.eval()
    rng = np.random.default_rng(0)
    n = args.num_images
    tasks = [(torch.randn(n, d), torch.randn(n, d)) for _ in range(args.tasks)]
    for steps in sorted({cfg.adapt.num_inner_steps, 32}):
        predict_task(hypernet, TaskInputs(*tasks[0]), cfg.adapt, num_steps=steps)
        start = time.perf_counter()
        for mu, logvar in tasks:
            predict_task(hypernet, TaskInputs(mu, logvar), cfg.adapt, num_steps=steps).argmax(-1)
        ms = (time.perf_counter() - start) / len(tasks) * 1000
        print(f"generation + {steps} inner steps (predict_task, N={n}): {ms:.1f} ms/task")
    start = time.perf_counter()
    for mu, _ in tasks[:10]:
        KMeans(K, n_init=cfg.eval.kmeans_n_init, random_state=int(rng.integers(1 << 31))).fit_predict(mu.numpy())
    print(f"sklearn k-means (n_init={cfg.eval.kmeans_n_init}, N={n}, d={d}) on the same tasks: "
          f"{(time.perf_counter() - start) / 10 * 1000:.1f} ms/task")


if __name__ == "__main__":
    main()
