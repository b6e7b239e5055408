"""The backbone's training recipe on the leave-one-dataset-out folds (docs/METHOD.md, "The backbone's training
recipe on the folds"): each fold's backbone (docs/lodo/<dataset>.json: trained without the held-back dataset) is
trained with the reference recipe and with each variant below, for seeds 0-2, and scored by k-means per task on
the held-back dataset's evaluation suites (the fold's own conditions and tasks, 40 per condition). Paired per
(fold, seed): the variant's mean over the fold's conditions minus the reference recipe's (the first row:
cross-entropy only, as the backbone shipped before the contrastive term). Nothing is written to
models/ (the backbones live in memory); every (fold, variant, seed) is saved to --out as soon as it is scored, and
a rerun scores only what is missing. The glyph variant reads the datasets that make_glyphs.py writes (run it first).

    .venv/bin/python docs/lodo/variants/make_glyphs.py
    .venv/bin/python docs/lodo/variants/backbone_recipe.py                # -> results/backbone_recipe.json + a table
"""
import argparse
import json
from pathlib import Path

import numpy as np

import hmlib
from hmlib import data, paths
from hmlib.backbone.embeddings import embed_images
from hmlib.backbone.train import backbone_datasets, train_backbone
from hmlib.evaluation.conditions import build_suite, grid
from hmlib.evaluation.methods import METHODS, MethodContext, score
from hmlib.evaluation.quality import RowsInputs
from hmlib.stats import paired, signed

FOLDS = ("fashion_mnist", "math_shapes")  # the default --folds: the folds docs/METHOD.md's first table was measured on
EVERY_FOLD = tuple(sorted(p.stem for p in (paths.REPO_ROOT / "docs" / "lodo").glob("*.json")))  # what --folds may name
# --folds familiar: not a fold but the default config's backbone (every meta-training dataset) scored on the test
# splits of its own meta-training datasets: what a recipe does to the classes it learned
FAMILIAR = "familiar"
GLYPHS = "+ the six glyph datasets (make_glyphs.py)"  # read from the fold's synthetic_<dataset>.json variant
CE = {"contrastive": 0.0}  # cross-entropy only: the recipe every row but the contrastive ones starts from
ON_EMBEDDING = {"contrastive_head": 0}  # the contrastive term on the embedding itself, no projection head
VARIANTS = {  # backbone settings on top of the fold's (whose default is the recipe as it ships)
    "cross-entropy only (4 epochs, 16-32-64; the recipe before the contrastive term)": CE,
    "8 epochs": {**CE, "epochs": 8},
    "12 epochs": {**CE, "epochs": 12},
    "channels 32-64-128": {**CE, "channels": [32, 64, 128]},
    "channels 32-64-128, 8 epochs": {**CE, "channels": [32, 64, 128], "epochs": 8},
    "no label smoothing": {**CE, "label_smoothing": 0.0},
    "no train-family corruptions": {**CE, "shift_prob": 0.0},
    "affine augmentation x 0.5": {**CE, "augment": 0.5},
    "affine augmentation x 1.5": {**CE, "augment": 1.5},
    GLYPHS: {**CE, "datasets": None},
    "+ contrastive views, weight 1": {"contrastive": 1.0, **ON_EMBEDDING},
    "+ contrastive views, weight 0.3": {"contrastive": 0.3, **ON_EMBEDDING},
    "+ contrastive views, weight 1, temperature 0.5": {"contrastive": 1.0, "contrastive_temperature": 0.5,
                                                       **ON_EMBEDDING},
    "+ contrastive views, weight 3": {"contrastive": 3.0, **ON_EMBEDDING},
    "+ contrastive views, weight 1, projection head 128": {"contrastive": 1.0, "contrastive_head": 128},
    "+ contrastive views, weight 3, projection head 128": {"contrastive": 3.0, "contrastive_head": 128},
    "+ contrastive views, weight 0.3, projection head 128 (as it ships)": {},
    "+ contrastive views, weight 0.1, projection head 128": {"contrastive": 0.1, "contrastive_head": 128},
}
REFERENCE = next(iter(VARIANTS))


