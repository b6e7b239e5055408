"""Per-task latency of the whole method beside the baselines, and the cost target's accuracy against plain adaptation.

    HMLIB_DATA_DIR=../shared/data .venv/bin/python benchmarks/bench_eval.py [--checkpoint models/hypernet_seed0-*.pt]

On identical tasks (K = 4, N = 256) of mnist's test split, one thread:

- latency, median over tasks (a warm-up task first): the whole method from a task's raw images to its clusters
  (the VAE encoding that conditions it, then ``predict_task``: the backbone under the generated FiLM, the inner
  steps of every test-time candidate, the label-free choice), one task per call and batched (all tasks in one
  call, which adapts them 25 at a time, divided by their number: the adaptation is vectorised over tasks);
  k-means on raw pixels; k-means on the backbone embedding (embedding included); the plain adaptation as the
  benchmark's ``plain_choice`` row computes it (``eval.plain_steps`` Adam steps in both normalisation modes,
  k-means, silhouette choice), one task per call and batched;
- accuracy (the cost target): the method after 0..3 inner steps against the plain adaptation after
  ``eval.plain_steps`` (15) steps, paired per task with 95% intervals; met when some S <= 3 reaches its mean.

Without a checkpoint (the pipeline's first by default) untrained models of ``--profile`` are timed, and on
synthetic images (no mirror reachable) too; the accuracy part is then skipped. Writes results/bench/eval.json.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from common import encode_tasks, load_models, record, setup, split_images, task_inputs, task_size
from hmlib import data
from hmlib.backbone.embeddings import embed_images
from hmlib.evaluation.methods import METHODS, MethodContext, kmeans_clusters, score
from hmlib.features import normalize_task_np
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.losses import task_accuracy
from hmlib.metrics import clustering_accuracy
from hmlib.stats import paired, summarize

TARGET_STEPS = 3  # the cost target: the meta-learned update reaches plain adaptation's accuracy in <= 3 steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", help="architecture of the untrained models (no checkpoint)")
    parser.add_argument("--checkpoint", help="hypernetwork checkpoint (default: the pipeline's first, else untrained)")
    parser.add_argument("--tasks", type=int, default=30, help="tasks timed and scored (after one warm-up task)")
    parser.add_argument("--n", type=int, default=256, help="images per task")
    parser.add_argument("--k", type=int, default=4, help="classes per task")
    args = parser.parse_args(argv)
    machine = setup(1)
    models = load_models(args.profile, args.checkpoint)
    cfg, backbone, K, n_init = models.cfg, models.backbone, args.k, models.cfg.eval.kmeans_n_init
    if backbone is None:
        raise SystemExit(f"{models.what} reads no backbone (generator {cfg.hyper.generation!r}): nothing to compare")
    images, labels, source = split_images(cfg)
    N = task_size(labels, K, args.n)
    suite = data.sample_tasks(labels, args.tasks + 1, K, N, seed=0)
    warmup, suite = suite[0], suite[1:]
    plain_inputs = SimpleNamespace(images=images, backbone=backbone)  # what the plain adaptation rows read
    print(f"{machine}; {models.what}; {len(suite)} tasks of the {source}, K = {K}, N = {N}; method: "
          f"{cfg.adapt.steps_at_test} inner steps, candidates {', '.join(cfg.adapt.candidates)}, choice "
          f"{cfg.adapt.choice!r}; plain adaptation: {cfg.eval.plain_steps} steps, lr {cfg.eval.plain_lr}")

    # One task per call.
    times: dict[str, list[float]] = {"method": [], "  VAE encoding": [], "  predict_task": [], "kmeans_pixels": [],
                                     "kmeans_embedding": [], "plain_choice": []}
    clusters: dict[str, list[np.ndarray]] = {"kmeans_pixels": [], "kmeans_embedding": []}
    with torch.no_grad():
        for t, task in enumerate([warmup] + [suite[i] for i in range(len(suite))]):
            x = images[task.indices[0]]
            start = time.perf_counter()
            context = encode_tasks(models.vae, x[None])
            encoded = time.perf_counter()
            predict_task(models.hypernet, task_inputs(cfg, context, x[None]), cfg.adapt, cfg.adapt.steps_at_test,
                         num_classes=K)[-1].argmax(-1)
            done = time.perf_counter()
            pixels = kmeans_clusters(x.reshape(N, -1).astype(np.float32) / 255.0, K, t, n_init)
            pixels_done = time.perf_counter()
            embedding = kmeans_clusters(normalize_task_np(embed_images(backbone, x), l2=True), K, t, n_init)
            embedding_done = time.perf_counter()
            _, plain_seconds = score(METHODS["plain_choice"], MethodContext(cfg, plain_inputs, task, t))
            if t == 0:
                continue  # the warm-up task: first calls pay for allocations
            for key, value in zip(times, (done - start, encoded - start, done - encoded, pixels_done - done,
                                          embedding_done - pixels_done, plain_seconds)):
                times[key].append(value)
            clusters["kmeans_pixels"].append(pixels)
            clusters["kmeans_embedding"].append(embedding)
    ms = {key: 1000 * float(np.median(v)) for key, v in times.items()}

    # Batched: every task in one call (the method at 0..3 inner steps and at its configured number).
    batched_ms, method_acc = {}, {}
    task_images = images[suite.indices]  # (T, N, 28, 28)
    with torch.no_grad():
        for steps in sorted(set(range(TARGET_STEPS + 1)) | {cfg.adapt.steps_at_test}):
            start = time.perf_counter()
            logits = predict_task(models.hypernet, task_inputs(cfg, encode_tasks(models.vae, task_images),
                                                               task_images), cfg.adapt, steps, num_classes=K)
            batched_ms[steps] = 1000 * (time.perf_counter() - start) / len(suite)
            method_acc[steps] = task_accuracy(logits[-1], suite.labels)
    plain_ctx = MethodContext(cfg, plain_inputs, suite, 0)
    plain_acc, plain_batched = score(METHODS["plain_choice"], plain_ctx)

    rows = [(f"the method, one task per call ({cfg.adapt.steps_at_test} steps)", ms["method"]),
            ("  VAE encoding (the conditioning)", ms["  VAE encoding"]),
            ("  predict_task (backbone, generation, steps, candidates, choice)", ms["  predict_task"]),
            (f"the method, batched ({len(suite)} tasks in one call)", batched_ms[cfg.adapt.steps_at_test]),
            *[(f"  ... with {s} inner steps", v) for s, v in batched_ms.items() if s != cfg.adapt.steps_at_test],
            (f"k-means on raw pixels (n_init={n_init})", ms["kmeans_pixels"]),
            (f"k-means on the embedding (embedding + k-means, n_init={n_init})", ms["kmeans_embedding"]),
            (f"plain adaptation, both modes + choice ({cfg.eval.plain_steps} steps), one task per call",
             ms["plain_choice"]),
            (f"plain adaptation, batched ({len(suite)} tasks in one call)", 1000 * plain_batched)]
    print("per-task latency, ms (median over tasks; batched: total / tasks)")
    for label, value in rows:
        print(f"  {label:<78s} {value:8.1f}")
    speed = "met" if ms["method"] <= ms["kmeans_pixels"] else "not met"
    print(f"method no slower than k-means on raw pixels: {speed} ({ms['method']:.1f} vs {ms['kmeans_pixels']:.1f} ms)")
    figures = {f"method ms / task (N={N}, 1 thread)": round(ms["method"], 1),
               "method: VAE encoding ms / task": round(ms["  VAE encoding"], 1),
               "method ms / task, batched": round(batched_ms[cfg.adapt.steps_at_test], 1),
               "k-means on raw pixels ms / task": round(ms["kmeans_pixels"], 1),
               "k-means on the embedding ms / task": round(ms["kmeans_embedding"], 1),
               f"plain adaptation ms / task ({cfg.eval.plain_steps} steps, both modes + choice)":
                   round(ms["plain_choice"], 1),
               "plain adaptation ms / task, batched": round(1000 * plain_batched, 1),
               "target: method <= k-means on pixels": speed}

    if source.endswith("test split") and models.trained:
        figures.update(accuracy_against_plain(cfg, suite, K, method_acc, plain_acc, plain_ctx, clusters))
    else:
        why = "synthetic images" if not source.endswith("test split") else "untrained models"
        print(f"accuracy against the plain adaptation: not measured ({why})")
        figures[f"target: <= {TARGET_STEPS} steps reach {cfg.eval.plain_steps} plain steps"] = f"not measured ({why})"
    record("eval", {**figures, "_source": source, "_models": models.what, "_tasks": len(suite), "_machine": machine})
    return 0


def accuracy_against_plain(cfg, suite, K: int, method_acc: dict[int, np.ndarray], plain_acc: np.ndarray,
                           plain_ctx: MethodContext, clusters: dict[str, list[np.ndarray]]) -> dict[str, object]:
    """Print and return the method's accuracy after 0..3 steps against the plain adaptation's, paired per task."""
    plain_steps = cfg.eval.plain_steps

    def pct(values: np.ndarray) -> str:
        s = summarize(values)
        return f"{100 * s['mean']:5.1f} ± {100 * s['ci']:.1f}" if s["ci"] is not None else f"{100 * s['mean']:5.1f}"

    baselines = {f"plain adaptation ({plain_steps} steps, silhouette choice)": plain_acc,
                 "  its task-statistics mode": plain_ctx.memo["plain"]["task"]["acc"],
                 "  its stored-statistics mode": plain_ctx.memo["plain"]["running"]["acc"],
                 **{METHODS[name].label: np.array([clustering_accuracy(c, y, K) for c, y in zip(rows, suite.labels)])
                    for name, rows in clusters.items()}}
    print(f"accuracy % on the same {len(suite)} tasks (mean ± 95% CI over tasks)")
    for label, acc in baselines.items():
        print(f"  {label:<60s} {pct(acc)}")
    figures: dict[str, object] = {f"accuracy %: plain adaptation ({plain_steps} steps, choice)":
                                  round(100 * float(plain_acc.mean()), 1)}
    reached = None
    for steps, acc in method_acc.items():
        diff = paired(acc, plain_acc)
        half = "n/a" if diff["ci"] is None else f"{100 * diff['ci']:.1f}"
        label = f"the method after {steps} inner steps"
        print(f"  {label:<60s} {pct(acc)}   minus plain: {100 * diff['mean']:+.1f} ± {half}")
        figures[f"accuracy %: method after {steps} steps"] = round(100 * float(acc.mean()), 1)
        figures[f"method after {steps} steps - plain, points"] = round(100 * diff["mean"], 1)
        if reached is None and steps <= TARGET_STEPS and diff["mean"] >= 0:
            reached = steps
    verdict = "not met" if reached is None else f"met at {reached} steps" + (
        " (the generated adaptation alone)" if reached == 0 else "")
    print(f"target (<= {TARGET_STEPS} steps reach the accuracy of {plain_steps} plain steps, paired mean): {verdict}")
    figures[f"target: <= {TARGET_STEPS} steps reach {plain_steps} plain steps"] = verdict
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
