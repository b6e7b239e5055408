"""Ablations: the specs, summaries (pooled and per condition) and generated conclusions, the JSON cache, and every
variant of a tiny trained protocol scored on identical tasks of the ablation grid (clean and shifted mnist)."""
from __future__ import annotations

import dataclasses
import os
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from datafactory import balanced_labels, class_patterns, to_pil, write_parquet_split
from hmlib import paths
from hmlib.ablations import (AblationResult, Variant, ablation_grid, ablation_seeds, conclusions, define_ablations,
                             describe, headline_rows, run_ablation, run_all, step_table, step_table_rows, table_rows)
from hmlib.ablations import run as ablation_run
from hmlib.ablations.run import (_context, initial_hypernet, keep_other, load_cached, result_path, training_config,
                                 variant_curves, variant_hypernet)
from hmlib.artifacts import fingerprint, load_checkpoint, read_json, save_checkpoint, write_json
from hmlib.cluster.estimator import default_checkpoint
from hmlib.config import ConfigError, config_to_dict, load_config, with_overrides
from hmlib.evaluation.conditions import Condition, build_suite, suite_seed
from hmlib.evaluation.inputs import seed_inputs
from hmlib.evaluation.methods import METHODS, MethodContext, score
from hmlib.hyper import losses
from hmlib.hyper.adapt import CANDIDATES, adapt_candidates, choice_rule, predict_task
from hmlib.hyper.bundle import load_bundle
from hmlib.hyper.losses import InnerLoss, task_accuracy
from hmlib.plots.ablations import plot_comparison, plot_step_curve
from hmlib.reports import record_headline
from tinyprotocol import K, N, train_home, use_home

TASKS, STEPS, SEEDS = 40, 4, 2
CONDITIONS, PER_CONDITION = ["mnist_K3_N18", "mnist+rotate_K3_N18"], [24, 16]
LABEL_NOISE = 0.3  # share of the held-out test images whose label is another class's (accuracies below 100%)
FILM_ABLATIONS = ["steps", "step_size", "meta_learning", "conditioning", "statistics", "choice", "adapted",
                  "transductive", "inner_loss"]


def fake_curves(seed: int, shift: float, noise: float = 0.02, rising: bool = False) -> np.ndarray:
    """(SEEDS, TASKS, STEPS+1) accuracies around 0.5 + shift; task difficulty shared by every variant (seed 0)."""
    difficulty = np.random.default_rng(0).uniform(0.4, 0.6, TASKS)[None, :, None]
    ramp = np.linspace(0, 0.1, STEPS + 1)[None, None] if rising else 0.0
    rng = np.random.default_rng(seed)
    return np.clip(difficulty + shift + ramp + rng.normal(0, noise, (SEEDS, TASKS, STEPS + 1)), 0, 1)


def make_result(reference: str | None = "ref", **curves: np.ndarray) -> AblationResult:
    curves = curves or {"ref": fake_curves(1, 0.0), "better": fake_curves(2, 0.1), "same": fake_curves(3, 0.0)}
    return AblationResult(key="toy", title="Toy ablation", question="Does it work?", reference=reference,
                          variants=[config_to_dict(Variant(label)) for label in curves], acc=dict(curves),
                          kmeans=fake_curves(9, 0.05)[:, :, 0], conditions=list(CONDITIONS),
                          condition_tasks=list(PER_CONDITION), setting="zero_shot", seeds=list(range(SEEDS)),
                          meta={"config": {"task": {"num_classes": K}}})


def write_noisy_mirror(root, source) -> None:
    """A copy of the tiny mirror whose mnist test split has LABEL_NOISE wrong labels: clustering is imperfect."""
    shutil.copytree(source, root)
    labels = balanced_labels(60, 6, seed=3)
    shown = labels.copy()
    flip = np.random.default_rng(4).random(len(labels)) < LABEL_NOISE
    shown[flip] = (labels[flip] + 1 + np.random.default_rng(5).integers(0, 5, flip.sum())) % 6
    write_parquet_split(root / "mnist" / "test.parquet", to_pil(class_patterns(labels, 6, seed=3)), shown,
                        [f"class_{c}" for c in range(6)])


@pytest.fixture(scope="module")
def trained(_tiny_mirror_root, tmp_path_factory):
    """The tiny protocol (seed 0, its backbone also adapted to mnist) on a mirror with a noisy held-out test split,
    and every ablation run."""
    mirror = tmp_path_factory.mktemp("noisy") / "mirror"
    write_noisy_mirror(mirror, _tiny_mirror_root)
    trained = train_home(tmp_path_factory.mktemp("trained"), mirror, [("zero_shot", 0), ("transductive", 0)])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HMLIB_HOME", str(trained.home))
        patch.setenv("HMLIB_DATA_DIR", str(mirror))
        trained.results = run_all(trained.cfg, progress=False)
    trained.mirror = mirror
    return trained


