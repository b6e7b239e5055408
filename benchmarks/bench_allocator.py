"""What keeping freed memory in the process (hmlib.allocator) buys: the plain adaptation of a batch of tasks, timed
in a fresh process with glibc's default malloc and in one with ``retain_freed_memory``; the embeddings must be equal.

    .venv/bin/python benchmarks/bench_allocator.py [--tasks 16] [--images 256] [--steps 15] [--threads 2]

The work: ``--steps`` Adam steps (default 15, the default ``eval.plain_steps``) of the plain adaptation baseline
(hmlib.evaluation.plain_adaptation) on ``--tasks`` tasks of ``--images`` random images, K = 4, through an untrained
backbone of the default profile's architecture (the cost does not depend on the weights or the pixels), best of
``--repeats``. Each mode runs in its own process, since malloc's settings hold for a whole process. Writes
results/bench/allocator.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import record

CHILD = "--child"


def child(args: argparse.Namespace) -> None:
    """One mode, in this process: time the adaptation, print seconds and a digest of the embeddings as JSON."""
    import hashlib

    import torch

    from common import setup
    from hmlib.allocator import retain_freed_memory
    from hmlib.backbone.model import ConvBackbone
    from hmlib.config import load_config
    from hmlib.evaluation.plain_adaptation import adapt_tasks
    from hmlib.reproducibility import seeded

    setup(args.threads)  # keeps freed memory unless HMLIB_SYSTEM_MALLOC=1
    retained = retain_freed_memory()  # whether it did (done once per process: this only reads the outcome)
    cfg = load_config("default")
    with seeded(0):
        backbone = ConvBackbone(cfg.backbone.channels, cfg.backbone.embed_dim, 10).eval()
        images = torch.randint(0, 256, (args.tasks, args.images, 28, 28), dtype=torch.uint8)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        z = adapt_tasks(backbone, images, 4, blend=1.0, steps=args.steps, lr=cfg.eval.plain_lr,
                        chunk=args.tasks).embeddings
        times.append(time.perf_counter() - start)
    print(json.dumps({"retained": retained, "seconds": min(times), "digest": hashlib.sha256(z.tobytes()).hexdigest()}))


def run_mode(args: argparse.Namespace, system_malloc: bool) -> dict:
    env = {**os.environ, "HMLIB_SYSTEM_MALLOC": "1" if system_malloc else "0"}
    argv = [sys.executable, __file__, CHILD, "--tasks", str(args.tasks), "--images", str(args.images), "--steps",
            str(args.steps), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the default profile's: 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    print(f"cores visible: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.2f}; plain adaptation of "
          f"{args.tasks} tasks x {args.images} images, {args.steps} steps, {args.threads} thread(s)")
    system, retained = run_mode(args, True), run_mode(args, False)
    same = system["digest"] == retained["digest"]
    ratio = system["seconds"] / retained["seconds"]
    print(f"  glibc's default malloc      {system['seconds']:.2f} s")
    print(f"  freed memory kept           {retained['seconds']:.2f} s  ({ratio:.2f}x faster"
          f"{'' if retained['retained'] else '; retain_freed_memory did not apply on this platform'})")
    print(f"  embeddings identical: {same}")
    if not same:
        raise SystemExit("the allocator changed the embeddings: it must not change any arithmetic")
    what = f"plain adaptation of {args.tasks} tasks x {args.images} images, {args.steps} steps, {args.threads} thread(s)"
    record("allocator", {f"{what}, glibc's default malloc, s": round(system["seconds"], 3),
                         f"{what}, freed memory kept, s": round(retained["seconds"], 3),
                         "speed-up (x)": round(ratio, 2), "embeddings identical": same,
                         "_tasks": args.tasks, "_images": args.images, "_steps": args.steps, "_threads": args.threads,
                         "_applied": retained["retained"]})


if __name__ == "__main__":
    main()