def variant_config(fold: str, name: str) -> hmlib.Config:
    """The fold's config with the variant's backbone settings (the glyph variant: the fold's synthetic_ variant,
    whose meta-training datasets include the glyphs, with the backbone learning from all of them)."""
    folds = paths.REPO_ROOT / "docs" / "lodo"
    config = None if fold == FAMILIAR else \
        folds / "variants" / f"synthetic_{fold}.json" if name == GLYPHS else folds / f"{fold}.json"
    return hmlib.load_config("default", config, {"backbone": VARIANTS[name]})


def has_variant(fold: str, name: str) -> bool:
    """Whether the fold has the variant (the glyph variant: only where its synthetic_<fold>.json exists)."""
    return name != GLYPHS or fold != FAMILIAR and \
        (paths.REPO_ROOT / "docs" / "lodo" / "variants" / f"synthetic_{fold}.json").is_file()


def score_backbone(fold: str, name: str, seed: int) -> dict:
    """k-means accuracy per task (per condition) of the fold's held-back dataset on a backbone trained with the
    variant ``name``."""
    cfg = variant_config(fold, name)
    hmlib.configure_runtime(cfg)
    image_sets = [data.load_split(dataset, "train", cfg.data, progress=False) for dataset in backbone_datasets(cfg)]
    model, record = train_backbone(image_sets, cfg, seed, progress=False)
    cells, rows = {}, {}
    for condition in grid(cfg, cfg.meta.train_datasets if fold == FAMILIAR else None, verbose=False):
        if condition.dataset not in rows:
            rows[condition.dataset] = embed_images(
                model, data.load_split(condition.dataset, "test", cfg.data, progress=False).images)
        ctx = MethodContext(cfg, RowsInputs({"embedding": rows[condition.dataset]}), build_suite(cfg, condition, 40), 0)
        cells[condition.key] = score(METHODS["kmeans_embedding"], ctx)[0].tolist()
    return {"cells": cells, "train_seconds": record["metrics"]["train_seconds"]}


def mean_over_conditions(entry: dict) -> float:
    """One (fold, recipe, seed)'s k-means accuracy, the mean over the fold's conditions (a fraction)."""
    return float(np.mean([np.mean(v) for v in entry["cells"].values()]))


def table(results: dict, folds=FOLDS) -> str:
    """Markdown: per recipe and fold the k-means mean over conditions and seeds, and the paired difference from the
    reference recipe (t-interval over the fold's seeds; over every fold's (fold, seed) pairs in the last column; '*'
    where it excludes zero)."""
    lines = ["| recipe | " + " | ".join(f"{f}: k-means | vs cross-entropy only" for f in folds) +
             f" | {'both' if len(folds) == 2 else f'all {len(folds)}'} folds vs cross-entropy only |",
             "|---|" + "---:|---:|" * len(folds) + "---:|"]
    for name in VARIANTS:
        cells, every, every_reference = [], [], []
        for fold in folds:
            seeds = sorted(s for s in results.get(fold, {}).get(name, {}) if s in results[fold].get(REFERENCE, {}))
            means = [mean_over_conditions(results[fold][name][s]) for s in seeds]
            reference = [mean_over_conditions(results[fold][REFERENCE][s]) for s in seeds]
            every, every_reference = every + means, every_reference + reference
            cells += [f"{100 * np.mean(means):.1f}" if means else "", versus(means, reference, name)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {versus(every, every_reference, name)} |")
    return "\n".join(lines)


def versus(means: list[float], reference: list[float], name: str) -> str:
    """The paired difference in points with its interval and the number of pairs ('' for the reference)."""
    if name == REFERENCE or not means:
        return ""
    return f"{signed(paired(np.asarray(means), np.asarray(reference)))} (n = {len(means)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), choices=(*EVERY_FOLD, FAMILIAR))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, metavar="VARIANT",
                        help="the recipes to score (the reference always)")
    parser.add_argument("--out", type=Path, default=paths.results_dir() / "backbone_recipe.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for fold in args.folds:
        for name in [n for n in dict.fromkeys([REFERENCE, *args.variants]) if has_variant(fold, n)]:
            for seed in args.seeds:
                done = results.setdefault(fold, {}).setdefault(name, {})
                if str(seed) in done:
                    continue
                done[str(seed)] = score_backbone(fold, name, seed)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results))
                print(f"{fold}, {name}, seed {seed}: k-means {100 * mean_over_conditions(done[str(seed)]):.2f}",
                      flush=True)
    print(table(results, tuple(args.folds)))


if __name__ == "__main__":
    main()