@pytest.fixture
def home(trained, hmlib_home, monkeypatch):
    """This test's copy of the trained home (as HMLIB_HOME, the noisy mirror as HMLIB_DATA_DIR)."""
    monkeypatch.setenv("HMLIB_DATA_DIR", str(trained.mirror))
    return use_home(trained, hmlib_home)


# --------------------------------------------------------------------------------------------- summaries

def test_summary_rows_and_table():
    """Rows pair each variant with the reference and k-means per task; '*' marks an interval excluding zero."""
    result = make_result()
    rows = {r["variant"]: r for r in result.summary()}
    assert "vs_reference" not in rows["ref"]
    better, after = rows["better"], result.acc["better"][:, :, -1].mean(0)
    assert better["steps"] == STEPS and better["tasks"] == TASKS and better["seeds"] == SEEDS
    assert better["after"]["mean"] == pytest.approx(after.mean())
    assert better["gain"]["mean"] == pytest.approx((after - result.acc["better"][:, :, 0].mean(0)).mean())
    assert better["vs_reference"]["excludes_zero"] and better["vs_reference"]["mean"] > 0.05
    assert better["vs_kmeans"]["mean"] == pytest.approx((after - result.kmeans.mean(0)).mean())
    table = table_rows(result)
    assert [r["variant"] for r in table] == ["ref", "better", "same"]
    assert table[1]["vs ref (pts)"].startswith("+") and table[1]["vs ref (pts)"].endswith("*")
    assert table[0]["vs ref (pts)"] == "–"


def test_by_condition_slices_the_pooled_tasks():
    """Pooled tasks are kept per condition: a variant that helps on one condition only says so per condition."""
    ref = fake_curves(1, 0.0)
    shifted_only = ref.copy()
    shifted_only[:, PER_CONDITION[0]:, :] += 0.1  # better on the rotated condition's tasks only
    result = make_result(ref=ref, shifted_only=shifted_only)
    slices = result.condition_slices()
    assert slices == {CONDITIONS[0]: slice(0, 24), CONDITIONS[1]: slice(24, 40)}
    parts = result.by_condition("shifted_only")
    assert list(parts) == CONDITIONS
    clean, rotated = parts[CONDITIONS[0]], parts[CONDITIONS[1]]
    assert clean["after"]["n"] == 24 and rotated["after"]["n"] == 16
    assert clean["after"]["mean"] == pytest.approx(result.after("shifted_only")[:24].mean())
    assert clean["vs_reference"]["mean"] == pytest.approx(0.0) and not clean["vs_reference"]["excludes_zero"]
    assert rotated["vs_reference"]["mean"] == pytest.approx(0.1) and rotated["vs_reference"]["excludes_zero"]
    assert rotated["vs_kmeans"]["mean"] == pytest.approx((result.after("shifted_only")[24:]
                                                          - result.kmeans.mean(0)[24:]).mean())
    assert "vs_reference" not in result.by_condition("ref")[CONDITIONS[0]]


def test_step_table():
    """Per step count: accuracy, gain over no step and difference with k-means; uncomputed steps are refused."""
    result = make_result(reference=None, main=fake_curves(1, 0.0, rising=True))
    rows = step_table(result, "main", [0, 2, STEPS])
    assert [r["steps"] for r in rows] == [0, 2, STEPS]
    assert rows[0]["gain"]["mean"] == 0.0 and rows[-1]["gain"]["mean"] > 0.05
    assert rows[-1]["acc"]["mean"] == pytest.approx(result.curve("main")[:, STEPS].mean())
    assert [r["inner steps"] for r in step_table_rows(result, "main", [0, STEPS])] == ["0", str(STEPS)]
    with pytest.raises(ValueError, match="not computed"):
        step_table(result, "main", [STEPS + 1])


