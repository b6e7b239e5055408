"""What meta-training changes in the hypernetwork, part by part, on the leave-one-dataset-out folds (docs/METHOD.md,
"What meta-training changes, part by part"). For each fold (its home as `make folds` leaves it: lodo/<dataset>) and
seed, the method (every candidate adapted with the meta-training inner steps, the silhouette choice) is scored on the
held-back dataset's own evaluation suites (the fold's conditions and tasks, 40 per condition) with each arm below:

- the hypernetwork as meta-trained, and its initialisation (what meta-training started from);
- hybrids of the two: the initial generator with the meta-learned step sizes, and the reverse;
- the meta-trained generator with the code-dependent part of its output heads scaled by 0.5 and by 0 (a learned
  constant adaptation, the same for every task);
- the meta-trained hypernetwork with one of its generated outputs meta-trained and the others at their initial
  weights: FiLM only, the statistics blend only, the cluster head's temperature only;
- hypernetworks meta-trained with a larger outer step size (``meta.outer_lr``; 1e-3 as it ships), and one whose inner
  loop adapts the FiLM of every block (``film.adapt_blocks = 3``; the last block as it ships: the fold variant
  ``allblocks_<dataset>.json`` of "Making meta-training transfer", here on the fold's own VAE and backbone per seed);
- the hypernetwork as it ships with 8 and 16 inner steps at test time (every other arm: 3, as meta-trained and as
  ``adapt.test_steps`` defaults), its initialisation and the one that adapts every block with 8;
- two label-free baselines on the same tasks: k-means on the embedding and the plain (non-meta-learned) update of
  every normalisation layer with its label-free choice of statistics.

A missing VAE, backbone or hypernetwork of a (fold, seed) is trained into the fold's home first (the VAE and the
backbone with the fold's settings, as notebook 02 would; the re-trained arms under models/meta_parts/, apart from the
fold's own checkpoint, which stays the one its pipeline records: nothing is overwritten). Every (fold, seed, arm,
condition) is saved to --out as soon as it is scored, and a rerun scores only what is missing; --arms scores some
arms only (the shipped hypernetwork, its initialisation and the baselines always: every row's references).

    make folds                                                        # the fold homes: lodo/<dataset>
    .venv/bin/python docs/lodo/variants/meta_parts.py --seeds 0 1     # -> results/meta_parts.json + a table
    .venv/bin/python docs/lodo/variants/meta_parts.py --table results/meta_parts.json results/<other>.json  # pooled
"""
import argparse
import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

import hmlib
from hmlib import paths
from hmlib.ablations.run import initial_hypernet
from hmlib.evaluation.conditions import grid, suite_for, suite_seed
from hmlib.evaluation.evaluate import score_hypernet
from hmlib.evaluation.inputs import seed_inputs
from hmlib.evaluation.methods import METHODS, MethodContext, score
from hmlib.hyper.bundle import bundle_for, load_bundle
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.metatrain import meta_train
from hmlib.stats import paired, signed

FOLDS = ("fashion_mnist", "math_shapes")  # the default --folds: the folds docs/METHOD.md's tables were measured on
EVERY_FOLD = tuple(sorted(p.stem for p in (paths.REPO_ROOT / "docs" / "lodo").glob("*.json")))  # what --folds may name
SHIPPED = "meta-trained (as it ships)"
INITIAL = "initialisation"
KMEANS = "k-means on the embedding"
PLAIN = "plain update with its label-free choice"
BASELINES = {KMEANS: "kmeans_embedding", PLAIN: "plain_choice"}  # label-free, on the same tasks (hmlib's methods)
VARIANTS = "meta_parts"  # models/<this>/ of the fold's home: the re-trained arms, apart from the fold's own checkpoint
RETRAINED = {"outer step size 3e-3": {"meta": {"outer_lr": 3e-3}},  # config overrides of re-trained arms
             "outer step size 1e-2": {"meta": {"outer_lr": 1e-2}},
             "every block adapted (re-trained)": {"film": {"adapt_blocks": 3}}}
STEPS = {"8 inner steps at test time": (SHIPPED, 8),  # (arm, inner steps at test time): 3 as it ships and meta-trains
         "16 inner steps at test time": (SHIPPED, 16),
         "initialisation, 8 inner steps at test time": (INITIAL, 8),
         "every block adapted, 8 inner steps at test time": ("every block adapted (re-trained)", 8)}
TEST_TIME = ("initial generator, meta-learned step sizes", "meta-trained generator, initial step sizes",
             "code-dependent output x 0.5", "code-dependent output x 0 (a learned constant)",
             "meta-trained FiLM only (initial blend, temperature)",
             "meta-trained blend only (initial FiLM, temperature)",
             "meta-trained temperature only (initial FiLM, blend)")
OUTPUTS = ("film", "blend", "temperature")  # what the generator's output heads emit
ARMS = (SHIPPED, INITIAL, *TEST_TIME, *RETRAINED, *STEPS, *BASELINES)
ALWAYS = (SHIPPED, INITIAL, *BASELINES)  # scored whatever --arms asks: the references of every row of the table


