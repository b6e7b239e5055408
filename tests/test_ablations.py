"""Ablations: the specs, summaries and generated conclusions, the JSON cache, and every variant of a tiny trained
protocol scored on identical tasks."""
from __future__ import annotations

import dataclasses
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from datafactory import balanced_labels, class_patterns, to_pil, write_parquet_split
from hmlib.ablations import (AblationResult, Variant, ablation_seeds, ablation_suite, conclusions, define_ablations,
                             describe, headline_rows, run_ablation, run_all, step_table, step_table_rows, table_rows)
from hmlib.ablations import run as ablation_run
from hmlib.ablations.run import load_cached, result_path, training_config, variant_curves
from hmlib.artifacts import fingerprint, load_checkpoint, save_checkpoint, write_json
from hmlib.config import ConfigError, config_to_dict, load_config
from hmlib.evaluation.suite import suite_fingerprint
from hmlib.hyper import losses
from hmlib.hyper.adapt import predict_task
from hmlib.hyper.inputs import load_task_data
from hmlib.hyper.losses import task_accuracy
from hmlib.hyper.metatrain import meta_train
from hmlib.plots.ablations import plot_comparison, plot_step_curve
from hmlib.reports import record_headline
from tinyprotocol import K, train_home, use_home

TASKS, STEPS, SEEDS = 40, 4, 2
LABEL_NOISE = 0.3  # share of the held-out test images whose label is another class's (accuracies below 100%)


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
                          kmeans=fake_curves(9, 0.05)[:, :, 0], dataset="mnist", setting="zero_shot", task_size=18,
                          seeds=list(range(SEEDS)), meta={"config": {"task": {"num_classes": K}}})


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
    """The tiny protocol (zero-shot, seed 0) on a mirror with a noisy held-out test split, and every ablation run."""
    mirror = tmp_path_factory.mktemp("noisy") / "mirror"
    write_noisy_mirror(mirror, _tiny_mirror_root)
    trained = train_home(tmp_path_factory.mktemp("trained"), mirror, [("zero_shot", 0)])
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
    np.testing.assert_array_equal(loaded.acc["better"], result.acc["better"])
    np.testing.assert_array_equal(loaded.kmeans, result.kmeans)
    assert load_cached("toy", {"config": {"a": 2}}) is None  # other settings: stale, and it says so
    assert "Recomputing toy" in capsys.readouterr().out
    assert load_cached("other", result.meta) is None  # absent
    path.write_text("{torn")
    assert load_cached("toy", result.meta) is None  # corrupt: recompute


# -------------------------------------------------------------------------------------------------- specs

def test_define_ablations_covers_the_notebook_with_paired_references():
    """Notebook 04's ablations, in order; references are variants; grids and losses come from the config and
    the registry; re-trained variants get their overrides and ablation.meta_iterations."""
    cfg = load_config("default", overrides={"ablation": {"meta_iterations": 50}})
    specs = {a.key: a for a in define_ablations(cfg)}
    assert list(specs) == ["steps", "inner_lr", "meta_learning", "conditioning", "representation", "inner_loss"]
    for spec in specs.values():
        labels = [v.label for v in spec.variants]
        assert len(set(labels)) == len(labels)
        assert spec.reference is None or spec.reference in labels
    assert specs["steps"].reference is None and specs["steps"].variants[0].num_steps == max(cfg.ablation.step_grid)
    assert {v.adapt_overrides.get("inner_lr") for v in specs["inner_lr"].variants[1:]} == \
        set(cfg.ablation.lr_grid) - {cfg.adapt.inner_lr}
    assert [v.label for v in specs["inner_loss"].variants] == [f"{cfg.adapt.inner_loss} (main)",
                                                              *(n for n in losses.INNER_LOSSES if n != "infomax")]
    assert {v.context for v in specs["conditioning"].variants} == {"task", "noise"}
    no_inner = specs["meta_learning"].variant("meta-trained without inner loop")
    train_cfg = training_config(cfg, no_inner)
    assert train_cfg.meta.use_inner_loop is False and train_cfg.meta.iterations == 50
    assert specs["meta_learning"].variant("not meta-trained (initialisation)").untrained
    main = specs["meta_learning"].variant("main")
    assert not main.retrained and training_config(cfg, main) is cfg  # the protocol's own checkpoint
    latent = specs["representation"].variant("VAE latents only (no backbone)")
    assert training_config(cfg, latent).hyper.target_input == "latent"
    names = {fingerprint(config_to_dict(training_config(cfg, v))) for s in specs.values() for v in s.variants}
    assert len(names) == 1 + sum(v.retrained for s in specs.values() for v in s.variants)  # one training each


