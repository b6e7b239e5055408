"""The transductive stage on the leave-one-dataset-out folds, for each backbone recipe (docs/METHOD.md, "A
contrastive term in the backbone's objective"): each fold's backbone (trained without the held-back dataset, in
memory, with the recipe named) is adapted by the transductive stage to the held-back dataset's unlabeled train split
(``hmlib.backbone.transductive.train_transductive`` with the fold's settings and the stage's overrides named), and
k-means per task is scored on the held-back dataset's clean conditions (40 tasks each) on the starting backbone, on
the adapted one, and on the one the stage's gate keeps. Nothing is written to models/; every (fold, recipe, stage,
seed) is saved to --out as soon as it is scored, and a rerun scores only what is missing.

    .venv/bin/python docs/lodo/variants/transductive_recipe.py --folds fashion_mnist hebrew_chars math_shapes

The confidence gate's choice (docs/METHOD.md, "On the contrastive backbone: the backbone's own confidence"): every
fold's held-back dataset and its shifts, and the default backbone on its meta-training datasets and their shifts, then
the table of every run and each rule's choices:

    R="contrastive backbone, weight 0.3"; S="as it ships"
    .venv/bin/python docs/lodo/variants/transductive_recipe.py --shifted --recipes "$R" --stages "$S" --seeds 0 1
    .venv/bin/python docs/lodo/variants/transductive_recipe.py --familiar --shifted --recipes "$R" --stages "$S" --seeds 0 1
    .venv/bin/python docs/lodo/variants/transductive_recipe.py --runs
"""
import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, davies_bouldin_score, silhouette_score

import hmlib
from hmlib import data, paths
from hmlib.backbone.embeddings import embed_images, training_confidence
from hmlib.backbone.train import backbone_datasets, train_backbone
from hmlib.backbone.transductive import adaptation_images, gate, gate_samples, recognised, train_transductive
from hmlib.evaluation.conditions import build_suite, grid
from hmlib.evaluation.methods import METHODS, MethodContext, score
from hmlib.evaluation.quality import RowsInputs
from hmlib.features import normalize_task_np
from hmlib.stats import mean_ci, paired, signed

FOLDS = ("fashion_mnist", "hebrew_chars", "math_shapes")
EVERY_FOLD = tuple(sorted(p.stem for p in (paths.REPO_ROOT / "docs" / "lodo").glob("*.json")))
RECIPES = {"cross-entropy backbone": {"contrastive": 0.0},  # backbone settings on top of the fold's
           "contrastive backbone": {"contrastive": 1.0, "contrastive_head": 128},
           "contrastive backbone, weight 0.3": {"contrastive": 0.3, "contrastive_head": 128}}
SHIPPED_EPOCHS = hmlib.load_config("default").transductive.epochs  # the folds' own runs skip the stage (epochs 0)
STAGES = {"as it ships": {"epochs": SHIPPED_EPOCHS},  # transductive settings on top of the fold's
          "+ contrastive views, weight 1": {"epochs": SHIPPED_EPOCHS, "contrastive": 1.0},
          "backbone step 1e-3, head 1e-3": {"epochs": SHIPPED_EPOCHS, "head_lr": 1e-3}}
ARMS = ("start", "adapted", "gate")  # the backbone k-means reads
FAMILIAR = "familiar: "  # results key prefix of --familiar (the default backbone on its own meta-training datasets)
FAMILIAR_SHIFTS = ("contrast", "gaussian_noise", "thin")  # --shifted: the folds' shifts, on the familiar datasets too


def fold_config(fold: str, recipe: str, stage: str) -> hmlib.Config:
    """The fold's config with the recipe's backbone and the stage's transductive settings."""
    return hmlib.load_config("default", paths.REPO_ROOT / "docs" / "lodo" / f"{fold}.json",
                             {"backbone": RECIPES[recipe], "transductive": STAGES[stage]})


