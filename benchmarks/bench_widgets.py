"""Latency of one interactive explorer update at N = 256 (target: under 0.3 s on this CPU).

An update that changes the inner lr, the loss or the task re-runs the inner loop to ``max_steps``
(one ``predict_task`` call); the widget then redraws its figure as a PNG. Both parts are timed,
separately and together, over ``--updates`` updates with a fresh lr each (so nothing is cached).

    .venv/bin/python benchmarks/bench_widgets.py [--profile default] [--checkpoint models/hypernet_zero_shot_seed0.pt]

Without ``--checkpoint`` the hypernetwork is randomly initialised from the profile's config: the
cost of an update does not depend on the weights, only on the architecture and sizes.
"""
from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402

import hmlib  # noqa: E402
from hmlib.data import sample_tasks  # noqa: E402
from hmlib.hypernet import HyperNet  # noqa: E402
from hmlib.plots import set_style  # noqa: E402
from hmlib.plots.ablations import ExplorerFigure  # noqa: E402
from hmlib.widgets import AdaptationExplorer, TaskSource  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--checkpoint", default=None, help="a meta-trained hypernetwork (default: random init)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=None, help="default: max of ablation.step_grid")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = hmlib.load_config(args.profile)
    if args.checkpoint:
        from hmlib.metatrain import load_hypernet

        hypernet, meta = load_hypernet(args.checkpoint)
        latent_dim, num_classes = int(meta["latent_dim"]), int(meta["num_classes"])
    else:
        latent_dim, num_classes = cfg.vae.latent_dim, cfg.task.num_classes
        torch.manual_seed(0)
        hypernet = HyperNet(cfg.hyper, latent_dim, num_classes)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    mu = (rng.normal(size=(5000, latent_dim)) + labels[:, None] * 0.3).astype(np.float32)
    logvar = (rng.normal(size=mu.shape) * 0.1 - 2).astype(np.float32)
    images = rng.integers(0, 256, (5000, 28, 28), dtype=np.uint8) if hypernet.use_pixels else None
    suite = sample_tasks(labels, 4, num_classes, args.num_images, seed=0)
    max_steps = args.max_steps if args.max_steps is not None else max(cfg.ablation.step_grid)
    explorer = AdaptationExplorer(hypernet, {"bench": TaskSource(mu, logvar, suite, images)}, cfg.adapt,
                                  max_steps=max_steps)
    set_style()
    figure = ExplorerFigure(explorer.state)  # warm-up: built once, as the widget does
    lrs = np.geomspace(0.05, 3.0, args.updates)
    adapt_s, render_s, total_s = [], [], []
    for lr in lrs:
        start = time.perf_counter()
        state = explorer.set(inner_lr=float(lr))
        mid = time.perf_counter()
        figure.update(state)
        figure.png()
        end = time.perf_counter()
        adapt_s.append(mid - start)
        render_s.append(end - mid)
        total_s.append(end - start)
    cached = []
    for steps in range(0, max_steps + 1, max(1, max_steps // 8)):
        start = time.perf_counter()
        explorer.set(num_steps=steps)
        cached.append(time.perf_counter() - start)

    def fmt(values: list[float]) -> str:
        return f"median {1000 * np.median(values):7.1f} ms   max {1000 * np.max(values):7.1f} ms"

    print(f"explorer update, N = {args.num_images}, {max_steps} inner steps, {cfg.adapt.inner_loss}, "
          f"adapt_params={cfg.adapt.adapt_params}, {'checkpoint' if args.checkpoint else 'random init'}, "
          f"{args.threads} thread(s), {args.updates} updates")
    print(f"  adaptation (new lr, {max_steps} steps): {fmt(adapt_s)}")
    print(f"  figure redraw (in place, PNG):          {fmt(render_s)}")
    print(f"  whole update:                           {fmt(total_s)}   target < 300 ms")
    print(f"  steps slider only (cached run):         {fmt(cached)}")


if __name__ == "__main__":
    main()
