"""Does the best count of test-time inner steps depend on the task's size? (docs/METHOD.md, "Eight inner steps at test
time"). On each leave-one-dataset-out fold (its home as `make folds` leaves it: lodo/<dataset>) and seed, the
hypernetwork as it ships (every candidate, the label-free choice) is scored on the held-back dataset's conditions at
small task sizes (:data:`SMALL`: K = 2 and 4 with N = 64, the benchmark's smallest) and at the fold's own shapes, with
each count of :data:`COUNTS` run on its own (the candidate is chosen after that run's last step), on identical tasks.
Fold data only: the held-back dataset is the fold's, never held-out data.

Every (fold, seed, condition) is saved to --out as soon as it is scored, and a rerun scores only what is missing; a
missing VAE, backbone or hypernetwork of a (fold, seed) is trained into the fold's home first (as docs/lodo/variants/
meta_parts.py does).

    make folds                                                              # the fold homes: lodo/<dataset>
    .venv/bin/python docs/lodo/variants/steps_by_size.py --seeds 0 1 2      # -> results/steps_by_size.json + a table
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from hmlib import paths
from hmlib.evaluation.conditions import grid, suite_for
from hmlib.evaluation.evaluate import score_hypernet
from hmlib.evaluation.inputs import seed_inputs
from hmlib.hyper.bundle import load_bundle
from hmlib.stats import paired, signed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta_parts  # noqa: E402  (the folds, their configs and checkpoints)

SMALL = ((2, 64), (4, 64))  # the benchmark's task sizes that the folds' own shapes do not cover
COUNTS = (3, 5, 8)  # inner steps at test time: meta-training's, between, the default
PAIRS = ((3, 8), (3, 5), (5, 8))


def fold_shapes(fold: str) -> list[tuple[int, int]]:
    """:data:`SMALL`, then the fold's own (K, N) shapes."""
    own = [tuple(int(v) for v in shape) for shape in meta_parts.fold_config(fold).eval.shapes]
    return [*SMALL, *(shape for shape in own if shape not in SMALL)]


def score_fold(fold: str, seed: int, done: dict, save) -> None:
    """Every condition of the fold's held-back datasets at :func:`fold_shapes` missing from ``done`` (condition key ->
    count -> per-task accuracy), each count of :data:`COUNTS`."""
    cfg = meta_parts.fold_config(fold)
    bundle = load_bundle(meta_parts.checkpoints(fold, seed, retrained=())[meta_parts.SHIPPED], "cpu")
    for dataset in cfg.meta.test_datasets:
        inputs = seed_inputs(bundle, cfg, dataset, "zero_shot", with_train=False, progress=False)
        for condition in grid(cfg, [dataset], fold_shapes(fold), verbose=False):
            if condition.key in done:
                continue
            suite = suite_for(cfg, condition, inputs.test.labels)
            done[condition.key] = {str(n): score_hypernet(inputs, cfg, suite, n)[0][:, -1].tolist() for n in COUNTS}
            save()
            print(f"{fold} seed {seed} {condition.key}: " + ", ".join(
                f"{n} steps {100 * np.mean(v):.1f}" for n, v in done[condition.key].items()), flush=True)


def shape_of(key: str) -> str:
    """'K4_N64' of a condition key such as 'fashion_mnist+thin_K4_N64'."""
    return "_".join(key.split("_")[-2:])


def table(results: dict) -> str:
    """Markdown: per fold (and the folds pooled, where there are several) and task shape, the paired difference
    between step counts, each task's difference averaged over the seeds that scored it ('*' where the 95% interval
    over tasks excludes zero)."""
    diffs: dict = defaultdict(lambda: defaultdict(list))  # (fold, shape) -> pair -> per-task differences
    every = "both folds" if len(results) == 2 else f"all {len(results)} folds"
    for fold, seeds in results.items():
        keys = sorted({key for cells in seeds.values() for key in cells})
        for key in keys:
            cells = [cells[key] for cells in seeds.values() if key in cells]
            mean = {n: np.mean([np.asarray(c[str(n)]) for c in cells], axis=0) for n in COUNTS}
            for low, high in PAIRS:
                for group in (fold, every) if len(results) > 1 else (fold,):
                    diffs[(group, shape_of(key))][(low, high)].append(mean[high] - mean[low])
    lines = ["| fold | K, N | tasks | " + " | ".join(f"{h} minus {l} steps" for l, h in PAIRS) + " |",
             "|---|---|---:|" + "---:|" * len(PAIRS)]
    size = lambda shape: tuple(int(part[1:]) for part in reversed(shape.split("_")))  # noqa: E731  (N, K)
    for (group, shape), by_pair in sorted(diffs.items(), key=lambda kv: (kv[0][0] == every, kv[0][0],
                                                                          size(kv[0][1]))):
        cells = [np.concatenate(by_pair[pair]) for pair in PAIRS]
        N, K = size(shape)
        lines.append(f"| {group} | {K}, {N} | {cells[0].size} | "
                     + " | ".join(signed(paired(c, np.zeros_like(c))) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", nargs="+", default=list(meta_parts.FOLDS), choices=meta_parts.EVERY_FOLD)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--home", default="lodo", help="folder of the fold homes (make folds' FOLDS_HOME)")
    parser.add_argument("--out", default=None, help="results JSON (default: results/steps_by_size.json)")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON", help="score nothing: print the table")
    args = parser.parse_args()
    if args.table:
        print(table(meta_parts.pooled(json.loads(path.read_text()) for path in args.table)))
        return
    out = Path(args.out) if args.out else paths.results_dir() / "steps_by_size.json"
    print(table(meta_parts.score_folds(out, args.folds, args.seeds, args.home, score_fold)))


if __name__ == "__main__":
    main()