def test_conclusions_only_call_a_difference_when_its_interval_excludes_zero():
    """'better'/'worse' needs a paired 95% interval that excludes zero; otherwise 'no clear difference'."""
    ref = fake_curves(1, 0.0)
    wobbly = ref.copy()
    wobbly[:, :, -1] += np.where(np.arange(TASKS) % 2, 0.2, -0.15)[None]  # mean +0.025, wide interval
    result = make_result(ref=ref, worse=fake_curves(2, -0.1), wobbly=wobbly)
    text = conclusions({"toy": result})[0]
    assert "(after adaptation, vs ref): worse: worse (-10" in text
    assert "wobbly: no clear difference (+2.5 points" in text
    stat = result.summary()[2]["vs_reference"]
    assert stat["mean"] > 0 and not stat["excludes_zero"]

    rising = make_result(reference=None, main=fake_curves(1, 0.0, rising=True, noise=0.0))
    line = conclusions({"steps": rising})[0]
    assert "still highest at the largest step count" in line and "adaptation helps" in line
    peaked = np.concatenate([fake_curves(1, 0.0, rising=True, noise=0.0)[:, :, :3],
                             fake_curves(1, -0.2, noise=0.0)[:, :, :2]], axis=2)
    line = conclusions({"steps": make_result(reference=None, main=peaked)})[0]
    assert f"to {100 * peaked[0, :, 2].mean():.1f}% at 2 steps" in line and "significantly lower at 4 steps" in line
    flat = fake_curves(1, 0.0, noise=0.0)[:, :, ::-1] - np.linspace(0, 0.1, STEPS + 1)
    assert "highest with no inner step" in conclusions({"steps": make_result(reference=None, main=flat)})[0]
    assert "at 2 steps" in conclusions({"steps": make_result(reference=None, main=peaked)}, step_grid=[0, 2])[0]


def test_headline_rows_are_flat_and_accepted_by_the_report_index():
    """Every variant is one flat row: its accuracy and its paired difference with the reference (or 0 steps)."""
    results = {"toy": make_result(), "steps": make_result(reference=None, main=fake_curves(1, 0.0, rising=True))}
    rows = headline_rows(results)
    assert len(rows) == 4 and all(not isinstance(v, (dict, list)) for r in rows for v in r.values())
    better = next(r for r in rows if r["variant"] == "better")
    assert better["vs"] == "ref"
    assert better["difference (pts)"].startswith("+") and better["difference (pts)"].endswith("*")
    assert next(r for r in rows if r["variant"] == "ref")["difference (pts)"] == ""
    steps = next(r for r in rows if r["ablation"] == "steps")
    assert steps["vs"] == "0 steps" and steps["difference (pts)"].startswith("+")
    assert record_headline("ablations", rows, "Toy ablations").is_file()


def test_ablation_figures():
    """The step curve and the paired comparison are drawn from a result."""
    figures = [plot_step_curve(make_result(reference=None, main=fake_curves(1, 0.0, rising=True)), [0, 1, STEPS]),
               plot_comparison(make_result())]
    assert all(isinstance(fig, Figure) for fig in figures) and len(figures[1].axes) == 2
    assert "2 held-out condition(s)" in figures[0].axes[0].get_title()
    assert len(plot_comparison(make_result(reference=None, main=fake_curves(1, 0.0))).axes) == 1
    plt.close("all")


# ------------------------------------------------------------------------------------------------ cache

def test_cache_round_trip_and_staleness(capsys):
    """A saved result loads back only for exactly the identity that made it; absent or corrupt files recompute."""
    result = make_result()
    result.meta = {"config": {"a": 1}}
    path = write_json(result_path("toy"), result.to_json())
    assert path.parent.name == "ablations" and path.parent.parent.name == "results"
    loaded = load_cached("toy", {"config": {"a": 1}})
    assert loaded is not None and loaded.summary() == result.summary()
    assert loaded.conditions == CONDITIONS and loaded.condition_tasks == PER_CONDITION
    assert loaded.by_condition("better") == result.by_condition("better")
    np.testing.assert_array_equal(loaded.acc["better"], result.acc["better"])
    np.testing.assert_array_equal(loaded.kmeans, result.kmeans)
    assert load_cached("toy", {"config": {"a": 2}}) is None  # other settings: stale, and it says so
    assert "Recomputing toy" in capsys.readouterr().out
    assert load_cached("other", result.meta) is None  # absent
    path.write_text("{torn")
    assert load_cached("toy", result.meta) is None  # corrupt: recompute


def test_a_result_of_other_settings_is_kept_aside_not_overwritten(capsys):
    """Before a recomputed ablation is written, a finished one of other inputs is renamed aside; the same one is
    replaced in place (nothing to keep), and a torn file is not worth keeping."""
    result = make_result()
    result.meta = {"config": {"a": 1}}
    path = write_json(result_path("toy"), result.to_json())
    assert keep_other(path, {"config": {"a": 1}}) is None and path.is_file()
    moved = keep_other(path, {"config": {"a": 2}})
    assert moved == path.with_name("toy.replaced-1.json") and not path.exists()
    assert read_json(moved)["meta"] == {"config": {"a": 1}}
    assert "kept as toy.replaced-1.json" in capsys.readouterr().out
    path.write_text("{torn")
    assert keep_other(path, {"config": {"a": 2}}) is None and path.is_file()