def test_a_registered_inner_loss_becomes_an_ablation_variant(monkeypatch):
    """Adding an inner loss to INNER_LOSSES adds its arm to the inner-loss ablation (and the explorer's choices)."""
    monkeypatch.setitem(losses.INNER_LOSSES, "neg_max", lambda logits, reference, cfg: -logits.max(-1).values.mean(-1))
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
    long = load_config("smoke", overrides={"data": {"use_hub": False}, "task": {"num_classes": K},
                                           "ablation": {"num_tasks": 20}})
    with pytest.raises(ConfigError, match="exceeds eval.num_tasks"):
        ablation_suite(long, "mnist")


def test_describe_states_the_protocol():
    """The paragraph above the tables names the suite, the setting, the seeds and the re-training."""
    cfg = load_config("default", overrides={"ablation": {"meta_iterations": 50, "num_tasks": 7, "num_seeds": 3}})
    text = describe(cfg)
    assert "first 7 tasks" in text and "**mnist**" in text and "50 iterations" in text
    assert "**zero-shot**" in text and "[0, 1, 2]" in text
    assert ablation_seeds(cfg) == (0, 1, 2)
    assert ablation_seeds(load_config("default", overrides={"ablation": {"num_seeds": 2}})) == (0, 1)


# ------------------------------------------------------------------------------ the tiny trained protocol

def test_run_all_scores_every_ablation_of_the_tiny_protocol(trained, home):
    """Every ablation has a cached result; every variant has (seeds, tasks, steps+1) accuracies on the suite."""
    cfg, results = trained.cfg, trained.results
    assert list(results) == [a.key for a in define_ablations(cfg)]
    suite = ablation_suite(cfg, "mnist")
    tasks = cfg.ablation.num_tasks
    for key, result in results.items():
        assert result_path(key).is_file() and result.meta["suite"] == suite_fingerprint(suite)
        assert result.kmeans.shape == (1, tasks) and result.seeds == [0]
        for label, acc in result.acc.items():
            variant = next(a for a in define_ablations(cfg) if a.key == key).variant(label)
            steps = cfg.adapt.num_inner_steps if variant.num_steps is None else variant.num_steps
            assert acc.shape == (1, tasks, steps + 1) and np.all((acc >= 0) & (acc <= 1))
    assert results["steps"].acc["main"].shape[2] == max(cfg.ablation.step_grid) + 1
    accuracies = np.concatenate([a.ravel() for r in results.values() for a in r.acc.values()])
    assert accuracies.min() < 1.0  # the noisy labels make the numbers informative
    lines = conclusions(results, cfg.ablation.step_grid)
    assert len(lines) == len(results) and all(line.startswith("**") for line in lines)


