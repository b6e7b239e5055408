"""The leave-one-dataset-out folds of docs/lodo/ (docs/METHOD.md, "A leave-one-dataset-out fold"): honest stand-ins
for an unseen dataset, on which settings may be chosen. Each must hold its dataset out of every stage that trains
(VAE, backbone, meta-training all read ``meta.train_datasets``), evaluate on that dataset only, and shift it only by
*train-family* corruptions: a held-out benchmark corruption there would be choosing settings on held-out shifts.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import pytest

from hmlib.backbone.train import backbone_datasets
from hmlib.config import config_to_dict, load_config
from hmlib.data.corruptions import CORRUPTIONS, train_corruptions
from hmlib.data.registry import parse_shifted
from hmlib.paths import REPO_ROOT

FOLDS = sorted((REPO_ROOT / "docs" / "lodo").glob("*.json"))
# variants of a fold (docs/lodo/variants/<variant>_<dataset>.json): the fold's file plus the method settings measured
VARIANTS = sorted((REPO_ROOT / "docs" / "lodo" / "variants").glob("*.json"))
DEFAULT = load_config("default")


def held_back_of(path: Path) -> str:
    return next(name for name in DEFAULT.meta.train_datasets if path.stem == name or path.stem.endswith(f"_{name}"))


def test_there_is_a_fold_per_documented_held_back_dataset():
    assert [f.stem for f in FOLDS] == ["fashion_mnist", "hebrew_chars", "math_shapes"]
    method = (REPO_ROOT / "docs" / "METHOD.md").read_text()
    for fold in FOLDS:
        assert f"docs/lodo/{fold.name}" in method, f"{fold.name} is not documented in docs/METHOD.md"


@pytest.mark.parametrize("fold", FOLDS + VARIANTS, ids=lambda p: p.stem)
def test_a_fold_holds_its_dataset_out_of_training_and_shifts_it_by_the_train_family_only(fold: Path):
    cfg = load_config("default", fold)  # validates, as `hmlib run --config` does
    held_back = held_back_of(fold)
    assert held_back in DEFAULT.meta.train_datasets  # a meta-training dataset, never a held-out one
    assert held_back not in cfg.meta.train_datasets
    registered = [name for name in cfg.meta.train_datasets if name not in cfg.data.custom_datasets]
    assert set(registered) == set(DEFAULT.meta.train_datasets) - {held_back}  # more only as a variant's own data
    assert fold in VARIANTS or not cfg.data.custom_datasets
    tested = [parse_shifted(name) for name in cfg.meta.test_datasets]
    assert tested and {base for base, _ in tested} == {held_back}
    shifts = [shift for _, shift in tested if shift is not None]
    assert shifts and all(CORRUPTIONS[s].family == "train" and s in train_corruptions() for s in shifts)
    for section in (cfg.transductive.datasets, cfg.ablation.datasets):
        assert section and all(parse_shifted(name)[0] == held_back for name in section)
    raw = json.loads(fold.read_text())
    if fold in FOLDS:
        assert set(raw) <= {"seeds", "meta", "eval", "transductive", "ablation"}  # no method setting differs


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda p: p.stem)
def test_a_variant_is_its_fold_plus_method_settings_and_is_documented(variant: Path):
    """A variant changes method settings (or adds meta-training data of its own) only: every other section of its
    fold's file is there unchanged."""
    fold = json.loads((REPO_ROOT / "docs" / "lodo" / f"{held_back_of(variant)}.json").read_text())
    raw = json.loads(variant.read_text())
    added = raw.get("data", {}).get("custom_datasets", {})
    raw["meta"]["train_datasets"] = [name for name in raw["meta"]["train_datasets"] if name not in added]
    assert {key: raw.get(key) for key in fold} == fold and set(raw) > set(fold)
    assert f"docs/lodo/variants/{variant.name}" in (REPO_ROOT / "docs" / "METHOD.md").read_text()