# -------------------------------------------------------------------------------------------------- specs

def test_define_ablations_covers_the_notebook_with_paired_references():
    """Notebook 04's ablations, in order; references are variants; grids and losses come from the config and
    the registry; re-trained variants get their overrides and ablation.meta_iterations."""
    cfg = load_config("default", overrides={"ablation": {"meta_iterations": 50}})
    specs = {a.key: a for a in define_ablations(cfg)}
    assert list(specs) == FILM_ABLATIONS
    for spec in specs.values():
        labels = [v.label for v in spec.variants]
        assert len(set(labels)) == len(labels)
        assert spec.reference is None or spec.reference in labels
    assert specs["steps"].reference is None and specs["steps"].variants[0].num_steps == max(cfg.ablation.step_grid)
    assert [v.adapt_overrides.get("lr_scale") for v in specs["step_size"].variants] == \
        [None, *(float(s) for s in cfg.ablation.lr_grid if s != 1.0)]
    assert [v.label for v in specs["inner_loss"].variants] == [f"{cfg.adapt.inner_loss} (main)",
                                                              *(n for n in losses.INNER_LOSSES if n != "neighbours")]
    meta = specs["meta_learning"]
    no_inner = meta.variant("meta-trained without inner loop")
    train_cfg = training_config(cfg, no_inner)
    assert train_cfg.meta.use_inner_loop is False and train_cfg.meta.iterations == 50
    assert meta.variant("not meta-trained (initialisation)").untrained
    plain = [v for v in meta.variants if v.baseline is not None]
    assert [v.baseline for v in plain] == ["plain_choice"] and not plain[0].retrained  # no hypernetwork at all
    main = meta.variant("main")
    assert not main.retrained and training_config(cfg, main) is cfg  # the protocol's own checkpoint
    assert [v.context for v in specs["conditioning"].variants] == ["task", "noise", "constant"]
    assert [dict(v.fixed) for v in specs["statistics"].variants] == [{}, {"blend": 0.0}, {"blend": 1.0}]
    choice = specs["choice"]  # when not to adapt: test-time arms of the protocol's own checkpoint
    assert choice.reference == "main" and [v.label for v in choice.variants][0] == "main"
    assert [dict(v.adapt_overrides) for v in choice.variants] == [{}, {"choice": "silhouette"},
                                                                   {"candidates": ["generated"]}]
    assert not any(v.retrained for v in choice.variants) and cfg.adapt.choice == "learned"
    assert with_overrides(cfg, {"adapt": dict(choice.variants[2].adapt_overrides)}).adapt.candidates == \
        ("generated",)
    adapted = specs["adapted"]
    assert adapted.reference == "head and FiLM (main)" and cfg.film.adapt == "both"
    assert [dict(v.film_overrides) for v in adapted.variants] == [{}, {"adapt": "head"}, {"adapt": "film"}]
    assert [v.backbone for v in specs["transductive"].variants] == ["zero_shot", "statistics", "transductive",
                                                                    "ungated"]
    assert specs["transductive"].transductive_only
    names = {fingerprint(config_to_dict(training_config(cfg, v))) for s in specs.values() for v in s.variants}
    assert len(names) == 1 + sum(v.retrained for s in specs.values() for v in s.variants)  # one training each


def test_the_full_generator_has_no_film_ablations():
    """The prototype's generator (seed profile) has no normalisation layers to ablate and no plain baseline arm."""
    cfg = load_config("seed")
    specs = {a.key: a for a in define_ablations(cfg)}
    assert list(specs) == ["steps", "step_size", "meta_learning", "conditioning", "inner_loss"]
    assert all(v.baseline is None for v in specs["meta_learning"].variants)
    assert "augmentation" not in [v.label for v in specs["inner_loss"].variants]


def test_a_registered_inner_loss_becomes_an_ablation_variant(monkeypatch):
    """Adding an inner loss to INNER_LOSSES adds its arm to the inner-loss ablation (and the explorer's choices)."""
    monkeypatch.setitem(losses.INNER_LOSSES, "neg_max",
                        InnerLoss(lambda view, cfg: -view.logits.max(-1).values.mean(-1), "negative max logit"))
    spec = next(a for a in define_ablations(load_config("default")) if a.key == "inner_loss")
    variant = spec.variant("neg_max")
    assert variant.adapt_overrides == {"inner_loss": "neg_max"} and not variant.retrained  # a test-time arm
    assert training_config(load_config("default"), variant) == load_config("default")