def fold_config(fold: str, arm: str | None = None) -> hmlib.Config:
    """The fold's config (docs/lodo/<fold>.json), with a re-trained arm's overrides."""
    return hmlib.load_config("default", paths.REPO_ROOT / "docs" / "lodo" / f"{fold}.json", RETRAINED.get(arm, {}))


def step_sizes_from(hypernet: HyperNet, source: HyperNet) -> HyperNet:
    """A copy of ``hypernet`` with the inner loop's (meta-learned) step sizes of ``source``."""
    out = copy.deepcopy(hypernet)
    out.generator.log_lrs.load_state_dict(source.generator.log_lrs.state_dict())
    return out.eval()


def code_scaled(hypernet: HyperNet, alpha: float) -> HyperNet:
    """A copy whose output heads (FiLM, blend, temperature) respond ``alpha`` times as much to the task code (their
    biases, the part every task shares, kept)."""
    out = copy.deepcopy(hypernet)
    with torch.no_grad():
        for head in [*out.generator.heads, out.generator.tau_head]:
            head.weight.mul_(alpha)
    return out.eval()


def outputs_from(hypernet: HyperNet, source: HyperNet, outputs: set[str]) -> HyperNet:
    """A copy of ``hypernet`` whose output heads emit ``outputs`` (of :data:`OUTPUTS`) with the weights of
    ``source`` (rows of each layer's head: FiLM scale and shift, then the blend; the temperature's own head)."""
    out = copy.deepcopy(hypernet)
    with torch.no_grad():
        for head, other in zip(out.generator.heads, source.generator.heads):
            rows = [*([slice(0, -1)] if "film" in outputs else []), *([slice(-1, None)] if "blend" in outputs else [])]
            for r in rows:
                head.weight[r] = other.weight[r]
                head.bias[r] = other.bias[r]
        if "temperature" in outputs:
            out.generator.tau_head.load_state_dict(source.generator.tau_head.state_dict())
    return out.eval()


def test_time_arms(trained: HyperNet, initial: HyperNet) -> dict[str, HyperNet]:
    """The arms made from the meta-trained hypernetwork and its initialisation, without training."""
    only = [outputs_from(trained, initial, set(OUTPUTS) - {kept}) for kept in OUTPUTS]  # one output meta-trained
    return dict(zip(TEST_TIME, (step_sizes_from(initial, trained), step_sizes_from(trained, initial),
                                code_scaled(trained, 0.5), code_scaled(trained, 0.0), *only)))


def retrained_for(arms) -> list[str]:
    """The re-trained arms that ``arms`` need: asked for, or the hypernetwork of an asked-for arm of :data:`STEPS`."""
    return [arm for arm in RETRAINED if arm in arms or any(STEPS[a][0] == arm for a in arms if a in STEPS)]


def checkpoints(fold: str, seed: int, retrained=tuple(RETRAINED)) -> dict[str, Path]:
    """The hypernetwork checkpoint of the shipped and each ``retrained`` arm in the fold's home (trained there if
    missing; a missing VAE or backbone first, with the fold's settings, which no arm changes)."""
    cfg = fold_config(fold)
    hmlib.configure_runtime(cfg)
    bundle_for(cfg, seed, train=True)
    shipped = meta_train(cfg, seed, train=True, progress=False).checkpoint_path
    return {SHIPPED: shipped, **{arm: meta_train(fold_config(fold, arm), seed, train=True, progress=False,
                                                 folder=VARIANTS).checkpoint_path for arm in retrained}}


def score_fold(fold: str, seed: int, done: dict, save, arms=ARMS) -> None:
    """Every arm of ``arms`` (and :data:`ALWAYS`) missing from ``done`` (condition key -> arm -> per-task accuracies)
    on the fold's conditions."""
    cfg = fold_config(fold)
    arms = {*arms, *ALWAYS}
    retrained = retrained_for(arms)
    bundles = {arm: load_bundle(path, "cpu") for arm, path in checkpoints(fold, seed, retrained).items()}
    for dataset in cfg.meta.test_datasets:
        inputs = seed_inputs(bundles[SHIPPED], cfg, dataset, "zero_shot", with_train=False)
        trained = inputs.hypernet.eval()
        initial = initial_hypernet(inputs, seed)
        hypernets = {SHIPPED: trained, INITIAL: initial, **test_time_arms(trained, initial),
                     **{arm: bundles[arm].hypernet.eval() for arm in retrained}}
        for condition in grid(cfg, [dataset], verbose=False):
            cell = done.setdefault(condition.key, {})
            suite = suite_for(cfg, condition, inputs.test.labels)
            runs = {**{arm: (h, cfg.adapt.num_inner_steps) for arm, h in hypernets.items()},
                    **{arm: (hypernets[of], steps) for arm, (of, steps) in STEPS.items() if arm in arms}}
            for arm, (hypernet, num_steps) in runs.items():
                if arm in arms and arm not in cell:
                    inputs.hypernet = hypernet
                    acc, _ = score_hypernet(inputs, cfg, suite, num_steps)
                    cell[arm] = {"after": acc[:, -1].tolist(), "before": acc[:, 0].tolist()}
            inputs.hypernet = trained
            for arm, method in BASELINES.items():
                if arm not in cell:
                    ctx = MethodContext(cfg, inputs, suite, suite_seed(cfg.eval.seed, condition))
                    cell[arm] = {"after": score(METHODS[method], ctx)[0].tolist()}
            save()
            print(f"{fold} seed {seed} {condition.key}: " + ", ".join(
                f"{arm} {100 * np.mean(v['after']):.1f}" for arm, v in cell.items()), flush=True)


