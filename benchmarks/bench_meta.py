"""Meta-training iterations per second, and generation + S inner steps per task (S = 0, 3, 8, 32), one thread.

    HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_meta.py [--checkpoint ...] [--iterations 20]

Meta-training: iterations as ``fit_hypernet`` runs them: an episode drawn by ``EpisodeSampler`` from the
meta-training datasets' train splits (``meta.meta_batch_size`` tasks of a random K, under random train-family
shifts, VAE-encoded), ``adapt(..., create_graph=True)`` through the backbone, the outer loss, backward, gradient
clipping and the Adam step of meta-training's optimizer; timed over ``--iterations`` after a warm-up, split into
drawing the episode and the optimisation step. Latency: one task (K = ``task.num_classes``, N = ``task.num_images``)
of mnist's test split per call, its VAE rows given: ``adapt`` (one candidate, what meta-training runs) and
``predict_task`` (every test-time candidate and the label-free choice, what evaluation runs). Models of the
pipeline's first checkpoint, else untrained ones of ``--profile``; synthetic images where no mirror is reachable
(the cost does not depend on the pixels). Writes results/bench/meta.json.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from common import encode_tasks, load_models, record, setup, split_images, task_inputs, task_size
from hmlib import data
from hmlib.hyper.adapt import adapt, predict_task
from hmlib.hyper.episodes import EpisodeSampler
from hmlib.hyper.inputs import TaskData
from hmlib.hyper.metatrain import _optimizer, outer_loss

STEPS = (0, 3, 8, 32)


def train_parts(cfg) -> tuple[list[TaskData], str]:
    """The meta-training datasets' train splits as the episode sampler reads them (images and labels)."""
    parts = []
    try:
        for name in cfg.meta.train_datasets:
            split = data.load_split(name, "train", cfg.data, progress=False)
            parts.append(TaskData(name, "train", np.zeros((len(split), 0), np.float32), np.asarray(split.labels),
                                  images=split.images))
        return parts, ", ".join(cfg.meta.train_datasets)
    except data.DatasetError as err:
        print(f"meta-training data not reachable ({' '.join(str(err).split())[:160]}); synthetic images instead")
        rng = np.random.default_rng(0)
        return [TaskData(f"synthetic{i}", "train", np.zeros((5000, 0), np.float32), np.repeat(np.arange(10), 500),
                         images=rng.integers(0, 256, (5000, 28, 28), dtype=np.uint8)) for i in range(3)], "synthetic"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default", help="architecture of the untrained models (no checkpoint)")
    parser.add_argument("--checkpoint", help="hypernetwork checkpoint (default: the pipeline's first, else untrained)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=10, help="tasks timed per number of inner steps")
    args = parser.parse_args()
    machine = setup(1)
    models = load_models(args.profile, args.checkpoint)
    cfg = models.cfg

    # Meta-training iterations, on a copy (the loaded weights stay as they are).
    parts, source = train_parts(cfg)
    sampler = EpisodeSampler(parts, cfg, models.vae)
    hypernet = copy.deepcopy(models.hypernet).train()
    optimizer = _optimizer(hypernet, cfg)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    steps = cfg.adapt.num_inner_steps if cfg.meta.use_inner_loop else 0
    sample_s, step_s = [], []
    for iteration in range(args.iterations + 1):
        start = time.perf_counter()
        episode = sampler.sample(np.random.default_rng([0, iteration]))
        sampled = time.perf_counter()
        result = adapt(hypernet, episode.inputs, cfg.adapt, create_graph=True, num_classes=episode.num_classes,
                       num_steps=steps)
        loss = outer_loss(hypernet, result, episode.labels, episode.num_classes, cfg.meta.outer_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.meta.grad_clip)
        optimizer.step()
        if iteration > 0:  # the first is a warm-up
            sample_s.append(sampled - start)
            step_s.append(time.perf_counter() - sampled)
    per_iteration = float(np.mean(sample_s) + np.mean(step_s))

    # Generation + S inner steps, one task per call.
    images, labels, what = split_images(cfg)
    K = cfg.task.num_classes
    N = task_size(labels, K, cfg.task.num_images)
    suite = data.sample_tasks(labels, args.tasks + 1, K, N, seed=0)
    tasks = [task_inputs(cfg, encode_tasks(models.vae, images[idx][None]), images[idx][None]) for idx in suite.indices]
    latency: dict[str, dict[int, float]] = {"adapt": {}, "predict_task": {}}
    with torch.no_grad():
        for S in STEPS:
            for kind, run in (("adapt", lambda task: adapt(models.hypernet, task, cfg.adapt, num_steps=S,
                                                           num_classes=K)),
                              ("predict_task", lambda task: predict_task(models.hypernet, task, cfg.adapt, S,
                                                                         num_classes=K))):
                run(tasks[0])  # warm-up
                start = time.perf_counter()
                for task in tasks[1:]:
                    run(task)
                latency[kind][S] = 1000 * (time.perf_counter() - start) / (len(tasks) - 1)

    print(f"{machine}; {models.what}")
    print(f"meta-training on {source}: meta-batches of {cfg.meta.meta_batch_size} tasks of N <= "
          f"{cfg.meta.task_images}, K {cfg.meta.min_classes}..{cfg.meta.max_classes}, {steps} inner steps in the "
          f"graph, outer loss {cfg.meta.outer_loss!r}, backbone lr {cfg.meta.backbone_lr}")
    print(f"  {1 / per_iteration:.2f} iterations/s (drawing the episode {1000 * np.mean(sample_s):.0f} ms, the step "
          f"{1000 * np.mean(step_s):.0f} ms; mean of {args.iterations}) -> {cfg.meta.iterations} iterations ~ "
          f"{per_iteration * cfg.meta.iterations:.0f} s per seed (without validation and the selector)")
    print(f"one task of K = {K}, N = {N} ({what}), ms per task (mean of {len(tasks) - 1}):")
    print(f"  {'inner steps':<12s} {'adapt (one candidate)':>22s} {'predict_task (every candidate + choice)':>42s}")
    for S in STEPS:
        print(f"  {S:<12d} {latency['adapt'][S]:22.1f} {latency['predict_task'][S]:42.1f}")
    record("meta", {"meta-training iterations/s": round(1 / per_iteration, 2),
                    **{f"generation + {S} inner steps, ms / task": round(latency["adapt"][S], 1) for S in STEPS},
                    **{f"test time ({S} steps, all candidates + choice), ms / task":
                       round(latency["predict_task"][S], 1) for S in STEPS},
                    "_models": models.what, "_data": source, "_machine": machine})


if __name__ == "__main__":
    main()