def _variants_script(name: str):
    """docs/lodo/variants/<name>.py as a module (a script of the docs, not of the package)."""
    path = REPO_ROOT / "docs" / "lodo" / "variants" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _backbone_recipe():
    return _variants_script("backbone_recipe")


def test_the_backbone_recipe_trains_every_variant_without_the_held_back_dataset():
    recipe = _backbone_recipe()
    assert "docs/lodo/variants/backbone_recipe.py" in (REPO_ROOT / "docs" / "METHOD.md").read_text()
    assert set(recipe.FOLDS) <= set(recipe.EVERY_FOLD) == {f.stem for f in FOLDS}  # default: its first table's
    for fold in recipe.EVERY_FOLD:
        base = load_config("default", REPO_ROOT / "docs" / "lodo" / f"{fold}.json")
        assert recipe.has_variant(fold, recipe.GLYPHS) == (fold in recipe.FOLDS)  # glyphs: the first two folds
        for name, settings in recipe.VARIANTS.items():
            if not recipe.has_variant(fold, name):
                continue
            cfg = recipe.variant_config(fold, name)  # validates every setting
            learns_from = backbone_datasets(cfg)
            assert fold not in learns_from and set(base.meta.train_datasets) <= set(learns_from)
            assert cfg.meta.test_datasets == base.meta.test_datasets and cfg.eval == base.eval  # the fold's tasks
            for key, value in settings.items():  # each setting applied, and nothing else of the fold's backbone moved
                if key != "datasets":
                    assert getattr(cfg.backbone, key) == (tuple(value) if isinstance(value, list) else value)
            assert {key for key in config_to_dict(cfg.backbone) if getattr(cfg.backbone, key) !=
                    getattr(base.backbone, key)} <= set(settings)
            assert (name == recipe.GLYPHS) == (set(learns_from) != set(base.meta.train_datasets))


def test_the_backbone_recipe_on_familiar_data_is_the_default_backbone_with_the_variant():
    """--folds familiar: the default config's backbone (every meta-training dataset) with the variant's settings."""
    recipe = _backbone_recipe()
    default = load_config("default")
    assert not recipe.has_variant(recipe.FAMILIAR, recipe.GLYPHS)
    for name, settings in recipe.VARIANTS.items():
        if name == recipe.GLYPHS:
            continue
        cfg = recipe.variant_config(recipe.FAMILIAR, name)
        assert cfg.meta == default.meta and set(backbone_datasets(cfg)) == set(default.meta.train_datasets)
        assert all(getattr(cfg.backbone, key) == (tuple(value) if isinstance(value, list) else value)
                   for key, value in settings.items())


def test_the_backbone_recipe_table_pairs_each_variant_with_the_shipped_recipe_per_fold_and_seed():
    recipe = _backbone_recipe()
    cells = lambda value: {"cells": {"a": [value, value], "b": [value, value]}}  # noqa: E731
    shipped, variant = recipe.REFERENCE, list(recipe.VARIANTS)[1]
    results = {fold: {shipped: {"0": cells(0.5), "1": cells(0.6)}, variant: {"0": cells(0.55), "1": cells(0.6),
                                                                               "2": cells(0.9)}}
               for fold in recipe.FOLDS}
    row = next(line for line in recipe.table(results).splitlines() if line.startswith(f"| {variant} |"))
    # seeds 0 and 1 only (seed 2 has no shipped partner): +5.0 and +0.0 points, on each fold
    fold = "57.5 | +2.5 ± 31.8 (n = 2)"
    assert row == f"| {variant} | {fold} | {fold} | +2.5 ± 4.6 (n = 4) |"


