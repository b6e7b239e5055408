"""Latency of one explorer update at N = 256: a slider move (target: under 300 ms) and a fresh adaptation run.

    HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_widgets.py [--checkpoint ...] [--updates 10]

Notebook 04's explorer (``hmlib.widgets.AdaptationExplorer``) adapts a task to ``max_steps`` (the largest of
``ablation.step_grid``) once per (dataset, task, step-size scale, inner loss) and caches the run; the widget then
redraws its figure as a PNG (``ExplorerFigure.update`` + ``png``). Timed, one thread, median over updates: moving the
inner-steps slider over every step count (the state from the cache, then the redraw), and switching to a new task
(every test-time candidate adapted for the test-time steps, the label-free choice, the kept one adapted to
``max_steps`` with its trajectory, the projection of each step's representation, then the redraw). Models of the
pipeline's first checkpoint, else untrained ones of ``--profile``; mnist's test split, else synthetic images. Writes
results/bench/widgets.json.
"""
from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from common import encode_tasks, load_models, record, setup, split_images, task_size  # noqa: E402
from hmlib.data import sample_tasks  # noqa: E402
from hmlib.hyper.inputs import TaskData, reads_images  # noqa: E402
from hmlib.plots import set_style  # noqa: E402
from hmlib.plots.ablations import ExplorerFigure  # noqa: E402
from hmlib.widgets import AdaptationExplorer, TaskSource  # noqa: E402

TARGET_MS = 300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="architecture of the untrained models (no checkpoint)")
    parser.add_argument("--checkpoint", help="hypernetwork checkpoint (default: the pipeline's first, else untrained)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--updates", type=int, default=10, help="new tasks timed (the slider: every step count)")
    args = parser.parse_args()
    machine = setup(1)
    models = load_models(args.profile, args.checkpoint)
    cfg, K = models.cfg, models.cfg.task.num_classes
    images, labels, source = split_images(cfg)
    N = task_size(labels, K, args.num_images)
    context = encode_tasks(models.vae, images)
    task_data = TaskData("bench", "test", context, labels, images=images,
                         features=None if reads_images(cfg) else context)
    max_steps = max(cfg.ablation.step_grid)
    suite = sample_tasks(labels, args.updates + 1, K, N)
    explorer = AdaptationExplorer(models.hypernet, {"bench": TaskSource(task_data, suite)}, cfg.adapt,
                                  max_steps=max_steps)
    set_style()
    figure = ExplorerFigure(explorer.state)  # task 0: the warm-up

    def update(**change) -> tuple[float, float]:
        """(seconds for the explorer's new state, seconds for the redraw) of one change."""
        start = time.perf_counter()
        state = explorer.set(**change)
        mid = time.perf_counter()
        figure.update(state)
        figure.png()
        return mid - start, time.perf_counter() - mid

    fresh = np.array([update(task=t) for t in range(1, args.updates + 1)])  # (updates, 2)
    slider = np.array([update(num_steps=s) for s in [*range(max_steps + 1), 0]])
    fresh_ms, slider_ms = 1000 * np.median(fresh.sum(1)), 1000 * np.median(slider.sum(1))
    verdict = "met" if slider_ms < TARGET_MS else "not met"
    print(f"{machine}; {models.what}; explorer on the {source}, K = {K}, N = {N}, adapted to {max_steps} steps, "
          f"candidates {', '.join(cfg.adapt.candidates)} (median ms)")
    print(f"  slider move ({len(slider)} moves): state {1000 * np.median(slider[:, 0]):.1f} + redraw "
          f"{1000 * np.median(slider[:, 1]):.1f} = {slider_ms:.1f} ms (target < {TARGET_MS} ms: {verdict})")
    print(f"  new task ({len(fresh)} tasks): adaptation {1000 * np.median(fresh[:, 0]):.1f} + redraw "
          f"{1000 * np.median(fresh[:, 1]):.1f} = {fresh_ms:.1f} ms")
    record("widgets", {f"explorer slider move ms (N={N})": round(slider_ms, 1),
                       f"explorer new task ms (N={N}, {max_steps} steps)": round(fresh_ms, 1),
                       f"target: slider move < {TARGET_MS} ms": verdict,
                       "_models": models.what, "_source": source, "_machine": machine})


if __name__ == "__main__":
    main()