def test_bad_specs_raise_clear_errors(tiny_mirror):
    """Unknown variants, ablations, settings or overrides, and a suite longer than the evaluation's, are refused."""
    cfg = load_config("default")
    with pytest.raises(KeyError, match="no variant"):
        define_ablations(cfg)[0].variant("nope")
    with pytest.raises(ConfigError, match="unknown ablation"):
        run_all(cfg, ["nope"])
    with pytest.raises(ConfigError, match="ablation.setting"):
        load_config("default", overrides={"ablation": {"setting": "few_shot"}})
    with pytest.raises(ConfigError, match="unknown config key"):
        training_config(cfg, Variant("x", train_overrides={"meta": {"iterationz": 3}}))
    long = load_config("smoke", overrides={"data": {"use_hub": False}, "ablation": {"num_tasks": 20}})
    with pytest.raises(ConfigError, match="exceeds eval.num_tasks"):
        ablation_grid(long)


def test_the_ablation_grid_comes_from_the_config(tiny_mirror):
    """ablation.datasets (default: the held-out datasets) x ablation.shapes; the transductive ablation keeps the
    datasets of transductive.datasets."""
    from tinyprotocol import tiny_config

    cfg = tiny_config()
    assert [c.key for c in ablation_grid(cfg)] == CONDITIONS
    transductive = next(a for a in define_ablations(cfg) if a.key == "transductive")
    assert [c.key for c in ablation_grid(cfg, transductive)] == ["mnist_K3_N18"]
    other = tiny_config(ablation={"datasets": ["mnist+rotate"], "shapes": [[2, 12], [K, N]]})
    assert [c.key for c in ablation_grid(other)] == ["mnist+rotate_K2_N12", "mnist+rotate_K3_N18"]
    assert ablation_grid(other, transductive) == []


def test_describe_states_the_protocol():
    """The paragraph above the tables names the conditions, the setting, the seeds and the re-training."""
    cfg = load_config("default", overrides={"ablation": {"meta_iterations": 50, "num_tasks": 7, "num_seeds": 3}})
    text = describe(cfg, CONDITIONS)
    assert "first 7 tasks" in text and "of 2 held-out conditions" in text and "`mnist+rotate_K3_N18`" in text
    assert "**zero-shot**" in text and "[0, 1, 2]" in text and "50 iterations" in text
    assert "`models/ablations/`" in text
    assert ablation_seeds(cfg) == (0, 1, 2)
    assert ablation_seeds(load_config("default", overrides={"ablation": {"num_seeds": 2}})) == (0, 1)


# ------------------------------------------------------------------------------ the tiny trained protocol

def test_run_all_scores_every_ablation_of_the_tiny_protocol(trained, home):
    """Every ablation has a cached result; every variant has (seeds, pooled tasks, steps+1) accuracies; the pooled
    tasks are the first ablation.num_tasks of each condition's suite, condition by condition."""
    cfg, results = trained.cfg, trained.results
    assert list(results) == [a.key for a in define_ablations(cfg)] == FILM_ABLATIONS
    tasks = cfg.ablation.num_tasks
    for key, result in results.items():
        spec = next(a for a in define_ablations(cfg) if a.key == key)
        conditions = [c.key for c in ablation_grid(cfg, spec)]
        assert result_path(key).is_file() and result.conditions == conditions
        assert result.condition_tasks == [tasks] * len(conditions) and result.seeds == [0]
        assert result.kmeans.shape == (1, tasks * len(conditions))
        for label, acc in result.acc.items():
            variant = spec.variant(label)
            steps = cfg.adapt.steps_at_test if variant.num_steps is None else variant.num_steps
            assert acc.shape == (1, tasks * len(conditions), steps + 1) and np.all((acc >= 0) & (acc <= 1))
            assert list(result.by_condition(label)) == conditions
    assert results["transductive"].conditions == ["mnist_K3_N18"]
    assert results["steps"].acc["main"].shape[2] == max(cfg.ablation.step_grid) + 1
    accuracies = np.concatenate([a.ravel() for r in results.values() for a in r.acc.values()])
    assert accuracies.min() < 1.0  # the noisy labels make the numbers informative
    lines = conclusions(results, cfg.ablation.step_grid)
    assert len(lines) == len(results) and all(line.startswith("**") for line in lines)