def test_the_transductive_recipe_adapts_each_folds_backbone_to_its_held_back_dataset_only():
    """Each (recipe, stage) is the fold's config with its backbone and transductive settings only, the stage runs
    (the folds' own runs skip it), and the backbone never learns from the held-back dataset."""
    script = _variants_script("transductive_recipe")
    assert "docs/lodo/variants/transductive_recipe.py" in (REPO_ROOT / "docs" / "METHOD.md").read_text()
    assert set(script.FOLDS) <= set(script.EVERY_FOLD) == {f.stem for f in FOLDS}
    for fold in script.EVERY_FOLD:
        base = load_config("default", REPO_ROOT / "docs" / "lodo" / f"{fold}.json")
        for recipe, backbone in script.RECIPES.items():
            for stage, settings in script.STAGES.items():
                cfg = script.fold_config(fold, recipe, stage)
                assert fold not in backbone_datasets(cfg) and cfg.eval == base.eval and cfg.meta == base.meta
                assert cfg.transductive.epochs == load_config("default").transductive.epochs > 0
                assert all(getattr(cfg.backbone, key) == value for key, value in backbone.items())
                assert all(getattr(cfg.transductive, key) == value for key, value in settings.items())


def test_the_transductive_recipe_table_pairs_adapted_and_gated_with_the_start_per_seed():
    script = _variants_script("transductive_recipe")
    cells = lambda value: {"a": [value, value]}  # noqa: E731
    run = lambda start, adapted, kept: {"cells": {"start": cells(start), "adapted": cells(adapted),  # noqa: E731
                                                  "gate": cells(adapted if kept else start)},
                                        "gate": {"kept": "adapted" if kept else "start"}}
    recipe, stage = next(iter(script.RECIPES)), next(iter(script.STAGES))
    results = {"f": {f"{recipe} / {stage}": {"0": run(0.5, 0.6, True), "1": run(0.6, 0.6, False)}}}
    row = next(line for line in script.table(results, ("f",)).splitlines() if line.startswith(f"| {recipe}, {stage}"))
    assert row == f"| {recipe}, {stage} | 55.0 | +5.0 ± 63.5 | +5.0 ± 63.5 (1/2) |"


def test_the_gate_criteria_table_scores_each_rule_by_the_accuracy_of_its_choices():
    """Two runs of one recipe: adapting pays on the first (its criterion rises clearly) and costs on the second (it
    falls clearly); every rule that follows the criterion picks the better of the two on both."""
    script = _variants_script("transductive_recipe")
    run = lambda start, adapted, change: {  # noqa: E731
        "cells": {"start": {"a": [start]}, "adapted": {"a": [adapted]}, "gate": {"a": [start]}},
        "gate": {"kept": "start"}, "criteria": {"silhouette_k4": [change, change * 1.1, change * 0.9]}}
    results = {"f": {"r / s": {"0": run(0.5, 0.7, 0.1)}}, f"{script.FAMILIAR}g": {"r / s": {"0": run(0.8, 0.6, -0.1)}}}
    lines = script.criteria_table(results).splitlines()
    assert lines[0] == "| choice | r, familiar (n = 1) | r, held back (n = 1) |"
    rows = {line[2:].split(" | ")[0]: line.rstrip(" |").split(" | ")[1:] for line in lines[2:]}
    assert rows["never adapt"] == ["80.0", "50.0"] and rows["always adapt"] == ["60.0", "70.0"]
    assert rows["the better (labels)"] == ["80.0", "70.0"]
    assert all(rows[f"silhouette_k4: {rule}"] == ["80.0", "70.0"] for rule in script.RULES)


def _meta_parts():
    return _variants_script("meta_parts")