def criteria(cfg: hmlib.Config, start, adapted, images: np.ndarray) -> dict:
    """Label-free criteria a gate could read, each on the gate's subsamples before and after adaptation (k-means on the
    standardised, normalised embedding, as the gate's): the silhouette at k = 4 (the gate's own) and k = 10, and the
    Calinski-Harabasz and Davies-Bouldin scores at k = 4; per criterion, the change of each subsample (after minus
    before; Davies-Bouldin negated, so that up is better for every criterion). Under "levels", per subsample (not
    changes): the start backbone's mean confidence (``training_confidence``) and the agreement (adjusted Rand index) of
    k-means at k = 4 before and after adaptation."""
    samples = gate_samples(cfg, len(images))
    out = {name: [] for name in ("silhouette_k4", "silhouette_k10", "calinski_harabasz_k4", "davies_bouldin_k4")}
    levels = {"confidence": [], "agreement_k4": []}
    for repeat, sample in enumerate(samples):
        scores, found = {}, {}
        for when, model in (("before", start), ("after", adapted)):
            z = normalize_task_np(embed_images(model, images[sample]), l2=True)
            k4 = KMeans(n_clusters=4, n_init=3, random_state=repeat).fit_predict(z)
            k10 = KMeans(n_clusters=10, n_init=3, random_state=repeat).fit_predict(z)
            found[when] = k4
            scores[when] = {"silhouette_k4": silhouette_score(z, k4), "silhouette_k10": silhouette_score(z, k10),
                            "calinski_harabasz_k4": calinski_harabasz_score(z, k4),
                            "davies_bouldin_k4": -davies_bouldin_score(z, k4)}
        for name in out:
            out[name].append(float(scores["after"][name] - scores["before"][name]))
        levels["confidence"].append(float(training_confidence(start, images[sample]).mean()))
        levels["agreement_k4"].append(float(adjusted_rand_score(found["before"], found["after"])))
    return {**out, "levels": levels}


def kmeans_cells(cfg: hmlib.Config, model, conditions) -> dict:
    """k-means accuracy per task (per condition) on ``model``'s embedding of each condition's test split."""
    cells = {}
    for condition in conditions:
        rows = embed_images(model, data.load_split(condition.dataset, "test", cfg.data, progress=False).images)
        ctx = MethodContext(cfg, RowsInputs({"embedding": rows}), build_suite(cfg, condition, 40), 0)
        cells[condition.key] = score(METHODS["kmeans_embedding"], ctx)[0].tolist()
    return cells


def adapt_and_score(cfg: hmlib.Config, start, dataset: str, seed: int) -> dict:
    """``start`` adapted to ``dataset``'s unlabeled train split; k-means per task of its test conditions on the start,
    adapted and gated backbones, the gate's decision and the criteria."""
    image_set = data.load_split(dataset, "train", cfg.data, progress=False)
    adapted, record = train_transductive(start, adaptation_images(cfg, image_set), cfg, seed=seed, progress=False)
    decision = gate(cfg, start, adapted, image_set.images)
    conditions = grid(cfg, [dataset], verbose=False)
    cells = {"start": kmeans_cells(cfg, start, conditions), "adapted": kmeans_cells(cfg, adapted, conditions)}
    cells["gate"] = cells["adapted" if decision["kept"] == "adapted" else "start"]
    return {"cells": cells, "gate": decision, "seconds": record["seconds"],
            "criteria": criteria(cfg, start, adapted, image_set.images)}


def score_stage(fold: str, recipe: str, stage: str, seed: int, datasets) -> dict:
    """The fold's backbone (trained in memory) adapted to each of ``datasets`` (the held-back one, or its shifts too):
    :func:`adapt_and_score` per dataset."""
    cfg = fold_config(fold, recipe, stage)
    hmlib.configure_runtime(cfg)
    image_sets = [data.load_split(dataset, "train", cfg.data, progress=False) for dataset in backbone_datasets(cfg)]
    start, _ = train_backbone(image_sets, cfg, seed, progress=False)
    return {dataset: adapt_and_score(cfg, start, dataset, seed) for dataset in datasets}


def score_familiar(recipe: str, stage: str, seed: int, datasets) -> dict:
    """The same on data the backbone learned from: the default config's backbone (every meta-training dataset, in
    memory, with the recipe) adapted to each of ``datasets`` (meta-training datasets, or shifts of them), k-means per
    task on its test split at the default shapes (where adaptation should be declined: docs/METHOD.md, "When not to
    adapt")."""
    cfg = hmlib.load_config("default", overrides={"backbone": RECIPES[recipe], "transductive": STAGES[stage]})
    hmlib.configure_runtime(cfg)
    image_sets = [data.load_split(dataset, "train", cfg.data, progress=False) for dataset in backbone_datasets(cfg)]
    start, _ = train_backbone(image_sets, cfg, seed, progress=False)
    return {dataset: adapt_and_score(cfg, start, dataset, seed) for dataset in datasets}