def test_retrained_variants_live_apart_from_the_pipelines_checkpoints(trained, home):
    """The variant meta-trained without inner loop is saved as models/ablations/variant_seed0-*.pt; the pipeline's
    own checkpoint stays the only models/hypernet_seed0-*.pt, and it is what `hmlib cluster` takes by default."""
    models = paths.models_dir()
    pipeline = home[("zero_shot", 0)]
    (variant,) = (models / "ablations").glob("variant_seed0-*.pt")
    assert [p.name for p in models.glob("hypernet_seed*-*.pt")] == [pipeline.name]
    assert load_checkpoint(variant)[1]["config"]["meta"]["use_inner_loop"] is False
    checkpoints = trained.results["meta_learning"].meta["checkpoints"]
    assert checkpoints["meta-trained without inner loop"] != checkpoints["main"]
    assert checkpoints["not meta-trained (initialisation)"] == checkpoints["main"]
    os.utime(variant, (pipeline.stat().st_mtime + 60,) * 2)  # the newest checkpoint anywhere
    assert not (paths.results_dir() / "eval_zero_shot.json").exists()
    assert default_checkpoint() == pipeline
    (models / "pipeline.json").unlink()
    assert default_checkpoint() == pipeline


def unadapted_candidates(cfg, bundle) -> np.ndarray:
    """(candidates, pooled tasks) accuracy of every test-time candidate's generated network (no inner step) on the
    ablation tasks of the grid, condition by condition: what no test-time setting can change."""
    pooled = []
    for condition in ablation_grid(cfg):
        suite = build_suite(cfg, condition, cfg.ablation.num_tasks)
        inputs = seed_inputs(bundle, cfg, condition.dataset, "zero_shot", with_train=False)
        results, _ = adapt_candidates(bundle.hypernet, inputs.test.task_inputs(suite.indices), cfg.adapt,
                                      num_steps=0, num_classes=condition.num_classes)
        assert len(results) == len(CANDIDATES)  # the film generator supports every candidate
        pooled.append(np.stack([task_accuracy(r.logits[0], suite.labels) for r in results]))
    return np.concatenate(pooled, axis=1)


def test_variants_are_scored_on_identical_tasks(trained, home):
    """Variants that differ only at test time start, task by task, from the same candidates: before the first inner
    step each scores one of the candidates' generated networks (which one is the label-free choice after its own
    steps); every ablation's k-means reference is the same (the same tasks, seed and backbone) condition by
    condition."""
    results = trained.results
    start = unadapted_candidates(trained.cfg, load_bundle(home[("zero_shot", 0)]))  # (C, T)
    for key in ("step_size", "inner_loss"):
        for label, acc in results[key].acc.items():
            assert np.all(np.any(acc[0, :, 0][None] == start, axis=0)), (key, label)
    assert not np.all(start == start[:1])  # the candidates differ: the check above can fail
    choice = results["choice"].acc  # the arm without a choice starts from the generated candidate itself
    np.testing.assert_array_equal(choice["always the generated adaptation"][0, :, 0], start[0])
    if not load_checkpoint(home[("zero_shot", 0)])[1]["history"]["selector"]["kept"]:
        np.testing.assert_array_equal(choice["silhouette rule"], choice["main"])  # no fitted selector: the rule
    reference = results["step_size"].kmeans
    for key, result in results.items():
        tasks = sum(result.condition_tasks)  # the transductive ablation: the mnist condition only
        np.testing.assert_array_equal(result.kmeans, reference[:, :tasks])
    np.testing.assert_array_equal(results["meta_learning"].acc["main"], results["conditioning"].acc["main"])


def test_variant_curves_are_computed_once_per_setting_whatever_the_label(trained, home, monkeypatch):
    """The main configuration recurs in most ablations under other labels: its curves are computed once per memo
    (and handed out as copies); a variant that changes anything the curves depend on is computed anew."""
    cfg = trained.cfg
    condition = ablation_grid(cfg)[0]
    calls = []
    real = ablation_run.predict_task
    monkeypatch.setattr(ablation_run, "predict_task", lambda *a, **k: calls.append(1) or real(*a, **k))
    memo: dict = {}
    main = variant_curves(cfg, Variant("main"), condition, 0, memo)
    assert len(calls) == 1
    again = variant_curves(cfg, Variant("step sizes x 1 (main)", adapt_overrides={"lr_scale": 1.0}), condition, 0,
                           memo)
    assert len(calls) == 1 and np.array_equal(again, main)
    again[:] = -1  # a copy: the memo's curves are not changed
    np.testing.assert_array_equal(variant_curves(cfg, Variant("main (again)"), condition, 0, memo), main)
    for other in (Variant("x", adapt_overrides={"lr_scale": 2.0}), Variant("x", num_steps=1),
                  Variant("x", fixed={"blend": 0.0}), Variant("x", context="constant"), Variant("x", untrained=True)):
        variant_curves(cfg, other, condition, 0, memo)
    assert len(calls) == 6
    # the silhouette rule asked for: the same curves as the main configuration where no selector was kept
    hypernet = load_bundle(home[("zero_shot", 0)]).hypernet
    silhouette = Variant("silhouette rule", adapt_overrides={"choice": "silhouette"})
    rule = variant_curves(cfg, silhouette, condition, 0, memo)
    assert len(calls) == (6 if choice_rule(hypernet, cfg.adapt) == "silhouette" else 7)
    np.testing.assert_array_equal(rule, variant_curves(cfg, silhouette, condition, 0, {}))
    np.testing.assert_array_equal(main, variant_curves(cfg, Variant("main"), condition, 0, {}))  # as computed afresh


