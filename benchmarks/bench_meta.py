"""Meta-training iterations per second and per-task latency of generation + adaptation (synthetic inputs).

    .venv/bin/python benchmarks/bench_meta.py [--profile default] [--iterations 20] [--tasks 30]

Inputs of the configured shapes (the cost does not depend on their values), one thread. Writes
results/bench/meta.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from common import record, setup
from hmlib.config import load_config
from hmlib.hyper.adapt import adapt, predict_task
from hmlib.hyper.hypernet import HyperNet, TaskInputs
from hmlib.hyper.losses import aligned_cross_entropy
from hmlib.reproducibility import seeded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=30)
    args = parser.parse_args()
    machine = setup(1)
    cfg = load_config(args.profile)
    C, F, K, N, T = 2 * cfg.vae.latent_dim, cfg.backbone.embed_dim, cfg.task.num_classes, cfg.task.num_images, \
        cfg.meta.meta_batch_size
    with seeded(0):
        hypernet = HyperNet(cfg.hyper, C, F, K)
    optimizer = torch.optim.Adam(hypernet.parameters(), lr=cfg.meta.outer_lr)

    def outer_step() -> None:
        inputs = TaskInputs(torch.randn(T, N, C), torch.randn(T, N, F))
        result = adapt(hypernet, inputs, cfg.adapt, create_graph=True)
        loss = aligned_cross_entropy(result.logits[-1], torch.randint(0, K, (T, N)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    outer_step()
    start = time.perf_counter()
    for _ in range(args.iterations):
        outer_step()
    per_iteration = (time.perf_counter() - start) / args.iterations
    hypernet.eval()
    tasks = [TaskInputs(torch.randn(1, N, C), torch.randn(1, N, F)) for _ in range(args.tasks)]
    latency = {}
    with torch.no_grad():
        for steps in sorted({0, cfg.adapt.num_inner_steps, 32}):
            predict_task(hypernet, tasks[0], cfg.adapt, num_steps=steps)
            start = time.perf_counter()
            for task in tasks:
                predict_task(hypernet, task, cfg.adapt, num_steps=steps)
            latency[steps] = 1000 * (time.perf_counter() - start) / len(tasks)
    print(f"{machine}; meta-batch {T} tasks of N = {N}, {cfg.adapt.num_inner_steps} inner steps in the graph")
    print(f"meta-training: {1 / per_iteration:.2f} iterations/s -> {cfg.meta.iterations} iterations ~ "
          f"{per_iteration * cfg.meta.iterations:.0f} s (without validation)")
    for steps, ms in latency.items():
        print(f"generation + {steps} inner steps, one task of N = {N}: {ms:.1f} ms")
    record("meta", {"meta-training iterations/s": round(1 / per_iteration, 2),
                    **{f"generation + {s} inner steps, ms / task": round(ms, 1) for s, ms in latency.items()},
                    "_machine": machine})


if __name__ == "__main__":
    main()