def per_task(results: dict, fold: str, arm: str, which: str = "after") -> np.ndarray:
    """An arm's accuracy on every task of the fold, its seeds and conditions in a fixed order."""
    return np.concatenate([np.asarray(cell[arm][which]) for seed in sorted(results[fold])
                           for _, cell in sorted(results[fold][seed].items())])


def table(results: dict) -> str:
    """Markdown: per arm and fold the mean accuracy over every task (conditions and seeds), the paired difference
    from the hypernetwork as it ships, from its initialisation and from the plain update (per task, '*' where the
    interval excludes zero), and the test-time gain (after minus before the inner steps); 'n/a' where an arm is not
    scored on every task of the fold, no row where it is scored on none."""
    folds = [f for f in EVERY_FOLD if f in results]
    refs = (SHIPPED, INITIAL, PLAIN)
    head = " | ".join(f"{f}: accuracy | vs as it ships | vs initialisation | vs plain update | test-time gain"
                      for f in folds)
    lines = [f"| arm | {head} |", "|---|" + "---:|" * (len(refs) + 2) * len(folds)]
    for arm in ARMS:
        if not any(arm in cell for fold in folds for cells in results[fold].values() for cell in cells.values()):
            continue  # not asked for (--arms)
        row = [arm]
        for fold in folds:
            if any(arm not in cell for cells in results[fold].values() for cell in cells.values()):
                row += ["n/a"] * (len(refs) + 2)
                continue
            acc = per_task(results, fold, arm)
            vs = [signed(paired(acc, per_task(results, fold, ref))) if arm != ref else "" for ref in refs]
            gain = signed(paired(acc, per_task(results, fold, arm, "before"))) if arm not in BASELINES else ""
            row += [f"{100 * acc.mean():.1f}", *vs, gain]
        lines.append("| " + " | ".join(row) + " |")
    seeds = {f: sorted(results[f]) for f in folds}
    lines.append("")
    lines.append("Seeds: " + "; ".join(f"{f} {', '.join(s)} ({len(per_task(results, f, SHIPPED))} tasks)"
                                        for f, s in seeds.items()))
    return "\n".join(lines)


def pooled(results_files) -> dict:
    """Results files (fold -> seed -> condition -> arm) merged per fold; a seed in two files is refused."""
    out: dict = {}
    for results in results_files:
        for fold, seeds in results.items():
            twice = set(seeds) & set(out.get(fold, {}))
            if twice:
                raise SystemExit(f"seed {', '.join(sorted(twice))} of {fold} is in two results files; "
                                 "pool each seed once")
            out.setdefault(fold, {}).update(seeds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), choices=EVERY_FOLD)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--home", default="lodo", help="folder of the fold homes (make folds' FOLDS_HOME)")
    parser.add_argument("--out", default=None, help="results JSON (default: results/meta_parts.json)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM",
                        help=f"arms to score (default: all; {', '.join(ALWAYS)} always)")
    parser.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                        help="score nothing: print the table of these results files, their seeds pooled per fold")
    args = parser.parse_args()
    if args.table:
        print(table(pooled(json.loads(path.read_text()) for path in args.table)))
        return
    out = Path(args.out) if args.out else paths.results_dir() / "meta_parts.json"
    results = score_folds(out, args.folds, args.seeds, args.home,
                          lambda fold, seed, done, save: score_fold(fold, seed, done, save, args.arms))
    print(table(results))


def score_folds(out: Path, folds, seeds, home: str, score) -> dict:
    """The results file ``out`` (fold -> seed -> ...; resumed where it exists) after ``score(fold, seed, done, save)``
    of every fold and seed, each fold with its home (``home``/<fold>) as HMLIB_HOME; ``save()`` writes the file."""
    results = json.loads(out.read_text()) if out.is_file() else {}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results))

    for fold in folds:
        os.environ["HMLIB_HOME"] = str(Path(home).resolve() / fold)  # every artifact of the fold in its home
        for seed in seeds:
            score(fold, seed, results.setdefault(fold, {}).setdefault(str(seed), {}), save)
    return results


if __name__ == "__main__":
    main()
