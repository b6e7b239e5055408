"""Training and encoding throughput of the VAE and the backbone (images/s), one thread, random images.

    .venv/bin/python benchmarks/bench_vae.py [--profile default] [--train-images 4096]

The cost does not depend on pixel values. The VAE: one epoch of ``train_vae``, then ``encode_images`` (what
``get_latents`` runs on every split). The backbone: one epoch of ``train_backbone`` as notebook 02 runs it (random
affine augmentation, and a random train-family corruption on a share ``backbone.shift_prob`` of the images), and
the same without the corruptions (their cost), then ``embed_images``. Also estimates what notebook 02 spends
training the shared VAE and the backbone of every replicate seed of the profile. Writes results/bench/models.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from common import record, setup
from hmlib.backbone.embeddings import embed_images
from hmlib.backbone.model import ConvBackbone
from hmlib.config import load_config
from hmlib.data import ImageSet
from hmlib.backbone.train import train_backbone
from hmlib.vae.model import build_vae
from hmlib.vae.train import encode_images, train_vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--encode-images", type=int, default=10000)
    args = parser.parse_args()
    machine = setup(1)
    cfg = load_config(args.profile)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(args.train_images, args.encode_images), 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images))

    vae = build_vae(cfg.vae)
    one_epoch = dataclasses.replace(cfg.vae, epochs=1)
    vae_train = train_vae(vae, images[:args.train_images], one_epoch, progress=False).metrics["train_images_per_second"]
    start = time.perf_counter()
    encode_images(vae, images[:args.encode_images])
    vae_encode = args.encode_images / (time.perf_counter() - start)

    image_set = ImageSet("random", "train", images, labels, [str(i) for i in range(10)], "random")

    def backbone_rate(shift_prob: float) -> float:
        """Images/s of one epoch of backbone training with a share ``shift_prob`` of the images corrupted."""
        bb = dataclasses.replace(cfg.backbone, epochs=1, images_per_dataset=args.train_images, shift_prob=shift_prob)
        _, record_ = train_backbone([image_set], dataclasses.replace(cfg, backbone=bb), 0, progress=False)
        return record_["metrics"]["train_images_per_second"]

    bb_train, bb_train_clean = backbone_rate(cfg.backbone.shift_prob), backbone_rate(0.0)
    backbone = ConvBackbone(cfg.backbone.channels, cfg.backbone.embed_dim, 10).eval()
    start = time.perf_counter()
    embed_images(backbone, images[:args.encode_images])
    bb_encode = args.encode_images / (time.perf_counter() - start)

    seeds, datasets = len(cfg.seeds), len(cfg.meta.train_datasets)
    vae_images = seeds * cfg.vae.epochs * (cfg.vae.max_train_images or 60000 * datasets)  # one shared VAE per seed
    bb_images = seeds * cfg.backbone.epochs * cfg.backbone.images_per_dataset * datasets
    print(f"{machine}")
    print(f"VAE ({cfg.vae.variant}, d = {cfg.vae.latent_dim}): training {vae_train:,.0f} images/s, encoding "
          f"{vae_encode:,.0f} images/s")
    print(f"backbone (channels {cfg.backbone.channels}): training {bb_train:,.0f} images/s (augmentation, train-family "
          f"shifts on {cfg.backbone.shift_prob:.0%} of the images; {bb_train_clean:,.0f} without the shifts), "
          f"embedding {bb_encode:,.0f} images/s")
    print(f"notebook 02 of '{args.profile}': {seeds} shared VAE(s) ~ {vae_images / vae_train:.0f} s, "
          f"{seeds} backbone(s) ~ {bb_images / bb_train:.0f} s of training")
    record("models", {"VAE training images/s": round(vae_train), "VAE encoding images/s": round(vae_encode),
                      "backbone training images/s": round(bb_train),
                      "backbone training images/s, without shifts": round(bb_train_clean),
                      "backbone embedding images/s": round(bb_encode), "_machine": machine})


if __name__ == "__main__":
    main()