def test_variant_curves_match_a_direct_run(trained, home):
    """A variant's curve on a condition is the accuracy of predict_task (the candidate the label-free choice keeps,
    task by task) on the first ablation.num_tasks tasks of that condition's evaluation suite, however the tasks are
    batched; with steps too small to move anything the choice is made on the unadapted candidates."""
    cfg = trained.cfg
    bundle = load_bundle(home[("zero_shot", 0)])
    pooled = []
    for condition in ablation_grid(cfg):
        curves = variant_curves(cfg, Variant("main"), condition, 0, {})
        assert curves.shape == (cfg.ablation.num_tasks, cfg.adapt.steps_at_test + 1)
        suite = build_suite(cfg, condition, cfg.ablation.num_tasks)
        inputs = seed_inputs(bundle, cfg, condition.dataset, "zero_shot", with_train=False)
        for t in range(len(suite)):
            logits = predict_task(bundle.hypernet, inputs.test.task_inputs(suite.indices[t:t + 1]), cfg.adapt)
            np.testing.assert_array_equal(curves[t], [task_accuracy(step, suite.labels[t:t + 1])[0]
                                                      for step in logits])
        still = variant_curves(cfg, Variant("x", adapt_overrides={"lr_scale": 1e-9}), condition, 0, {})
        np.testing.assert_array_equal(still, np.repeat(still[:, :1], still.shape[1], axis=1))  # nothing moves
        logits = predict_task(bundle.hypernet, inputs.test.task_inputs(suite.indices), cfg.adapt, 0)
        np.testing.assert_array_equal(still[:, 0], task_accuracy(logits[0], suite.labels))  # chosen unadapted
        pooled.append(curves)
    main = trained.results["step_size"].acc["step sizes x 1 (main)"]
    np.testing.assert_array_equal(main[0], np.concatenate(pooled))
    # the step curve runs on past the test-time steps on the candidate the method keeps: up to them, it is the method
    np.testing.assert_array_equal(trained.results["steps"].acc["main"][..., :main.shape[2]], main)


def test_a_test_time_generator_override_leaves_the_protocols_hypernetwork_alone(trained, home):
    """'head only' / 'film only' adapt with a changed copy of the generator; the hypernetwork every other variant
    uses (same inputs, same memo) keeps its own setting, weights shared by value only."""
    cfg = trained.cfg
    bundle = load_bundle(home[("zero_shot", 0)])
    inputs = seed_inputs(bundle, cfg, "mnist", "zero_shot", with_train=False)
    memo: dict = {}
    main = variant_hypernet(Variant("main"), inputs, 0, memo)
    before = main.generator.film
    changed = variant_hypernet(Variant("film only", film_overrides={"adapt": "film"}), inputs, 0, memo)
    assert changed.generator.film.adapt == "film" and changed is not main
    assert main.generator.film == before and main.generator.film.adapt == cfg.film.adapt
    assert variant_hypernet(Variant("again"), inputs, 0, memo).generator.film.adapt == cfg.film.adapt
    state, other = main.state_dict(), changed.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)


def test_the_plain_baseline_arm_is_the_registered_method_on_the_same_tasks(trained, home):
    """'no hypernetwork: plain adaptation' scores METHODS['plain_choice'] on each condition's ablation tasks with
    the evaluation's seed, and repeats that one accuracy over the steps."""
    cfg, result = trained.cfg, trained.results["meta_learning"]
    label = next(v["label"] for v in result.variants if v["baseline"] == "plain_choice")
    acc = result.acc[label][0]
    assert acc.shape[1] == cfg.adapt.steps_at_test + 1 and np.all(acc == acc[:, :1])
    bundle = load_bundle(home[("zero_shot", 0)])
    expected = []
    for condition in ablation_grid(cfg):
        inputs = seed_inputs(bundle, cfg, condition.dataset, "zero_shot", with_train=False)
        ctx = MethodContext(cfg, inputs, build_suite(cfg, condition, cfg.ablation.num_tasks),
                            suite_seed(cfg.eval.seed, condition))
        expected.append(score(METHODS["plain_choice"], ctx)[0])
    np.testing.assert_array_equal(acc[:, 0], np.concatenate(expected))


