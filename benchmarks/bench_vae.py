"""Benchmark the VAE stage: training and encoding throughput (images/s) and peak memory of encoding all datasets.

Usage (from the repository root):
    HMLIB_DATA_DIR=/work/shared/data .venv/bin/python benchmarks/bench_vae.py [--profile default] [--threads 2]

Training and encoding throughput use the config's VAE on random uint8 images (the cost does not depend on
pixel values). Peak memory loads every dataset split of the protocol with hmlib.data and encodes it with a
fresh (untrained) VAE of the same shape, reporting the process's peak resident set size (ru_maxrss).
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import numpy as np
import torch

import hmlib
from hmlib.vae import build_vae, encode_images, train_vae


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--train-images", type=int, default=8192, help="images for one timed training epoch")
    parser.add_argument("--encode-images", type=int, default=20000)
    parser.add_argument("--skip-datasets", action="store_true", help="skip the all-datasets memory measurement")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = hmlib.load_config(args.profile)
    vae_cfg = cfg.vae
    print(f"VAE: variant={vae_cfg.variant} latent_dim={vae_cfg.latent_dim} likelihood={vae_cfg.likelihood} "
          f"batch_size={vae_cfg.batch_size}; torch threads={torch.get_num_threads()}")
    if not args.skip_datasets:
        encode_all_datasets(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(args.train_images, args.encode_images), 28, 28), dtype=np.uint8)
    model = build_vae(vae_cfg)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

    one_epoch = dataclasses.replace(vae_cfg, epochs=1)
    train_vae(model, images[:1024], one_epoch, progress=False)  # warm-up
    result = train_vae(model, images[:args.train_images], one_epoch, progress=False)
    print(f"training: {result.metrics['train_images_per_second']:,.0f} images/s "
          f"({args.train_images} images, 1 epoch, {result.metrics['train_seconds']:.1f} s)")
    if vae_cfg.max_train_images is not None:
        num_vaes = 1 + len(cfg.datasets)  # the shared VAE and one per dataset, as notebook 02 trains them
        images_seen = num_vaes * vae_cfg.epochs * vae_cfg.max_train_images
        print(f"=> notebook 02 trains {num_vaes} VAEs x {vae_cfg.epochs} epochs x {vae_cfg.max_train_images} images: "
              f"about {images_seen / result.metrics['train_images_per_second']:.0f} s at this rate")

    encode_images(model, images[:2048])  # warm-up
    start = time.perf_counter()
    encode_images(model, images[:args.encode_images])
    seconds = time.perf_counter() - start
    print(f"encoding: {args.encode_images / seconds:,.0f} images/s ({args.encode_images} images, {seconds:.2f} s)")


def encode_all_datasets(cfg: hmlib.Config) -> None:
    """Load and encode every split of the protocol with a fresh VAE; print time and peak RSS."""
    from hmlib.data import load_split

    model = build_vae(cfg.vae)
    before = peak_rss_mb()
    total, start = 0, time.perf_counter()
    for dataset in cfg.datasets:
        for split in ("train", "test"):
            image_set = load_split(dataset, split, cfg.data, progress=False)
            encode_images(model, image_set.images)
            total += len(image_set)
    seconds = time.perf_counter() - start
    print(f"all datasets ({', '.join(cfg.datasets)}; train + test): {total:,} images loaded and encoded in "
          f"{seconds:.1f} s ({total / seconds:,.0f} images/s incl. loading from the cache)")
    print(f"peak RSS: {before:,.0f} MiB after imports, {peak_rss_mb():,.0f} MiB after encoding all datasets")


if __name__ == "__main__":
    main()
