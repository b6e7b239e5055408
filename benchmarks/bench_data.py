"""Data-stage speed: mirror -> cache for the four offline datasets, cache load, task sampling, shifted datasets.

    HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_data.py [--profile default] [--workers N]

Targets (issue 2): mirror -> cache <= 60 s for ~160,000 images; cache load < 1 s; >= 10,000 tasks/s at N = 256.
Shifted datasets: the time to build ``mnist+<corruption>`` (test split, from the cached base: the corruption and
the cache write) for every corruption of ``hmlib.data.corruptions``, benchmark and train family.
Artifacts go to a temporary HMLIB_HOME (removed after) unless --keep-home, so the repository's cache is not
touched; the figures go to the real home's results/bench/data.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "hebrew_chars", "math_shapes")


def main() -> None:
    """Parse the arguments; run in a temporary artifact home (removed after) unless --keep-home."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--keep-home", action="store_true", help="use the real HMLIB_HOME instead of a temp dir")
    parser.add_argument("--profile", default="default", help="data settings (smoke: 600 images per split)")
    parser.add_argument("--num-tasks", type=int, default=10_000)
    parser.add_argument("--shift-base", default="mnist", help="the dataset every corruption is applied to")
    args = parser.parse_args()
    from hmlib import paths

    results = paths.results_dir()  # figures go to the real home's results, the caches to a temporary one
    if args.keep_home:
        return measure(args, results)
    os.environ["HMLIB_HOME"] = temporary = tempfile.mkdtemp(prefix="hmlib-bench-")
    try:
        measure(args, results)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def measure(args: argparse.Namespace, results) -> None:
    """Every figure, written to ``results``/bench/data.json."""
    import torch

    torch.set_num_threads(1)
    from hmlib.config import load_config
    from hmlib.data import CORRUPTIONS, TaskSampler, fit_task_size, load_split

    cfg = load_config(args.profile).data
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
        num_images = fit_task_size(labels, 4, num_images)  # smaller only where the profile subsamples the splits
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

    base = sets[(args.shift_base, "test")]
    print(f"shifted datasets: {args.shift_base}+<corruption>, test split ({len(base)} images), built from the cache")
    shift_s = {}
    for name, corruption in CORRUPTIONS.items():
        t0 = time.perf_counter()
        load_split(f"{args.shift_base}+{name}", "test", cfg, rebuild=True, progress=False)
        shift_s[name] = time.perf_counter() - t0
        rate = len(base) / shift_s[name]
        print(f"  {corruption.family:<9s} {name:<16s} {shift_s[name]:6.2f} s ({rate:,.0f} images/s)")
    for family in ("benchmark", "train"):
        names = [n for n, c in CORRUPTIONS.items() if c.family == family]
        total_s = sum(shift_s[n] for n in names)
        slowest = max(names, key=shift_s.get)
        print(f"  {family} family: {len(names)} corruptions in {total_s:.1f} s, slowest {slowest} "
              f"({shift_s[slowest]:.2f} s)")
        figures[f"shifted {args.shift_base} test, {family} family ({len(names)} corruptions), s"] = round(total_s, 1)
        figures[f"shifted {args.shift_base} test, slowest {family} corruption ({slowest}), s"] = \
            round(shift_s[slowest], 2)
    figures["_shifted_seconds"] = {name: round(v, 3) for name, v in shift_s.items()}  # every one, kept out of the table
    from common import record, setup

    figures["_machine"] = setup(1)
    record("data", figures, results)


if __name__ == "__main__":
    main()