def test_meta_parts_retrains_arms_on_the_fold_and_differs_from_it_by_their_overrides_only():
    parts = _meta_parts()
    assert "docs/lodo/variants/meta_parts.py" in (REPO_ROOT / "docs" / "METHOD.md").read_text()
    assert set(parts.FOLDS) <= set(parts.EVERY_FOLD) == {f.stem for f in FOLDS}  # default: its tables' folds
    for fold in parts.EVERY_FOLD:
        base = parts.fold_config(fold)
        assert base == load_config("default", REPO_ROOT / "docs" / "lodo" / f"{fold}.json")
        for arm in parts.RETRAINED:
            cfg = parts.fold_config(fold, arm)
            assert fold not in cfg.meta.train_datasets and cfg.meta.test_datasets == base.meta.test_datasets
            assert cfg != base
            undone = {section: dataclasses.replace(getattr(cfg, section), **{k: getattr(getattr(base, section), k)
                                                                            for k in keys})
                      for section, keys in parts.RETRAINED[arm].items()}
            assert dataclasses.replace(cfg, **undone) == base


def test_meta_parts_hybrids_take_each_part_from_the_right_hypernetwork():
    import torch

    from hmlib.backbone.model import ConvBackbone
    from hmlib.hyper.hypernet import HyperNet
    from hmlib.reproducibility import seeded

    parts = _meta_parts()
    cfg = load_config("smoke")
    with seeded(0):
        trained = HyperNet(cfg, 6, 3, backbone=ConvBackbone((4, 8), 8, 3))
    with seeded(1):
        initial = HyperNet(cfg, 6, 3, backbone=ConvBackbone((4, 8), 8, 3))
    with torch.no_grad():
        for p in trained.generator.log_lrs.values():
            p.add_(1.0)  # meta-learned step sizes that differ from the initial ones
    arms = parts.test_time_arms(trained, initial)
    assert list(arms) == list(parts.TEST_TIME)
    lrs = lambda h: torch.cat([p.detach().flatten() for p in h.generator.log_lrs.values()])  # noqa: E731
    heads = lambda h: [m.weight for m in h.generator.heads]  # noqa: E731
    first, second, half, constant, film_only, blend_only, tau_only = arms.values()
    assert torch.equal(lrs(first), lrs(trained)) and all(torch.equal(a, b) for a, b in zip(heads(first), heads(initial)))
    assert torch.equal(lrs(second), lrs(initial)) and all(torch.equal(a, b) for a, b in zip(heads(second), heads(trained)))
    assert all(torch.allclose(a, 0.5 * b) for a, b in zip(heads(half), heads(trained)))
    codes = torch.randn(2, cfg.hyper.embed_dim)  # a constant adaptation: every task code gives the heads' biases
    for head in [*constant.generator.heads, constant.generator.tau_head]:
        assert torch.equal(head(codes)[0], head(codes)[1])
    film = lambda h: [m.weight[:-1] for m in h.generator.heads]  # noqa: E731
    blend = lambda h: [m.weight[-1] for m in h.generator.heads]  # noqa: E731
    tau = lambda h: h.generator.tau_head.weight  # noqa: E731
    same = lambda xs, ys: all(torch.equal(x, y) for x, y in zip(xs, ys))  # noqa: E731
    for arm, learned in ((film_only, "film"), (blend_only, "blend"), (tau_only, "temperature")):
        # one generated output from the meta-trained heads, the others from the initial ones; the rest meta-trained
        assert same(film(arm), film(trained if learned == "film" else initial))
        assert same(blend(arm), blend(trained if learned == "blend" else initial))
        assert torch.equal(tau(arm), tau(trained if learned == "temperature" else initial))
        assert torch.equal(lrs(arm), lrs(trained)) and same(arm.encoder.parameters(), trained.encoder.parameters())
    assert not same(film(trained), film(initial)) and not same(blend(trained), blend(initial))
    assert not torch.equal(tau(trained), tau(initial))
    assert lrs(trained).ne(lrs(initial)).all()  # the arms are copies: the originals are unchanged
    assert all(torch.equal(a, b) for a, b in zip(heads(trained), [m.weight for m in trained.generator.heads]))


