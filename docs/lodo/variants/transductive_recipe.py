"""The transductive stage on the leave-one-dataset-out folds, for each backbone recipe (docs/METHOD.md, "A
contrastive term in the backbone's objective"): each fold's backbone (trained without the held-back dataset, in
memory, with the recipe named) is adapted by the transductive stage to the held-back dataset's unlabeled train split
(``hmlib.backbone.transductive.train_transductive`` with the fold's settings and the stage's overrides named), and
k-means per task is scored on the held-back dataset's clean conditions (40 tasks each) on the starting backbone, on
the adapted one, and on the one the stage's gate keeps. Nothing is written to models/; every (fold, recipe, stage,
seed) is saved to --out as soon as it is scored, and a rerun scores only what is missing.

    .venv/bin/python docs/lodo/variants/transductive_recipe.py --folds fashion_mnist hebrew_chars math_shapes
"""
import argparse
import json
from pathlib import Path

import numpy as np

import hmlib
from hmlib import data, paths
from hmlib.backbone.embeddings import embed_images
from hmlib.backbone.train import backbone_datasets, train_backbone
from hmlib.backbone.transductive import adaptation_images, gate, train_transductive
from hmlib.evaluation.conditions import build_suite, grid
from hmlib.evaluation.methods import METHODS, MethodContext, score
from hmlib.evaluation.quality import RowsInputs
from hmlib.stats import paired, signed

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


def fold_config(fold: str, recipe: str, stage: str) -> hmlib.Config:
    """The fold's config with the recipe's backbone and the stage's transductive settings."""
    return hmlib.load_config("default", paths.REPO_ROOT / "docs" / "lodo" / f"{fold}.json",
                             {"backbone": RECIPES[recipe], "transductive": STAGES[stage]})


def kmeans_cells(cfg: hmlib.Config, model, conditions) -> dict:
    """k-means accuracy per task (per condition) on ``model``'s embedding of each condition's test split."""
    cells = {}
    for condition in conditions:
        rows = embed_images(model, data.load_split(condition.dataset, "test", cfg.data, progress=False).images)
        ctx = MethodContext(cfg, RowsInputs({"embedding": rows}), build_suite(cfg, condition, 40), 0)
        cells[condition.key] = score(METHODS["kmeans_embedding"], ctx)[0].tolist()
    return cells


def score_stage(fold: str, recipe: str, stage: str, seed: int) -> dict:
    """k-means per task of the fold's clean held-back conditions on the start, adapted and gated backbones."""
    cfg = fold_config(fold, recipe, stage)
    hmlib.configure_runtime(cfg)
    image_sets = [data.load_split(dataset, "train", cfg.data, progress=False) for dataset in backbone_datasets(cfg)]
    start, _ = train_backbone(image_sets, cfg, seed, progress=False)
    held_back = data.load_split(fold, "train", cfg.data, progress=False)
    images = adaptation_images(cfg, held_back)
    adapted, record = train_transductive(start, images, cfg, seed=seed, progress=False)
    decision = gate(cfg, start, adapted, held_back.images)
    conditions = [c for c in grid(cfg, verbose=False) if c.dataset == fold]
    cells = {"start": kmeans_cells(cfg, start, conditions), "adapted": kmeans_cells(cfg, adapted, conditions)}
    cells["gate"] = cells["adapted" if decision["kept"] == "adapted" else "start"]
    return {"cells": cells, "gate": decision, "seconds": record["seconds"]}


def score_familiar(recipe: str, stage: str, seed: int) -> dict:
    """The same on data the backbone learned from: the default config's backbone (every meta-training dataset, in
    memory, with the recipe) adapted to each meta-training dataset's unlabeled train split, k-means per task on its
    test split at the default shapes (where adaptation should be declined: docs/METHOD.md, "When not to adapt")."""
    cfg = hmlib.load_config("default", overrides={"backbone": RECIPES[recipe], "transductive": STAGES[stage]})
    hmlib.configure_runtime(cfg)
    image_sets = {dataset: data.load_split(dataset, "train", cfg.data, progress=False)
                  for dataset in backbone_datasets(cfg)}
    start, _ = train_backbone(list(image_sets.values()), cfg, seed, progress=False)
    out = {}
    for dataset, image_set in image_sets.items():
        adapted, record = train_transductive(start, adaptation_images(cfg, image_set), cfg, seed=seed, progress=False)
        decision = gate(cfg, start, adapted, image_set.images)
        conditions = grid(cfg, [dataset], verbose=False)
        cells = {"start": kmeans_cells(cfg, start, conditions), "adapted": kmeans_cells(cfg, adapted, conditions)}
        cells["gate"] = cells["adapted" if decision["kept"] == "adapted" else "start"]
        out[dataset] = {"cells": cells, "gate": decision, "seconds": record["seconds"]}
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), choices=EVERY_FOLD)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--familiar", action="store_true",
                        help="instead of the folds: the default backbone adapted to its own meta-training datasets")
    parser.add_argument("--out", type=Path, default=paths.results_dir() / "transductive_recipe.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.familiar:
        for recipe in args.recipes:
            for stage in args.stages:
                for seed in args.seeds:
                    keys = [f"{FAMILIAR}{dataset}" for dataset in hmlib.load_config("default").meta.train_datasets]
                    if all(str(seed) in results.get(key, {}).get(f"{recipe} / {stage}", {}) for key in keys):
                        continue
                    for dataset, entry in score_familiar(recipe, stage, seed).items():
                        results.setdefault(f"{FAMILIAR}{dataset}", {}).setdefault(f"{recipe} / {stage}", {})[
                            str(seed)] = entry
                        print(f"familiar {dataset}, {recipe} / {stage}, seed {seed}: k-means start "
                              f"{100 * mean_of(entry, 'start'):.2f}, adapted {100 * mean_of(entry, 'adapted'):.2f}, "
                              f"gate kept {entry['gate']['kept']}", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results))
        print(table(results, tuple(k for k in results if k.startswith(FAMILIAR))))
        return
    for fold in args.folds:
        for recipe in args.recipes:
            for stage in args.stages:
                for seed in args.seeds:
                    done = results.setdefault(fold, {}).setdefault(f"{recipe} / {stage}", {})
                    if str(seed) in done:
                        continue
                    done[str(seed)] = entry = score_stage(fold, recipe, stage, seed)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results))
                    print(f"{fold}, {recipe} / {stage}, seed {seed}: k-means start {100 * mean_of(entry, 'start'):.2f}"
                          f", adapted {100 * mean_of(entry, 'adapted'):.2f}, gate kept {entry['gate']['kept']}",
                          flush=True)
    print(table(results, tuple(args.folds)))


if __name__ == "__main__":
    main()
