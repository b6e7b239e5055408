"""Data-stage speed: mirror -> cache for the four offline datasets, cache load, task sampling.

Run: HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_data.py [--workers N] [--keep-home]
Targets (issue 2): mirror -> cache <= 60 s for ~160,000 images; cache load < 1 s; >= 10,000 tasks/s at N = 256.
Artifacts go to a temporary HMLIB_HOME unless --keep-home, so the repository's cache is not touched.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "hebrew_chars", "math_shapes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--keep-home", action="store_true", help="use the real HMLIB_HOME instead of a temp dir")
    parser.add_argument("--num-tasks", type=int, default=10_000)
    args = parser.parse_args()
    from hmlib import paths

    results = paths.results_dir()  # figures go to the real home's results, the caches to a temporary one
    if not args.keep_home:
        os.environ["HMLIB_HOME"] = tempfile.mkdtemp(prefix="hmlib-bench-")
    import torch

    torch.set_num_threads(1)
    from hmlib.config import load_config
    from hmlib.data import TaskSampler, load_split

    cfg = load_config("default").data
    print(f"cores visible: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f} "
          f"(other jobs share the cores), workers: {args.workers or 'auto'}")

    start, total = time.perf_counter(), 0
    for name in DATASETS:
        for split in ("train", "test"):
            t0 = time.perf_counter()
            images = load_split(name, split, cfg, rebuild=True, progress=False, num_workers=args.workers)
            total += len(images)
            print(f"  build {name}/{split}: {len(images)} images in {time.perf_counter() - t0:.2f} s")
    build_s = time.perf_counter() - start
    print(f"mirror -> cache: {total} images in {build_s:.1f} s ({total / build_s:,.0f} images/s; target <= 60 s)")
    figures = {"mirror -> cache, 4 offline datasets, s (target <= 60)": round(build_s, 1)}

    start = time.perf_counter()
    sets = {(n, s): load_split(n, s, cfg, progress=False) for n in DATASETS for s in ("train", "test")}
    load_s = time.perf_counter() - start
    print(f"cache load (all 8 splits): {load_s:.3f} s (target < 1 s)")
    figures["cache load, 8 splits, s (target < 1)"] = round(load_s, 3)

    for name, num_images in (("mnist", 256), ("hebrew_chars", 256), ("mnist", 64)):
        labels = sets[(name, "train")].labels
        sampler = TaskSampler(labels, 4, num_images)
        rng = np.random.default_rng(0)
        sampler.sample(100, rng)  # warm-up
        rates = []
        for _ in range(3):
            t0 = time.perf_counter()
            sampler.sample(args.num_tasks, rng)
            rates.append(args.num_tasks / (time.perf_counter() - t0))
        print(f"task sampling {name} train, K=4, N={num_images}: median {np.median(rates):,.0f} tasks/s, best "
              f"{max(rates):,.0f} of 3 runs of {args.num_tasks:,} (target >= 10,000 at N=256)")
        figures[f"task sampling {name} N={num_images}, tasks/s"] = round(float(np.median(rates)))
    from common import record, setup

    figures["_machine"] = setup(1)
    record("data", figures, results)


if __name__ == "__main__":
    main()