def test_meta_parts_table_pairs_every_arm_per_task_with_the_shipped_hypernetwork_and_its_initialisation():
    parts = _meta_parts()
    arm = lambda after, before=None: {"after": after, "before": before or after}  # noqa: E731
    cell = {name: arm([0.5, 0.7]) for name in parts.ARMS}
    cell[parts.INITIAL] = arm([0.4, 0.6])
    cell[parts.TEST_TIME[0]] = arm([0.6, 0.8], [0.5, 0.6])
    results = {"fashion_mnist": {"0": {"c1": cell, "c2": cell}}}
    lines = parts.table(results).splitlines()
    row = next(line for line in lines if line.startswith(f"| {parts.TEST_TIME[0]} |"))
    # four tasks (two conditions of one seed): +10 points on every one over the shipped and the plain update, +20 over
    # the initialisation; the inner steps gained 10 and 20 points
    assert row == f"| {parts.TEST_TIME[0]} | 70.0 | +10.0 ± 0.0 * | +20.0 ± 0.0 * | +10.0 ± 0.0 * | +15.0 ± 9.2 * |"
    assert next(line for line in lines if line.startswith(f"| {parts.SHIPPED} |")).endswith(
        "| 60.0 |  | +10.0 ± 0.0 * | +0.0 ± 0.0 | +0.0 ± 0.0 |")
    assert next(line for line in lines if line.startswith(f"| {parts.PLAIN} |")).endswith(
        "| 60.0 | +0.0 ± 0.0 | +10.0 ± 0.0 * |  |  |")  # a baseline: no difference from itself, no test-time gain
    assert "fashion_mnist 0 (4 tasks)" in lines[-1]
    # an arm not scored on every task of a fold (here on one of its two conditions): no figures
    results["fashion_mnist"]["0"]["c2"] = {name: v for name, v in cell.items() if name != parts.KMEANS}
    row = next(line for line in parts.table(results).splitlines() if line.startswith(f"| {parts.KMEANS} |"))
    assert row == f"| {parts.KMEANS} | n/a | n/a | n/a | n/a | n/a |"


def test_meta_parts_scores_the_arms_asked_for_with_the_references_and_the_hypernetworks_they_need():
    parts = _meta_parts()
    every_block = "every block adapted (re-trained)"
    assert parts.retrained_for(["8 inner steps at test time"]) == []  # the shipped hypernetwork, not re-trained
    assert parts.retrained_for(["every block adapted, 8 inner steps at test time"]) == [every_block]
    assert parts.retrained_for(parts.ARMS) == list(parts.RETRAINED)
    assert set(parts.ALWAYS) == {parts.SHIPPED, parts.INITIAL, parts.KMEANS, parts.PLAIN}
    # a results file of some arms only (another seed, --arms): rows for those, none for the arms never scored
    cell = {name: {"after": [0.5, 0.7], "before": [0.5, 0.7]} for name in (*parts.ALWAYS, "8 inner steps at test time")}
    rows = [line.split(" | ")[0][2:] for line in parts.table({"math_shapes": {"2": {"c": cell}}}).splitlines()[2:]
            if line.startswith("| ")]
    assert rows == [name for name in parts.ARMS if name in cell]


def test_meta_parts_pools_results_files_by_seed_and_refuses_a_seed_twice():
    parts = _meta_parts()
    cell = lambda value: {"c": {name: {"after": [value], "before": [value]} for name in parts.ALWAYS}}  # noqa: E731
    merged = parts.pooled([{"math_shapes": {"0": cell(0.5), "1": cell(0.6)}}, {"math_shapes": {"2": cell(0.7)}},
                           {"fashion_mnist": {"2": cell(0.4)}}])
    assert sorted(merged["math_shapes"]) == ["0", "1", "2"] and sorted(merged["fashion_mnist"]) == ["2"]
    assert "math_shapes 0, 1, 2 (3 tasks)" in parts.table(merged).splitlines()[-1]
    with pytest.raises(SystemExit, match="seed 1 of math_shapes is in two results files"):
        parts.pooled([{"math_shapes": {"1": cell(0.5)}}, {"math_shapes": {"1": cell(0.6)}}])