def test_every_variant_is_scored_on_identical_tasks(trained, home, monkeypatch):
    """Every variant and the k-means reference see the same suite; variants that differ only at test time share
    the checkpoint and agree before the first inner step."""
    cfg, seen = trained.cfg, []

    def spy(function):
        def record(*args, **kwargs):
            suite = next(a for a in args if hasattr(a, "indices"))
            seen.append((function.__name__, suite_fingerprint(suite)))
            return function(*args, **kwargs)
        return record

    monkeypatch.setattr(ablation_run, "variant_curves", spy(variant_curves))
    monkeypatch.setattr(ablation_run, "kmeans_reference", spy(ablation_run.kmeans_reference))
    specs = {a.key: a for a in define_ablations(cfg)}
    for key in ("inner_lr", "conditioning", "meta_learning"):
        run_ablation(cfg, specs[key], recompute=True, progress=False)
    expected = suite_fingerprint(ablation_suite(cfg, "mnist"))
    assert [name for name, _ in seen].count("variant_curves") == 3 * 3  # three variants in each of three ablations
    assert [name for name, _ in seen].count("kmeans_reference") == 3
    assert {fp for _, fp in seen} == {expected}
    lr = trained.results["inner_lr"]
    for label in lr.acc:
        np.testing.assert_array_equal(lr.acc[label][:, :, 0], lr.acc[lr.reference][:, :, 0])
    conditioning = trained.results["conditioning"]
    checkpoints = conditioning.meta["checkpoints"]
    assert checkpoints["pixel-noise context"] == checkpoints["main"]
    assert checkpoints["conditioned on the backbone embedding"] != checkpoints["main"]
    assert trained.results["meta_learning"].meta["checkpoints"]["not meta-trained (initialisation)"] == [None]
    for result in trained.results.values():
        np.testing.assert_array_equal(result.kmeans, trained.results["inner_lr"].kmeans)


def test_variant_curves_match_a_direct_run(trained, home, monkeypatch):
    """A variant's curve is the accuracy of predict_task on each suite task, however the tasks are batched."""
    cfg = trained.cfg
    suite = ablation_suite(cfg, "mnist")
    curves = variant_curves(cfg, Variant("main"), "mnist", "zero_shot", 0, suite, {})
    assert curves.shape == (cfg.ablation.num_tasks, cfg.adapt.num_inner_steps + 1)
    hypernet = meta_train(cfg, "zero_shot", 0, train=False, progress=False).hypernet
    task_data = load_task_data(cfg, "mnist", "test", "zero_shot", 0, train=False, progress=False)
    for t in range(len(suite)):
        logits = predict_task(hypernet, task_data.task_inputs(suite.indices[t:t + 1]), cfg.adapt)
        np.testing.assert_array_equal(curves[t], [task_accuracy(step, suite.labels[t:t + 1])[0] for step in logits])
    monkeypatch.setattr(ablation_run, "BATCH_TASKS", 2)
    np.testing.assert_array_equal(variant_curves(cfg, Variant("main"), "mnist", "zero_shot", 0, suite, {}), curves)
    np.testing.assert_array_equal(trained.results["inner_lr"].acc[f"lr={cfg.adapt.inner_lr:g} (main)"][0], curves)
    slow = variant_curves(cfg, Variant("x", adapt_overrides={"inner_lr": 1e-9}), "mnist", "zero_shot", 0, suite, {})
    np.testing.assert_array_equal(slow, np.repeat(curves[:, :1], curves.shape[1], axis=1))  # lr ~0: nothing moves


def test_a_cached_result_is_reused_then_recomputed_when_a_checkpoint_changes(trained, home, capsys):
    """The cache is keyed by every checkpoint's hash, the tasks and the settings."""
    cfg = trained.cfg
    spec = next(a for a in define_ablations(cfg) if a.key == "inner_lr")
    capsys.readouterr()
    reused = run_ablation(cfg, spec, progress=False)
    assert "Loaded inner_lr" in capsys.readouterr().out
    for label, acc in trained.results["inner_lr"].acc.items():
        np.testing.assert_array_equal(reused.acc[label], acc)

    checkpoint = home[("zero_shot", 0)]
    state, meta = load_checkpoint(checkpoint)
    state["best_model"] = {k: v * 0.5 if v.dtype.is_floating_point else v for k, v in state["best_model"].items()}
    save_checkpoint(checkpoint, state, meta)  # the same settings, other weights
    recomputed = run_ablation(cfg, spec, progress=False)
    assert "Recomputing inner_lr" in capsys.readouterr().out
    assert recomputed.meta["checkpoints"] != trained.results["inner_lr"].meta["checkpoints"]
    run_ablation(cfg, spec, progress=False)
    assert "Loaded inner_lr" in capsys.readouterr().out

    other = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, kmeans_n_init=2))
    run_ablation(other, spec, progress=False)
    assert "Recomputing inner_lr" in capsys.readouterr().out