def test_conditioning_replacements_and_the_untrained_hypernetwork(trained, home):
    """The pixel-noise context is the VAE distribution of seeded noise images; the constant code is the
    conditioning's mean row; the untrained arm is the architecture re-initialised from the seed (with no fitted
    test-time selector). The finished checkpoint's "model" is its best validation weights with the selector
    fitted on them ("best_model")."""
    cfg = trained.cfg
    bundle = load_bundle(home[("zero_shot", 0)])
    inputs = seed_inputs(bundle, cfg, "mnist", "zero_shot", with_train=False)
    indices = build_suite(cfg, ablation_grid(cfg)[0], 2).indices
    assert _context(Variant("main"), inputs, bundle.vae, indices, 0) is None
    noise = _context(Variant("n", context="noise"), inputs, bundle.vae, indices, 0)
    assert noise.shape == (2, N, 2 * cfg.vae.latent_dim)
    torch.testing.assert_close(noise, _context(Variant("n", context="noise"), inputs, bundle.vae, indices, 0))
    assert not torch.allclose(noise, torch.as_tensor(inputs.test.context[indices]))
    constant = _context(Variant("c", context="constant"), inputs, bundle.vae, indices, 0)
    torch.testing.assert_close(constant, bundle.hypernet.context_mean.expand(2, N, -1))
    fresh, again = initial_hypernet(inputs, 0), initial_hypernet(inputs, 0)
    fresh_state = fresh.state_dict()
    assert all(torch.equal(fresh_state[k], again.state_dict()[k]) for k in fresh_state)
    state, meta = load_checkpoint(home[("zero_shot", 0)])
    kept = state["best_model"]
    assert meta["complete"] and state["model"].keys() == kept.keys() == fresh_state.keys()
    assert all(torch.equal(state["model"][k], kept[k]) for k in kept)  # saved after loading the kept weights
    same = all(torch.equal(fresh_state[k], kept[k]) for k in fresh_state if k.startswith("encoder"))
    assert same == (meta["best"]["iteration"] == 0)  # kept weights validated before any outer step: the start
    assert not fresh.selector.trained and not bool(fresh_state["selector.fitted"])
    assert bool(kept["selector.fitted"]) == bool(meta["history"]["selector"]["kept"])  # fitted, kept if it won
    assert bundle.hypernet.selector.trained == bool(kept["selector.fitted"])
    torch.testing.assert_close(fresh.context_mean, bundle.hypernet.context_mean)


def test_a_cached_result_is_reused_then_recomputed_when_a_checkpoint_changes(trained, home, capsys):
    """The cache is keyed by every checkpoint's hash, the conditions and the settings."""
    cfg = trained.cfg
    spec = next(a for a in define_ablations(cfg) if a.key == "step_size")
    capsys.readouterr()
    reused = run_ablation(cfg, spec, progress=False)
    assert "Loaded step_size" in capsys.readouterr().out
    for label, acc in trained.results["step_size"].acc.items():
        np.testing.assert_array_equal(reused.acc[label], acc)

    checkpoint = home[("zero_shot", 0)]
    state, meta = load_checkpoint(checkpoint)
    state["best_model"] = {k: v * 0.5 if v.dtype.is_floating_point else v for k, v in state["best_model"].items()}
    save_checkpoint(checkpoint, state, meta)  # the same settings, other weights
    recomputed = run_ablation(cfg, spec, progress=False)
    assert "Recomputing step_size" in capsys.readouterr().out
    assert recomputed.meta["checkpoints"] != trained.results["step_size"].meta["checkpoints"]
    kept = read_json(result_path("step_size").with_name("step_size.replaced-1.json"))  # the finished one survives
    assert kept["meta"]["checkpoints"] == trained.results["step_size"].meta["checkpoints"]
    run_ablation(cfg, spec, progress=False)
    assert "Loaded step_size" in capsys.readouterr().out

    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, kmeans_n_init=2))
    run_ablation(other, spec, progress=False)
    assert "Recomputing step_size" in capsys.readouterr().out
    fewer = dataclasses.replace(cfg, ablation=dataclasses.replace(cfg.ablation, datasets=("mnist",)))
    assert run_ablation(fewer, spec, progress=False).conditions == ["mnist_K3_N18"]
    assert "Recomputing step_size" in capsys.readouterr().out