def _steps_by_size():
    return _variants_script("steps_by_size")


def test_steps_by_size_scores_the_small_task_sizes_and_the_folds_own_on_fold_data_only():
    script = _steps_by_size()
    assert "docs/lodo/variants/steps_by_size.py" in (REPO_ROOT / "docs" / "METHOD.md").read_text()
    for fold in FOLDS:
        cfg = load_config("default", fold)
        shapes = script.fold_shapes(fold.stem)
        assert shapes[:2] == [(2, 64), (4, 64)] and set(shapes[2:]) == {tuple(s) for s in cfg.eval.shapes}
        assert script.meta_parts.fold_config(fold.stem).meta.test_datasets == cfg.meta.test_datasets  # held back only


def test_steps_by_size_table_pairs_counts_per_task_averaged_over_seeds():
    script = _steps_by_size()
    counts = lambda a, b, c: {"3": a, "5": b, "8": c}  # noqa: E731
    results = {"fashion_mnist": {"0": {"fashion_mnist_K4_N64": counts([0.5, 0.5], [0.5, 0.6], [0.6, 0.7])},
                                 "1": {"fashion_mnist_K4_N64": counts([0.5, 0.7], [0.5, 0.6], [0.6, 0.7])}}}
    lines = script.table(results).splitlines()
    assert lines[0] == "| fold | K, N | tasks | 8 minus 3 steps | 5 minus 3 steps | 8 minus 5 steps |"
    # per task, over the two seeds: 3 steps 0.5 / 0.6, 5 steps 0.5 / 0.6, 8 steps 0.6 / 0.7: +10 points on both tasks
    assert lines[2] == "| fashion_mnist | 4, 64 | 2 | +10.0 ± 0.0 * | +0.0 ± 0.0 | +10.0 ± 0.0 * |"
    assert len(lines) == 3  # one fold: no pooled rows
    results["math_shapes"] = {"0": {"math_shapes_K8_N400": counts([0.4], [0.4], [0.3]),
                                    "math_shapes_K4_N64": counts([0.4], [0.5], [0.4])}}
    rows = script.table(results).splitlines()[2:]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| fashion_mnist", "4, 64", "2"], ["| math_shapes", "4, 64", "1"], ["| math_shapes", "8, 400", "1"],
        ["| both folds", "4, 64", "3"], ["| both folds", "8, 400", "1"]]


def test_score_folds_runs_each_fold_in_its_home_saves_as_it_goes_and_resumes(tmp_path, monkeypatch):
    parts = _meta_parts()
    monkeypatch.setenv("HMLIB_HOME", str(tmp_path / "elsewhere"))
    out, calls = tmp_path / "results" / "r.json", []

    def score(fold, seed, done, save):
        calls.append((fold, seed, Path(os.environ["HMLIB_HOME"]).name))
        done.setdefault("cell", seed)
        save()

    results = parts.score_folds(out, ["fashion_mnist", "math_shapes"], [0, 1], str(tmp_path / "lodo"), score)
    assert calls == [("fashion_mnist", 0, "fashion_mnist"), ("fashion_mnist", 1, "fashion_mnist"),
                     ("math_shapes", 0, "math_shapes"), ("math_shapes", 1, "math_shapes")]
    assert json.loads(out.read_text()) == results == {f: {"0": {"cell": 0}, "1": {"cell": 1}}
                                                      for f in ("fashion_mnist", "math_shapes")}
    out.write_text(json.dumps({"fashion_mnist": {"0": {"cell": 7}}}))  # a rerun starts from what was saved
    assert parts.score_folds(out, ["fashion_mnist"], [0], str(tmp_path / "lodo"), score)["fashion_mnist"]["0"] == {
        "cell": 7}