def level_runs(results: dict) -> list[dict]:
    """Every run that recorded the criteria's levels: data, backbone, seed, held back or familiar, k-means of the start
    and adapted backbones (mean over the cells), the silhouette gate's choice and change, and the levels."""
    rows = []
    for key, by_recipe in results.items():
        for name, seeds in by_recipe.items():
            for seed, entry in seeds.items():
                levels = entry.get("criteria", {}).get("levels")
                if levels:
                    rows.append({"data": key, "recipe": name.split(" / ")[0], "seed": seed,
                                 "familiar": key.startswith(FAMILIAR), "start": mean_of(entry, "start"),
                                 "adapted": mean_of(entry, "adapted"), "gate": entry["gate"],
                                 "silhouette": float(np.mean(entry["criteria"]["silhouette_k4"])),
                                 "confidence": levels["confidence"], "agreement": float(np.mean(levels["agreement_k4"]))})
    return rows


def runs_table(results: dict, thresholds) -> str:
    """Markdown: every run by the start backbone's confidence (adapted minus start, k-means points; the silhouette
    gate's choice and change; the k-means agreement before / after); then, per group (held back / familiar), the mean
    of k-means after each choice, as the change from never adapting: always, the silhouette gate as recorded, the
    confidence rule at each of ``thresholds`` (``hmlib.backbone.transductive.gate``'s: declined where the interval
    over the subsamples lies at or above the threshold), and the better of the two per run (labels)."""
    rows = sorted(level_runs(results), key=lambda r: np.mean(r["confidence"]))
    lines = ["| confidence | data | backbone | seed | adapted minus start | silhouette gate kept | silhouette k4 change "
             "| k-means agreement |", "|---:|---|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {np.mean(r['confidence']):.3f} | {r['data']} | {r['recipe']} | {r['seed']} | "
                     f"{100 * (r['adapted'] - r['start']):+.1f} | {r['gate']['kept']} | {r['silhouette']:+.4f} | "
                     f"{r['agreement']:.2f} |")

    choices = {"always adapt": lambda r: r["adapted"],
               "the silhouette gate (as recorded)": lambda r: r["adapted" if r["gate"]["kept"] == "adapted" else "start"],
               **{f"confidence rule, threshold {t}":
                  (lambda r, t=t: r["start"] if recognised(r["confidence"], t)[2] else r["adapted"])
                  for t in thresholds},
               "the better of the two (labels)": lambda r: max(r["start"], r["adapted"])}
    groups = {"held back": [r for r in rows if not r["familiar"]], "familiar": [r for r in rows if r["familiar"]]}
    lines += ["", "| choice, minus never adapting (k-means, points) | " + " | ".join(
        f"{g} (n = {len(v)})" for g, v in groups.items()) + " | runs adapted (held back / familiar) |",
              "|---|" + "---:|" * len(groups) + "---:|"]
    for label, pick in choices.items():
        means = [signed(paired(np.array([pick(r) for r in v]), np.array([r["start"] for r in v]))) for v in groups.values()]
        adapted = [sum(pick(r) == r["adapted"] for r in v) for v in groups.values()]
        lines.append(f"| {label} | " + " | ".join(means) + f" | {adapted[0]} / {adapted[1]} |")
    return "\n".join(lines)


def mean_of(entry: dict, arm: str) -> float:
    return float(np.mean([np.mean(v) for v in entry["cells"][arm].values()]))


