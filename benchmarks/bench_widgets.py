"""Latency of one interactive explorer update at N = 256 (target: under 0.3 s on this CPU).

An update that changes the inner lr, the loss or the task re-runs the inner loop to ``max_steps`` (one
``predict_task`` call); the widget then redraws its figure as a PNG. Both parts are timed over ``--updates``
updates with a fresh lr each (nothing cached). Untrained models of the profile (the cost does not depend on the
weights), synthetic features. Writes results/bench/widgets.json.

    .venv/bin/python benchmarks/bench_widgets.py [--profile default] [--updates 10]
"""
from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from common import record, setup  # noqa: E402
from hmlib.config import load_config  # noqa: E402
from hmlib.data import sample_tasks  # noqa: E402
from hmlib.hyper.hypernet import HyperNet  # noqa: E402
from hmlib.hyper.inputs import TaskData  # noqa: E402
from hmlib.plots import set_style  # noqa: E402
from hmlib.plots.ablations import ExplorerFigure  # noqa: E402
from hmlib.reproducibility import seeded  # noqa: E402
from hmlib.widgets import AdaptationExplorer, TaskSource  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--updates", type=int, default=10)
    args = parser.parse_args()
    machine = setup(1)
    cfg = load_config(args.profile)
    C, F, K = 2 * cfg.vae.latent_dim, cfg.backbone.embed_dim, cfg.task.num_classes
    with seeded(0):
        hypernet = HyperNet(cfg.hyper, C, F, K)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    features = (rng.normal(size=(5000, F)) + labels[:, None] * 0.3).astype(np.float32)
    task_data = TaskData("bench", "test", rng.normal(size=(5000, C)).astype(np.float32), features, labels)
    max_steps = max(cfg.ablation.step_grid)
    explorer = AdaptationExplorer(hypernet, {"bench": TaskSource(task_data, sample_tasks(labels, 4, K, args.num_images))},
                                  cfg.adapt, max_steps=max_steps)
    set_style()
    figure = ExplorerFigure(explorer.state)
    adapt_s, render_s = [], []
    for lr in np.geomspace(0.05, 3.0, args.updates):
        start = time.perf_counter()
        state = explorer.set(inner_lr=float(lr))
        mid = time.perf_counter()
        figure.update(state)
        figure.png()
        adapt_s.append(mid - start)
        render_s.append(time.perf_counter() - mid)
    total = 1000 * float(np.median(np.add(adapt_s, render_s)))
    print(f"{machine}; explorer update, N = {args.num_images}, {max_steps} inner steps, {args.updates} updates (median)")
    print(f"  adaptation {1000 * np.median(adapt_s):.1f} ms, redraw {1000 * np.median(render_s):.1f} ms, "
          f"whole update {total:.1f} ms (target < 300 ms)")
    record("widgets", {"explorer update ms (N=256, 32 steps)": round(total, 1),
                       "target < 300 ms": "met" if total < 300 else "not met", "_machine": machine})


if __name__ == "__main__":
    main()