def table(results: dict, folds) -> str:
    """Markdown: per (recipe, stage) and fold, k-means on the start backbone, adapted minus start and gated minus start
    (paired per seed, t-interval over seeds), and how often the gate kept the adaptation."""
    lines = ["| backbone, stage | " + " | ".join(f"{f}: start | adapted | gate (kept)" for f in folds) + " |",
             "|---|" + "---:|---:|---:|" * len(folds)]
    for recipe in RECIPES:
        for stage in STAGES:
            cells = []
            for fold in folds:
                runs = results.get(fold, {}).get(f"{recipe} / {stage}", {})
                if not runs:
                    cells += ["", "", ""]
                    continue
                start = np.array([mean_of(r, "start") for r in runs.values()])
                diff = {arm: signed(paired(np.array([mean_of(r, arm) for r in runs.values()]), start))
                        for arm in ("adapted", "gate")}
                kept = sum(r["gate"]["kept"] == "adapted" for r in runs.values())
                cells += [f"{100 * start.mean():.1f}", diff["adapted"], f"{diff['gate']} ({kept}/{len(runs)})"]
            lines.append(f"| {recipe}, {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


RULES = {"decline where the change's interval is below zero (the gate's rule)": lambda low, high: high >= 0,
         "adapt where the mean change is above zero": lambda low, high: low + high > 0,
         "adapt only where the change's interval is above zero": lambda low, high: low > 0}


def criteria_table(results: dict) -> str:
    """Markdown: for every recorded criterion and rule, k-means after the choice it makes, averaged over the held-back
    runs and over the familiar runs of each recipe (every (dataset, seed) run that recorded criteria), beside never
    adapting, always adapting and the better of the two per run (labels: the oracle)."""
    runs = {}  # (recipe, held back or familiar) -> [(start, adapted, criteria)]
    for key, by_recipe in results.items():
        kind = "familiar" if key.startswith(FAMILIAR) else "held back"
        for name, seeds in by_recipe.items():
            for entry in seeds.values():
                if "criteria" in entry:
                    runs.setdefault((name.split(" / ")[0], kind), []).append(
                        (mean_of(entry, "start"), mean_of(entry, "adapted"), entry["criteria"]))
    groups = sorted(runs)
    lines = ["| choice | " + " | ".join(f"{recipe}, {kind} (n = {len(runs[(recipe, kind)])})"
                                        for recipe, kind in groups) + " |", "|---|" + "---:|" * len(groups)]
    fixed = {"never adapt": lambda s, a, c: s, "always adapt": lambda s, a, c: a, "the better (labels)": lambda s, a, c: max(s, a)}
    for label, pick in fixed.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * np.mean([pick(s, a, c) for s, a, c in runs[g]]):.1f}"
                                                   for g in groups) + " |")
    names = sorted({name for g in groups for *_, c in runs[g] for name in c if name != "levels"})
    for name in names:
        for rule, adapt in RULES.items():
            def choose(start, adapted, crit):
                mean, half = mean_ci(crit[name])  # the gate's interval (hmlib.stats)
                return adapted if adapt(mean - half, mean + half) else start
            lines.append(f"| {name}: {rule} | " + " | ".join(
                f"{100 * np.mean([choose(s, a, c) for s, a, c in runs[g]]):.1f}" for g in groups) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), choices=EVERY_FOLD)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--familiar", action="store_true",
                        help="instead of the folds: the default backbone adapted to its own meta-training datasets")
    parser.add_argument("--out", type=Path, default=paths.results_dir() / "transductive_recipe.json")
    parser.add_argument("--shifted", action="store_true",
                        help="adapt to the shifted datasets too (each fold's test shifts; the familiar datasets under "
                             f"{', '.join(FAMILIAR_SHIFTS)})")
    parser.add_argument("--runs", action="store_true",
                        help="print every run of --out by the start backbone's confidence, and each gate rule's "
                             "choices (nothing is computed)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.53, 0.6],
                        help="--runs: thresholds of the confidence rule to compare")
    parser.add_argument("--criteria", action="store_true",
                        help="print the gate criteria table of the runs in --out (nothing is computed)")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.criteria:
        print(criteria_table(results))
        return
    if args.runs:
        print(runs_table(results, args.thresholds))
        return
    def save(key: str, name: str, seed: int, entry: dict) -> None:
        results.setdefault(key, {}).setdefault(name, {})[str(seed)] = entry
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results))
        print(f"{key}, {name}, seed {seed}: k-means start {100 * mean_of(entry, 'start'):.2f}, adapted "
              f"{100 * mean_of(entry, 'adapted'):.2f}, gate kept {entry['gate']['kept']}", flush=True)

    def missing(keys, name: str, seed: int) -> bool:
        return not all(str(seed) in results.get(key, {}).get(name, {}) for key in keys)

    if args.familiar:
        datasets = list(hmlib.load_config("default").meta.train_datasets)
        if args.shifted:
            datasets += [f"{d}+{shift}" for d in list(datasets) for shift in FAMILIAR_SHIFTS]
        for recipe in args.recipes:
            for stage in args.stages:
                for seed in args.seeds:
                    name = f"{recipe} / {stage}"
                    if missing([f"{FAMILIAR}{d}" for d in datasets], name, seed):
                        for dataset, entry in score_familiar(recipe, stage, seed, datasets).items():
                            save(f"{FAMILIAR}{dataset}", name, seed, entry)
        print(table(results, tuple(k for k in results if k.startswith(FAMILIAR))))
        return
    for fold in args.folds:
        datasets = list(fold_config(fold, args.recipes[0], args.stages[0]).meta.test_datasets) if args.shifted else [fold]
        for recipe in args.recipes:
            for stage in args.stages:
                for seed in args.seeds:
                    name = f"{recipe} / {stage}"
                    if missing(datasets, name, seed):
                        for dataset, entry in score_stage(fold, recipe, stage, seed, datasets).items():
                            save(dataset, name, seed, entry)
    print(table(results, tuple(args.folds)))


if __name__ == "__main__":
    main()
