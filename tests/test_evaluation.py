"""The evaluation stage: the method registry and the one scoring function, tables over the grid (a known win, tie
and loss), scoring tiny trained checkpoints on every condition (clean and shifted, K = 2 to K = 10), the resumable
per-condition cache, and ``hmlib eval`` end to end (results keyed by what made them, fresh homes included)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.cluster import AgglomerativeClustering

import hmlib.backbone.transductive as transductive
from datafactory import write_tiny_dataset
from hmlib import cli
from hmlib.artifacts import (ArtifactError, MissingArtifactError, StaleArtifactError, load_checkpoint, save_checkpoint,
                             write_json)
from hmlib.config import config_to_dict, load_config, with_overrides, with_profile_test_time
from hmlib.data import sample_tasks
from hmlib.errors import HmlibError
from hmlib.evaluation import cli as eval_cli
from hmlib.evaluation import evaluate as evaluate_module
from hmlib.evaluation import methods
from hmlib.evaluation.cli import config_for_checkpoint
from hmlib.evaluation.conditions import Condition, build_suite, grid, suite_fingerprint
from hmlib.evaluation.evaluate import (RESULT_SCHEMA, EvalError, condition_path, default_results_path,
                                       evaluate_setting, load_bundles, load_results, per_task_accuracy,
                                       score_hypernet)
from hmlib.evaluation.inputs import seed_inputs
from hmlib.evaluation.methods import (METHODS, Method, MethodContext, baselines, clusters_on, logreg_predict, register,
                                      score)
from hmlib.evaluation.quality import kmeans_quality, quality_table
from hmlib.evaluation.tables import (condition_rows, grid_summary, headline_rows, heatmap_data, markdown_table,
                                     strongest_baseline, summary_markdown)
from hmlib.hyper.bundle import load_bundle
from hmlib.metrics import clustering_accuracy
from hmlib.plots import evaluation as plots
from hmlib.paths import models_dir
from hmlib.reports import record_headline
from hmlib.stats import mean_ci
from hmlib.vae.train import get_vae
from tinyprotocol import K, N, OVERRIDES, STEPS, TASKS, TEST_STEPS, tiny_config, train_home, use_home

DIM, NUM_ALL_CLASSES, PER_CLASS, BLOB_TASKS, BLOB_N = 4, 5, 40, 4, 30
STORED = ("embedding", "latent", "pixels")  # representations a baseline can read without a backbone
UNSUPERVISED_STORED = [m.name for m in baselines(unsupervised_only=True) if m.reads in STORED]
TEN = "digits10"  # a 10-class dataset in a local folder (the tiny mirror's have 6 classes)


@pytest.fixture(scope="module")
def trained(_tiny_mirror_root, tmp_path_factory):
    """Checkpoints of seeds 0 and 1 (seed 0's backbone also adapted to mnist, the transductive setting) and a
    10-class dataset folder, made once; seed 0 evaluated on the default grid (mnist and mnist+rotate) into
    results/eval_zero_shot.json."""
    trained = train_home(tmp_path_factory.mktemp("trained"), _tiny_mirror_root,
                         [("zero_shot", 0), ("zero_shot", 1), ("transductive", 0)])
    trained.ten = write_tiny_dataset(tmp_path_factory.mktemp("ten"), TEN, num_classes=10,
                                     splits={"train": 200, "test": 100}, seed=7)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HMLIB_HOME", str(trained.home))
        patch.setenv("HMLIB_DATA_DIR", str(_tiny_mirror_root))
        evaluate_setting(trained.cfg, [trained.home / "models" / trained.checkpoints[("zero_shot", 0)]],
                         progress=False)
    return trained


@pytest.fixture
def ckpt(trained, hmlib_home, tiny_mirror):
    """This test's copy of the trained home (as HMLIB_HOME): (setting, seed) -> checkpoint path."""
    return use_home(trained, hmlib_home)


def evaluate(trained, checkpoints, path=None, cfg=None, **kw):
    """evaluate_setting on the tiny config's grid (path None: results/eval_<setting>.json)."""
    return evaluate_setting(cfg or trained.cfg, checkpoints, path=path, progress=False, **kw)


def blocks_by_key(result) -> dict:
    return {b["condition"]["key"]: b for b in result["conditions"]}


def refused(args, capsys) -> str:
    """The message of a refused ``hmlib eval``: raised as an HmlibError, or printed with a non-zero exit code."""
    try:
        code = cli.main(["eval", *map(str, args)])
    except HmlibError as err:
        return str(err)
    assert code not in (0, None)
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------ constructed inputs

def blob_split(seed: int, separation: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """Rows (n, DIM) of NUM_ALL_CLASSES tight Gaussian blobs, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_ALL_CLASSES), PER_CLASS)
    centres = np.random.default_rng(99).normal(size=(NUM_ALL_CLASSES, DIM)) * separation
    return centres[labels] + rng.normal(size=(len(labels), DIM)), labels


def noise_split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows that carry no class information."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(NUM_ALL_CLASSES * PER_CLASS, DIM)), np.repeat(np.arange(NUM_ALL_CLASSES), PER_CLASS)


def rows_context(rows: np.ndarray, labels: np.ndarray, seed: int = 0, **inputs) -> MethodContext:
    """A context whose every stored representation is ``rows``, over BLOB_TASKS random K-class tasks."""
    suite = sample_tasks(labels, BLOB_TASKS, K, BLOB_N, mode="random", seed=0)
    return MethodContext(tiny_config(eval={"kmeans_n_init": 2}),
                         SimpleNamespace(reps={r: rows for r in STORED}, **inputs), suite, seed)


def block(dataset: str, hyper: np.ndarray, accs: dict[str, np.ndarray], num_classes: int = K) -> dict:
    """One condition's block as evaluate_condition writes it: hypernet (R, T, S+1), baselines (R, T)."""
    base, shift = (dataset.split("+") + ["clean"])[:2]
    condition = Condition(dataset, num_classes, hyper.shape[1] * 4, hyper.shape[1] * 4)
    return {"condition": {**condition.__dict__, "key": condition.key, "label": condition.label, "shift": shift},
            "suite": {"num_tasks": hyper.shape[1]},
            "methods": {"hypernet": {"acc_steps": hyper.tolist(), "seconds": [0.01] * hyper.shape[0]},
                        **{name: {"acc": acc.tolist(), "seconds": [0.002] * acc.shape[0]}
                           for name, acc in accs.items()}}}


def constructed_result(blocks: list[dict]) -> dict:
    result = {"schema": RESULT_SCHEMA, "setting": "zero_shot", "setting_label": "zero-shot", "seeds": [0],
              "num_steps": STEPS, "num_tasks": 8, "conditions": blocks}
    result["summary"] = grid_summary(result)
    return result


TASK_COUNT = 8
BASE = np.random.default_rng(0).uniform(0.5, 0.8, TASK_COUNT)  # each task's difficulty, shared by every method
WOBBLE = np.where(np.arange(TASK_COUNT) % 2, 0.05, -0.05)  # mean 0, a wide interval


def win_tie_loss() -> dict:
    """Three conditions where the adapted hypernetwork beats the strongest label-free baseline (GMM on the VAE
    means) by 10 points on every task, ties with it (+-5 points, mean 0) and loses by 10 points; the supervised
    ceiling is higher still and never the reference."""
    def accs(noise: int) -> dict[str, np.ndarray]:
        jitter = np.random.default_rng(noise).normal(0, 0.005, TASK_COUNT)
        return {"kmeans_embedding": (BASE - 0.05)[None], "plain_choice": (BASE - 0.02 + jitter)[None],
                "gmm_latent": BASE[None], "kmeans_pixels": (BASE - 0.3)[None],
                "logreg_embedding": np.ones((1, TASK_COUNT))}

    def hyper(adapted: np.ndarray) -> np.ndarray:
        return np.stack([BASE - 0.04, BASE - 0.01, adapted], axis=1)[None]  # 0, 1, 2 inner steps

    jitter = np.random.default_rng(1).normal(0, 0.01, TASK_COUNT)
    jitter -= jitter.mean()  # exact means: +10 and -10 points
    return constructed_result([block("mnist", hyper(BASE + 0.1 + jitter), accs(2)),
                               block("mnist+rotate", hyper(BASE + WOBBLE), accs(3)),
                               block("mnist+fog", hyper(BASE - 0.1 + jitter), accs(4))])


# ------------------------------------------------------------------------------------- the baselines

@pytest.mark.parametrize("name", UNSUPERVISED_STORED)
def test_clusterers_recover_blobs_and_fail_on_noise(name):
    """Every registered label-free baseline on a stored representation recovers well-separated blobs (through the
    one scoring function) and sits near chance on rows without class information."""
    rows, labels = blob_split(0)
    acc, seconds = score(METHODS[name], rows_context(rows, labels))
    assert acc.shape == (BLOB_TASKS,) and seconds > 0 and np.all(acc == 1.0)
    noise, noise_labels = noise_split(1)
    assert score(METHODS[name], rows_context(noise, noise_labels))[0].mean() < 0.7  # chance is about 0.45


def test_clusterers_are_seeded():
    """The same base seed gives the same clusters (task t uses seed + t)."""
    rows, labels = noise_split(2)
    for name in UNSUPERVISED_STORED:
        first = score(METHODS[name], rows_context(rows, labels, seed=5))[0]
        np.testing.assert_array_equal(first, score(METHODS[name], rows_context(rows, labels, seed=5))[0])


def test_supervised_ceiling_reads_the_train_labels_of_the_task_classes():
    """The ceiling fits on labelled train rows of the task's classes: right labels give 100%, shifted ones fail."""
    test_x, test_y = blob_split(4)
    train_x, train_y = blob_split(3)

    def ctx(train_labels):
        return rows_context(test_x, test_y, train_reps={"embedding": train_x}, train_labels=train_labels)

    acc, _ = score(METHODS["logreg_embedding"], ctx(train_y))
    assert acc.shape == (BLOB_TASKS,) and np.all(acc == 1.0)
    assert score(METHODS["logreg_embedding"], ctx((train_y + 1) % NUM_ALL_CLASSES))[0].mean() < 0.5
    missing = train_y.copy()
    missing[missing == ctx(train_y).suite.classes[0, 0]] = NUM_ALL_CLASSES + 1
    with pytest.raises(ValueError, match="no images in the train split"):
        score(METHODS["logreg_embedding"], ctx(missing))
    np.testing.assert_array_equal(logreg_predict(train_x, train_y, test_x), test_y)


def test_registry_marks_what_each_method_is():
    """The hypernetwork's rows are not baselines; the one supervised row is the ceiling; the plain adaptations are
    marked as adapting; every baseline says what it reads and has a score function."""
    names = [m.name for m in baselines()]
    assert "hypernet" not in names and "hypernet_adapted" not in names
    assert [n for n in names if METHODS[n].supervised] == ["logreg_embedding"]
    assert [m.name for m in baselines(unsupervised_only=True)] == [n for n in names if n != "logreg_embedding"]
    assert {n for n in names if METHODS[n].adapts} == {"adabn_kmeans", "plain_task", "plain_running", "plain_choice"}
    assert names[0] == "kmeans_embedding" and all(METHODS[n].reads and METHODS[n].score for n in names)
    assert METHODS["kmeans_embedding"].every_seed  # the reference row reads every replicate's backbone


def test_register_replaces_a_method_of_the_same_name(monkeypatch):
    """Registering an existing name replaces that method in place (its table position is kept)."""
    order = list(METHODS)
    monkeypatch.setitem(METHODS, "kmeans_pixels", METHODS["kmeans_pixels"])  # restored after the test
    register(dataclasses.replace(METHODS["kmeans_pixels"], label="k-means on pixels, renamed"))
    assert list(METHODS) == order and METHODS["kmeans_pixels"].label == "k-means on pixels, renamed"


def test_kmeans_quality_of_a_representation():
    """Notebook 02's quality check scores with the evaluation's own k-means row: a row per representation."""
    cfg = tiny_config(task={"num_images": BLOB_N})
    rows, labels = blob_split(0)
    acc = kmeans_quality(cfg, rows, labels, num_tasks=3, seed=0)
    assert acc.shape == (3,) and np.all(acc == 1.0)
    noise, noise_labels = noise_split(1)
    table = quality_table(cfg, {("embedding", "mnist"): (rows, labels), ("VAE means", "fashion_mnist"):
                                (noise, noise_labels)}, num_tasks=3)
    assert [(r["representation"], r["role"]) for r in table] == [("embedding", "held out"),
                                                                ("VAE means", "meta-train")]
    assert table[0]["accuracy %"] == 100.0 and table[1]["accuracy %"] < 70.0 and table[0]["images/task"] == BLOB_N


# ------------------------------------------------------------------------------------------- tables

def test_condition_rows_average_seeds_per_task_and_pair_with_the_strongest_baseline():
    """Rows average each task over seeds, give intervals over tasks and pair every difference per task."""
    rng = np.random.default_rng(0)
    hyper = rng.uniform(0.4, 0.9, (2, 6, STEPS + 1))
    accs = {"kmeans_embedding": rng.uniform(0.4, 0.9, (2, 6)), "kmeans_pixels": rng.uniform(0.3, 0.5, (1, 6)),
            "logreg_embedding": np.ones((2, 6))}
    rows = {r["method"]: r for r in condition_rows(block("mnist", hyper, accs))}
    assert list(rows) == ["hypernet_adapted", "hypernet", "kmeans_embedding", "kmeans_pixels", "logreg_embedding"]
    adapted, after, before = rows["hypernet_adapted"], hyper[:, :, -1].mean(0), hyper[:, :, 0].mean(0)
    assert adapted["accuracy"] == pytest.approx(after.mean()) and adapted["ci"] == pytest.approx(mean_ci(after)[1])
    assert adapted["num_seeds"] == 2 and adapted["seed_std"] == pytest.approx(np.std(hyper[:, :, -1].mean(1), ddof=1))
    assert adapted["gain"]["mean"] == pytest.approx((after - before).mean())
    assert adapted["gain"]["ci"] == pytest.approx(mean_ci(after - before)[1])
    assert adapted["num_steps"] == STEPS and adapted["label"] == f"hypernetwork + {STEPS} inner steps"
    assert adapted["strongest"] == "kmeans_embedding"  # the ceiling is higher but supervised
    kmeans = accs["kmeans_embedding"].mean(0)
    assert adapted["vs_strongest"]["mean"] == pytest.approx((after - kmeans).mean())
    assert rows["kmeans_pixels"]["vs_strongest"]["mean"] == pytest.approx((accs["kmeans_pixels"][0] - kmeans).mean())
    assert rows["hypernet"]["accuracy"] == pytest.approx(before.mean()) and "gain" not in rows["hypernet"]
    assert rows["kmeans_pixels"]["num_seeds"] == 1 and rows["kmeans_pixels"]["seed_std"] is None
    assert rows["logreg_embedding"]["supervised"] and rows["kmeans_embedding"]["ms_per_task"] == pytest.approx(2.0)
    assert rows["hypernet"]["ms_per_task"] is None and rows["hypernet_adapted"]["ms_per_task"] == pytest.approx(10.0)
    assert rows["kmeans_pixels"]["dataset"] == "mnist" and rows["kmeans_pixels"]["shift"] == "clean"


def test_the_strongest_baseline_is_label_free_even_when_the_ceiling_is_higher():
    result = win_tie_loss()
    assert [strongest_baseline(b) for b in result["conditions"]] == ["gmm_latent"] * 3
    only_ceiling_high = block("mnist", np.full((1, 4, 2), 0.5), {"kmeans_pixels": np.full((1, 4), 0.4),
                                                                 "logreg_embedding": np.ones((1, 4))})
    assert strongest_baseline(only_ceiling_high) == "kmeans_pixels"


def test_grid_summary_counts_a_known_win_tie_and_loss():
    """Per condition, the paired difference with the strongest baseline; a tie is an interval containing 0; over
    conditions, the mean of the per-condition means with a t-interval over conditions."""
    result = win_tie_loss()
    summary = result["summary"]
    win, tie, loss = (c["vs_strongest"] for c in summary["conditions"])
    assert win["excludes_zero"] and win["mean"] == pytest.approx(0.1, abs=0.01)
    assert not tie["excludes_zero"] and tie["low"] < 0 < tie["high"] and tie["mean"] == pytest.approx(0.0)
    assert loss["excludes_zero"] and loss["mean"] == pytest.approx(-0.1, abs=0.01)
    overall = summary["overall"]["vs_strongest"]["all"]
    assert (overall["wins"], overall["ties"], overall["losses"]) == (1, 1, 1)
    means = [win["mean"], tie["mean"], loss["mean"]]
    assert overall["mean"] == pytest.approx(np.mean(means)) and overall["ci"] == pytest.approx(mean_ci(means)[1])
    assert overall["n"] == 3 and not overall["excludes_zero"] and overall["worst"] == pytest.approx(min(means))
    shifted = summary["overall"]["vs_strongest"]["shifted"]  # mnist+rotate (the tie) and mnist+fog (the loss)
    assert (shifted["wins"], shifted["ties"], shifted["losses"], shifted["n"]) == (0, 1, 1, 2)
    assert [c["shift"] for c in summary["conditions"]] == ["clean", "rotate", "fog"]
    first = summary["conditions"][0]
    assert first["strongest"] == "gmm_latent" and first["num_classes"] == K
    assert first["vs_kmeans"]["mean"] == pytest.approx(win["mean"] + 0.05)  # k-means is 5 points below GMM here
    hyper = np.asarray(result["conditions"][0]["methods"]["hypernet"]["acc_steps"])[0]
    plain = np.asarray(result["conditions"][0]["methods"]["plain_choice"]["acc"])[0]
    assert first["vs_plain"]["mean"] == pytest.approx((hyper[:, -1] - plain).mean())
    assert first["gain"]["mean"] == pytest.approx(0.04 + 0.1, abs=0.01) and first["gain"]["excludes_zero"]
    gains = summary["overall"]["gain"]["all"]
    assert (gains["wins"], gains["ties"], gains["losses"]) == (1, 1, 1)  # +14, +4 +- 5 and -6 points
    assert first["accuracy"]["logreg_embedding"]["mean"] == 1.0


def test_summary_markdown_is_one_row_per_condition_then_the_means():
    result = win_tie_loss()
    text = summary_markdown(result)
    for c in result["summary"]["conditions"]:
        assert f"| {c['label']} |" in text
    assert text.count("Gaussian mixture on VAE means") == 3  # the strongest baseline, named in every row
    line = next(l for l in text.splitlines() if l.startswith("| vs the strongest label-free baseline |"))
    assert "| 1 / 1 / 1 |" in line and "0.0 ± 24.8" in line  # the mean of +10, 0 and -10 points
    shifted = next(l for l in text.splitlines() if "strongest label-free baseline, shifted" in l)
    assert "| 0 / 1 / 1 |" in shifted and shifted.endswith("| -10.0 |")
    win = next(l for l in text.splitlines() if l.startswith("| mnist, K"))
    assert "+10.0 ± " in win and "*" in win


def test_markdown_table_of_one_condition():
    """Every method, the supervised row marked, no difference on the strongest row itself, '*' where it excludes 0."""
    cond = win_tie_loss()["conditions"][2]
    table = markdown_table(cond)
    lines = table.splitlines()
    assert "strongest label-free baseline: Gaussian mixture on VAE means" in lines[0]
    assert len(lines) == 4 + len(condition_rows(cond))
    adapted = next(l for l in lines if l.startswith(f"| hypernetwork + {STEPS} inner steps |"))
    assert "-10.0 ± " in adapted and "*" in adapted
    strongest = next(l for l in lines if l.startswith("| Gaussian mixture on VAE means |"))
    assert strongest.split("|")[4].strip() == ""
    assert "| logistic regression on the embedding (supervised ceiling) (supervised) |" in table


def test_heatmap_is_every_label_free_method_against_each_conditions_strongest():
    """(conditions, methods) of mean paired differences in points; 0 for the strongest; NaN where not scored."""
    result = win_tie_loss()
    extra = block("mnist+scale", np.full((1, TASK_COUNT, STEPS + 1), 0.6),
                  {"kmeans_embedding": np.full((1, TASK_COUNT), 0.7), "kmeans_pixels": np.full((1, TASK_COUNT), 0.5)})
    result["conditions"].append(extra)
    conditions, names, values = heatmap_data(result)
    assert conditions == ["mnist_K3_N32", "mnist+rotate_K3_N32", "mnist+fog_K3_N32", "mnist+scale_K3_N32"]
    assert names == ["hypernet_adapted", "hypernet", "kmeans_embedding", "plain_choice", "gmm_latent",
                     "kmeans_pixels"]  # registry order, the supervised ceiling left out
    assert values.shape == (4, 6)
    col = {n: j for j, n in enumerate(names)}
    assert values[0, col["gmm_latent"]] == 0.0 and values[3, col["kmeans_embedding"]] == 0.0
    assert values[0, col["hypernet_adapted"]] == pytest.approx(100 * result["summary"]["conditions"][0]
                                                               ["vs_strongest"]["mean"])
    assert values[0, col["kmeans_pixels"]] == pytest.approx(-30.0)
    assert values[3, col["hypernet"]] == pytest.approx(-10.0) and values[3, col["kmeans_pixels"]] == pytest.approx(-20.0)
    assert np.isnan(values[3, col["gmm_latent"]]) and np.isnan(values[3, col["plain_choice"]])
    fig = plots.difference_heatmap(result)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array().filled(np.nan), values)
    plt.close("all")


def test_headline_rows_figures_and_per_task_accuracy():
    result = win_tie_loss()
    flat = headline_rows([result])
    assert len(flat) == 3 and all(isinstance(v, (str, int)) for row in flat for v in row.values())
    assert flat[0]["vs strongest"].startswith("+10.0") and flat[2]["vs strongest"].startswith("-10.0")
    assert record_headline("evaluation", flat, "Toy evaluation").is_file()
    cond = result["conditions"][0]
    adapted = per_task_accuracy(cond, "hypernet_adapted")
    np.testing.assert_array_equal(adapted, np.asarray(cond["methods"]["hypernet"]["acc_steps"])[0, :, -1])
    np.testing.assert_array_equal(per_task_accuracy(cond, "hypernet"), BASE - 0.04)
    with pytest.raises(EvalError, match="no method 'nope'"):
        per_task_accuracy(cond, "nope")
    kmeans = per_task_accuracy(cond, "kmeans_embedding")
    figures = [plots.evaluation_table(result, title="toy"), plots.task_scatter(adapted, kmeans)]
    assert all(isinstance(fig, Figure) for fig in figures)
    assert len(figures[0].axes[0].tables[0].get_celld()) == 7 * (1 + 3)  # header + a row per condition
    with pytest.raises(ValueError, match="differ in shape"):
        plots.task_scatter(kmeans[:2], kmeans)
    plt.close("all")


def test_results_paths_and_schema():
    """Summaries live in results/eval_<setting>.json, conditions beside them; another schema is stale."""
    path = default_results_path("zero_shot")
    assert path.name == "eval_zero_shot.json"
    assert condition_path(path, Condition("mnist+rotate", 4, 256)) == path.parent / "eval_zero_shot" / \
        "mnist+rotate_K4_N256.json"
    with pytest.raises(EvalError, match="unknown setting"):
        default_results_path("few_shot")
    path = default_results_path("transductive")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": "hmlib-eval/2"}))
    with pytest.raises(StaleArtifactError, match="schema"):
        load_results("transductive")


# ------------------------------------------------------------------------------- scoring checkpoints

def test_every_method_scores_every_condition_on_its_suite(trained, ckpt, tmp_path, monkeypatch):
    """Seed 0 on the default grid (clean and rotated mnist): every registered method on each condition's fixed
    suite, each condition cached beside the summary; a rerun from scratch scores the same numbers."""
    path = default_results_path("zero_shot")
    result = load_results("zero_shot")
    assert path.with_suffix(".md").is_file() and result["profile"] == "smoke" and result["seeds"] == [0]
    conditions = grid(trained.cfg, verbose=False)
    assert [b["condition"]["key"] for b in result["conditions"]] == [c.key for c in conditions] == \
        ["mnist_K3_N18", "mnist+rotate_K3_N18"]
    for condition, cond in zip(conditions, result["conditions"]):
        assert condition_path(path, condition).is_file()
        assert set(cond["methods"]) == {"hypernet", *(m.name for m in baselines())}
        suite = build_suite(trained.cfg, condition)
        assert cond["identity"]["suite"] == suite_fingerprint(suite) and cond["suite"]["num_tasks"] == TASKS
        assert cond["suite"]["classes"] == suite.classes.tolist()
        hyper = np.asarray(cond["methods"]["hypernet"]["acc_steps"])
        assert hyper.shape == (1, TASKS, TEST_STEPS + 1) and np.all((hyper >= 1 / K) & (hyper <= 1))
        for method in baselines():  # matched clustering accuracy is at least 1/K; the supervised ceiling's is not
            acc = np.asarray(cond["methods"][method.name]["acc"])
            floor = 0.0 if method.supervised else 1 / K
            assert acc.shape == (1, TASKS) and np.all((acc >= floor) & (acc <= 1)), method.name
    clean, rotated = result["conditions"]
    assert clean["suite"]["classes"] == rotated["suite"]["classes"] and rotated["condition"]["shift"] == "rotate"
    assert np.mean(clean["methods"]["kmeans_pixels"]["acc"]) > 0.9  # the tiny mirror's classes are bars at angles
    assert clean["methods"]["kmeans_pixels"]["acc"] != rotated["methods"]["kmeans_pixels"]["acc"]  # other pixels
    assert [c["key"] for c in result["summary"]["conditions"]] == ["mnist_K3_N18", "mnist+rotate_K3_N18"]
    assert result["summary"]["overall"]["vs_strongest"]["shifted"]["n"] == 1

    seen = []

    def spy(function, name):
        def record(*args):
            suite = next(a for a in args if hasattr(a, "indices") or hasattr(a, "suite"))
            seen.append((name, suite_fingerprint(getattr(suite, "suite", suite))))
            return function(*args)
        return record

    monkeypatch.setattr(evaluate_module, "score_hypernet", spy(evaluate_module.score_hypernet, "hypernet"))
    monkeypatch.setattr(methods, "score", spy(methods.score, "baseline"))
    again = evaluate(trained, [ckpt[("zero_shot", 0)]], tmp_path / "again.json")  # computed anew
    fingerprints = [c["identity"]["suite"] for c in result["conditions"]]
    per_condition = 1 + len(baselines())
    assert len(seen) == 2 * per_condition
    assert {fp for _, fp in seen[:per_condition]} == {fingerprints[0]}
    assert {fp for _, fp in seen[per_condition:]} == {fingerprints[1]}
    for old, new in zip(result["conditions"], again["conditions"]):
        for name, scores in old["methods"].items():
            key = "acc_steps" if name == "hypernet" else "acc"
            assert new["methods"][name][key] == scores[key], name


def test_k2_and_k10_tasks_end_to_end(trained, ckpt, monkeypatch, tmp_path):
    """A 10-class dataset at K = 2 and K = 10: the hypernetwork clusters into K clusters whatever K it was
    meta-trained on, every baseline scores the same tasks, and the tables cover both shapes."""
    cfg = tiny_config(data={"custom_datasets": {TEN: str(trained.ten)}})
    shapes, predict = [], evaluate_module.predict_task

    def spy(*args, **kwargs):
        logits = predict(*args, **kwargs)
        shapes.append(tuple(logits.shape))
        return logits

    monkeypatch.setattr(evaluate_module, "predict_task", spy)
    result = evaluate(trained, [ckpt[("zero_shot", 0)]], tmp_path / "k.json", cfg=cfg, datasets=[TEN],
                      shapes=[(2, 12), (10, 40)])
    assert shapes == [(TEST_STEPS + 1, TASKS, 12, 2), (TEST_STEPS + 1, TASKS, 40, 10)]  # logits (S+1, T, N, K)
    two, ten = result["conditions"]
    assert (two["condition"]["num_classes"], ten["condition"]["num_classes"]) == (2, 10)
    assert np.asarray(ten["suite"]["classes"]).shape == (TASKS, 10)
    for cond, k in ((two, 2), (ten, 10)):
        hyper = np.asarray(cond["methods"]["hypernet"]["acc_steps"])
        assert hyper.shape == (1, TASKS, TEST_STEPS + 1) and np.all(hyper >= 1 / k)
        assert set(cond["methods"]) == {"hypernet", *(m.name for m in baselines())}
    assert np.mean(per_task_accuracy(ten, "hypernet_adapted")) > 0.3  # three times chance on ten bar angles
    assert np.mean(per_task_accuracy(ten, "kmeans_pixels")) > 0.8
    assert [c["num_classes"] for c in result["summary"]["conditions"]] == [2, 10]
    text = summary_markdown(result)
    assert f"| {TEN}, K = 2, N = 12 |" in text and f"| {TEN}, K = 10, N = 40 |" in text


def test_an_interrupted_grid_resumes_without_recomputing_finished_conditions(trained, ckpt, tmp_path, monkeypatch,
                                                                            capsys):
    """Each condition is written when done: after an interruption only the unfinished ones are scored; a changed
    identity, a corrupt file or recompute=True score them again."""
    path, zero = tmp_path / "grid.json", ckpt[("zero_shot", 0)]
    run = dict(datasets=["mnist", "mnist+rotate"], shapes=[(K, N), (2, 12)])
    scored = []
    score_hypernet_ = evaluate_module.score_hypernet

    def interrupt_third(inputs, cfg, suite, num_steps):
        scored.append(suite_fingerprint(suite))
        if len(scored) == 3:
            raise KeyboardInterrupt
        return score_hypernet_(inputs, cfg, suite, num_steps)

    monkeypatch.setattr(evaluate_module, "score_hypernet", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(trained, [zero], path, **run)
    files = sorted(path.with_suffix("").glob("*.json"))
    assert [f.name for f in files] == ["mnist_K2_N12.json", "mnist_K3_N18.json"] and not path.exists()
    written = {f.name: f.read_bytes() for f in files}

    scored.clear()
    monkeypatch.setattr(evaluate_module, "score_hypernet", lambda *a: scored.append(0) or score_hypernet_(*a))
    resumed = evaluate(trained, [zero], path, **run)
    assert len(scored) == 2 and path.is_file()  # the two rotated conditions only
    assert {f.name: f.read_bytes() for f in path.with_suffix("").glob("*.json") if f.name in written} == written
    assert [b["condition"]["key"] for b in resumed["conditions"]] == \
        ["mnist_K3_N18", "mnist_K2_N12", "mnist+rotate_K3_N18", "mnist+rotate_K2_N12"]
    scored.clear()
    fresh = evaluate(trained, [zero], tmp_path / "fresh.json", **run)
    assert len(scored) == 4
    for a, b in zip(resumed["conditions"], fresh["conditions"]):
        assert a["methods"]["hypernet"]["acc_steps"] == b["methods"]["hypernet"]["acc_steps"]
        assert a["methods"]["plain_choice"]["acc"] == b["methods"]["plain_choice"]["acc"]

    scored.clear()
    capsys.readouterr()
    evaluate(trained, [zero], path, cfg=tiny_config(eval={"plain_steps": 1}), **run)
    assert len(scored) == 4 and capsys.readouterr().out.count("Recomputing") == 4
    (path.with_suffix("") / "mnist_K2_N12.json").write_text("{torn")
    scored.clear()
    evaluate(trained, [zero], path, cfg=tiny_config(eval={"plain_steps": 1}), **run)
    assert len(scored) == 1 and "Recomputing mnist_K2_N12" in capsys.readouterr().out
    scored.clear()
    evaluate(trained, [zero], path, cfg=tiny_config(eval={"plain_steps": 1}), recompute=True, **run)
    assert len(scored) == 4


def test_zero_test_time_steps_score_the_unadapted_hypernetwork(trained, ckpt):
    """With one test-time candidate, scoring after 0 steps gives exactly the first column of a scoring after every
    step (with several, the candidate kept may depend on the steps taken); the scores do not depend on the chunk."""
    bundle = load_bundle(ckpt[("zero_shot", 0)])
    inputs = seed_inputs(bundle, trained.cfg, "mnist", "zero_shot")
    condition = grid(trained.cfg, ["mnist"], verbose=False)[0]
    suite = build_suite(trained.cfg, condition)
    acc, seconds = score_hypernet(inputs, trained.cfg, suite, None)
    assert acc.shape == (TASKS, TEST_STEPS + 1) and seconds > 0
    generated = with_overrides(trained.cfg, {"adapt": {"candidates": ["generated"]}})
    zero, _ = score_hypernet(inputs, generated, suite, 0)
    assert zero.shape == (TASKS, 1)
    np.testing.assert_array_equal(zero[:, 0], score_hypernet(inputs, generated, suite, None)[0][:, 0])
    np.testing.assert_array_equal(score_hypernet(inputs, trained.cfg, suite, None, chunk=1)[0], acc)
    cached = np.asarray(load_results("zero_shot")["conditions"][0]["methods"]["hypernet"]["acc_steps"])[0]
    np.testing.assert_array_equal(cached, acc)


def test_scores_are_aggregated_over_replicate_seeds(trained, ckpt, tmp_path):
    """Two seeds: each is scored through its own models; rows average tasks over seeds; methods not marked
    every_seed are scored on the first replicate only."""
    result = evaluate(trained, [ckpt[("zero_shot", 0)], ckpt[("zero_shot", 1)]], tmp_path / "e.json",
                      datasets=["mnist"])
    assert result["seeds"] == [0, 1] and len(result["checkpoints"]) == 2
    (cond,) = result["conditions"]
    hyper = np.asarray(cond["methods"]["hypernet"]["acc_steps"])
    assert hyper.shape == (2, TASKS, TEST_STEPS + 1)
    for name in (m.name for m in baselines()):
        assert np.asarray(cond["methods"][name]["acc"]).shape == ((2 if METHODS[name].every_seed else 1), TASKS)
    one = load_results("zero_shot")["conditions"][0]  # seed 0 alone
    assert one["methods"]["hypernet"]["acc_steps"][0] == cond["methods"]["hypernet"]["acc_steps"][0]
    assert one["methods"]["kmeans_embedding"]["acc"][0] == cond["methods"]["kmeans_embedding"]["acc"][0]
    assert one["methods"]["kmeans_pixels"]["acc"] == cond["methods"]["kmeans_pixels"]["acc"]
    rows = {r["method"]: r for r in condition_rows(cond)}
    assert rows["hypernet_adapted"]["num_seeds"] == 2 and rows["hypernet_adapted"]["seed_std"] is not None
    np.testing.assert_allclose(per_task_accuracy(cond, "hypernet_adapted"), hyper[:, :, -1].mean(0))
    assert rows["hypernet_adapted"]["accuracy"] == pytest.approx(hyper[:, :, -1].mean())
    assert "(sd " in markdown_table(cond)


def test_duplicated_checkpoints_are_refused(trained, ckpt, tmp_path):
    """Each replicate once: the same file twice, a copy of it or two checkpoints of one seed fail before any work."""
    zero = ckpt[("zero_shot", 0)]
    with pytest.raises(EvalError, match="same checkpoint"):
        load_bundles([zero, zero])
    copy = tmp_path / "copy.pt"
    shutil.copy(zero, copy)
    with pytest.raises(EvalError, match="same checkpoint"):
        load_bundles([zero, copy])
    state, meta = load_checkpoint(zero)
    state["best_model"] = {k: v + 0.01 if v.dtype.is_floating_point else v for k, v in state["best_model"].items()}
    save_checkpoint(tmp_path / "other.pt", state, meta)
    with pytest.raises(EvalError, match="two checkpoints of replicate seed 0"):
        evaluate(trained, [zero, tmp_path / "other.pt"], tmp_path / "e.json")
    loaded = load_bundles([ckpt[("zero_shot", 1)], zero])
    assert [b.seed for b in loaded] == [1, 0]
    assert load_bundles(loaded)[0] is loaded[0]  # loaded bundles are taken as they are (not read again)
    with pytest.raises(EvalError, match="same checkpoint"):
        load_bundles([loaded[1], zero])
    with pytest.raises(ArtifactError, match="checkpoint not found"):
        load_bundles([tmp_path / "missing.pt"])
    with pytest.raises(EvalError, match="no checkpoint"):
        load_bundles([])
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "e").exists()


def test_replicates_made_with_other_settings_are_refused(trained, ckpt, tmp_path):
    """Found by a first-hour audit: models/pipeline.json keeps the newest checkpoint per seed, so a run with other
    settings (a smoke run, more iterations) left seeds of two protocols side by side, and they were averaged as one."""
    state, meta = load_checkpoint(ckpt[("zero_shot", 1)])
    meta["training"]["meta"]["iterations"] += 1  # as a run with other meta-training settings records it
    save_checkpoint(tmp_path / "other_run.pt", state, meta)
    with pytest.raises(EvalError, match=r"\(seed 1\) was made with other meta-training settings .* \(seed 0\)"):
        load_bundles([ckpt[("zero_shot", 0)], tmp_path / "other_run.pt"])
    assert [b.seed for b in load_bundles([ckpt[("zero_shot", 0)], ckpt[("zero_shot", 1)]])] == [0, 1]


def test_a_result_of_other_checkpoints_or_settings_is_kept_not_overwritten(trained, ckpt, tmp_path, capsys):
    """A second first-hour audit: a run with other settings in the same home rewrote results/eval_<setting>.json
    without a word. Now the finished result is set aside (kept, with its .md) and the run says so; the same
    evaluation again simply replaces it."""
    path = tmp_path / "e.json"
    first = evaluate(trained, [ckpt[("zero_shot", 0)]], path)
    capsys.readouterr()
    again = evaluate(trained, [ckpt[("zero_shot", 0)]], path)
    assert again["conditions"] == first["conditions"] and not list(tmp_path.glob("e.replaced-*"))
    assert "kept as" not in capsys.readouterr().out
    evaluate(trained, [ckpt[("zero_shot", 1)]], path)  # other checkpoints
    assert "e.json held a result of other checkpoints or settings; it is kept as e.replaced-1.json" in \
        capsys.readouterr().out
    assert load_results("zero_shot", tmp_path / "e.replaced-1.json") == first
    assert (tmp_path / "e.replaced-1.md").is_file() and load_results("zero_shot", path)["seeds"] == [1]
    evaluate(trained, [ckpt[("zero_shot", 1)]], path, num_steps=0)  # other settings: a second copy, none lost
    assert sorted(p.name for p in tmp_path.glob("e.replaced-*.json")) == ["e.replaced-1.json", "e.replaced-2.json"]


def test_adding_a_baseline_is_one_register_call(trained, ckpt, monkeypatch, capsys):
    """register(Method(...)) with a new clusterer makes it a row of every table and of the heatmap; results cached
    before it existed are recomputed."""
    monkeypatch.setitem(METHODS, "ward_embedding", None)  # removed again after the test
    register(Method("ward_embedding", "Ward clustering on the backbone embedding", "#123456",
                    clusters_on("embedding", lambda x, k, seed, n_init: AgglomerativeClustering(k).fit_predict(x),
                                normalize=True), "embedding"))
    result = evaluate(trained, [ckpt[("zero_shot", 0)]])
    assert capsys.readouterr().out.count("Recomputing") == 2  # a new method makes both cached conditions stale
    for cond in result["conditions"]:
        assert np.asarray(cond["methods"]["ward_embedding"]["acc"]).shape == (1, TASKS)
        rows = {r["method"]: r for r in condition_rows(cond)}
        assert rows["ward_embedding"]["label"] == "Ward clustering on the backbone embedding"
        assert "| Ward clustering on the backbone embedding |" in markdown_table(cond)
    assert "ward_embedding" in heatmap_data(result)[1]
    assert "ward_embedding" in result["summary"]["conditions"][0]["accuracy"]


def test_transductive_setting_reads_the_adapted_backbone_on_the_same_tasks(trained, ckpt, tmp_path, monkeypatch):
    """Transductive: the backbone adapted to mnist's unlabeled train split (models/), the same suite; in a home
    without it, one MissingArtifactError naming it and the command that makes it, nothing trained."""
    zero = load_results("zero_shot")["conditions"][0]
    trans = evaluate(trained, [ckpt[("zero_shot", 0)]], setting="transductive", datasets=["mnist"])
    assert default_results_path("transductive").is_file() and trans["setting"] == "transductive"
    (cond,) = trans["conditions"]
    assert cond["suite"] == zero["suite"] and cond["identity"]["suite"] == zero["identity"]["suite"]
    assert cond["identity"]["inputs"][0]["backbone_id"] != zero["identity"]["inputs"][0]["backbone_id"]
    assert cond["identity"]["inputs"][0]["transductive_gate"] == {"rule": "off", "kept": "adapted"}
    assert trans["setting_label"] != load_results("zero_shot")["setting_label"]
    # where the gate declines the adaptation, the transductive setting reads the zero-shot backbone, and says so
    declined = {"rule": "silhouette", "clusters": 4, "images": 100, "before": 0.5, "after": 0.4, "kept": "start"}
    with monkeypatch.context() as patch:
        patch.setattr(transductive, "gate", lambda *args: declined)
        gated = evaluate(trained, [ckpt[("zero_shot", 0)]], tmp_path / "gated.json", setting="transductive",
                         datasets=["mnist"])
    (cond,) = gated["conditions"]
    assert cond["identity"]["inputs"][0]["backbone_id"] == zero["identity"]["inputs"][0]["backbone_id"]
    assert cond["identity"]["inputs"][0]["transductive_gate"] == declined
    assert cond["methods"]["kmeans_embedding"]["acc"] == zero["methods"]["kmeans_embedding"]["acc"]
    # a dataset no backbone was adapted to fails before the first condition is scored, not after it
    with pytest.raises(MissingArtifactError, match=r"backbone_seed0_on-mnist\+brightness.*transductive.datasets"):
        evaluate(trained, [ckpt[("zero_shot", 0)]], tmp_path / "late.json", setting="transductive",
                 datasets=["mnist", "mnist+brightness"])
    assert not (tmp_path / "late").exists()
    fresh = tmp_path / "fresh_home"
    fresh.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(fresh))
    moved = tmp_path / "model.pt"
    shutil.copy(ckpt[("zero_shot", 0)], moved)
    with pytest.raises(MissingArtifactError, match=r"transductive backbone .*backbone_seed0_on-mnist.*hmlib run"):
        evaluate(trained, [moved], tmp_path / "t.json", setting="transductive", datasets=["mnist"])
    assert not (fresh / "models").exists()


def test_checkpoints_bundle_the_models_they_read_through(trained, ckpt):
    """A checkpoint carries the shared VAE and the backbone it modulates, identical to those of the protocol; its
    config is the training one, with the profile's test-time settings (adapt.test_steps, the transductive gate's)."""
    cfg = trained.cfg
    bundle = load_bundle(ckpt[("zero_shot", 0)])
    assert bundle.seed == 0 and bundle.cfg == with_profile_test_time(cfg) and bundle.backbone is not None
    vae, vae_meta = get_vae(cfg, "shared", 0, train=False, progress=False, verbose=False)
    assert bundle.vae_meta["vae_id"] == vae_meta["vae_id"] and "path" not in bundle.vae_meta
    for key, value in vae.state_dict().items():
        assert torch.equal(bundle.vae.state_dict()[key], value)
    assert bundle.hypernet.context_dim == 2 * cfg.vae.latent_dim
    assert bundle.backbone.embed_dim == cfg.backbone.embed_dim and "path" not in bundle.backbone_meta


# --------------------------------------------------------------------------------------------- hmlib eval

def test_hmlib_eval_end_to_end_keys_results_by_what_made_them(trained, ckpt, capsys):
    """``hmlib eval`` on two datasets (one shifted) and two shapes prints the grid's summary and writes JSON +
    markdown under a name hashing its inputs: other settings never replace it, the same ones reuse it."""
    args = ["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", "mnist", "mnist+rotate",
            "--shapes", f"{K}x{N}", "2x12", "--steps", "1", "--quiet"]
    assert cli.main([*args, "--tasks", "2"]) == 0
    printed = capsys.readouterr().out
    (out,) = (default_results_path("zero_shot").parent / "eval").glob("zero_shot-*.json")
    assert str(out) in printed and out.with_suffix(".md").is_file()
    result = load_results("zero_shot", out)
    assert [b["condition"]["key"] for b in result["conditions"]] == \
        ["mnist_K3_N18", "mnist_K2_N12", "mnist+rotate_K3_N18", "mnist+rotate_K2_N12"]
    assert all(np.asarray(b["methods"]["hypernet"]["acc_steps"]).shape == (1, 2, 2) for b in result["conditions"])
    assert result["key"]["datasets"] == ["mnist", "mnist+rotate"] and result["key"]["steps"] == 1
    assert "mnist+rotate, K = 2, N = 12" in printed and "| over conditions" in printed
    assert cli.main([*args, "--tasks", "2"]) == 0 and "Recomputing" not in capsys.readouterr().out  # reused
    assert cli.main([*args, "--tasks", "3"]) == 0
    capsys.readouterr()
    assert len(list(out.parent.glob("zero_shot-*.json"))) == 2 and load_results("zero_shot", out) == result


def test_hmlib_eval_never_replaces_a_file_made_by_other_inputs(trained, ckpt, tmp_path, capsys):
    """--json naming another evaluation, a file that is not one, or a fresh path whose .md exists, needs
    --overwrite; the same evaluation may be rewritten."""
    zero = ckpt[("zero_shot", 0)]
    args = ["--checkpoint", zero, "--dataset", "mnist", "--tasks", "2", "--quiet"]
    out = tmp_path / "e.json"
    assert cli.main(["eval", *map(str, args), "--json", str(out)]) == 0
    assert cli.main(["eval", *map(str, args), "--json", str(out)]) == 0  # the same evaluation: fine
    before = out.read_text()
    message = refused([*args, "--steps", "1", "--json", out], capsys)
    assert "holds another evaluation" in message and "--overwrite" in message and out.read_text() == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert "--overwrite" in refused([*args, "--json", notes], capsys) and notes.read_text() == '{"mine": true}'
    table = tmp_path / "fresh.md"
    table.write_text("my notes")
    assert "--overwrite" in refused([*args, "--json", tmp_path / "fresh.json"], capsys)
    assert table.read_text() == "my notes" and not (tmp_path / "fresh.json").exists()
    assert cli.main(["eval", *map(str, args), "--json", str(notes), "--overwrite"]) == 0
    assert load_results("zero_shot", notes)["conditions"][0]["condition"]["dataset"] == "mnist"


def test_hmlib_eval_checks_the_results_folder_before_any_work(trained, ckpt, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(eval_cli, "evaluate_setting", lambda *a, **kw: pytest.fail("evaluated before the check"))
    message = refused(["--checkpoint", ckpt[("zero_shot", 0)], "--dataset", "mnist", "--json",
                       blocker / "e.json"], capsys)
    assert "is a file, not a folder" in message and "--json" in message


def test_hmlib_eval_honours_a_test_time_config_and_refuses_model_changes(trained, ckpt, tmp_path, capsys):
    """--config may change adapt.* (recorded in the result); a model section is refused."""
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"adapt": {"test_steps": 3}}))
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", "mnist", "--config",
                     str(steps), "--json", str(out), "--tasks", "2", "--quiet"]) == 0
    result = load_results("zero_shot", out)
    assert result["num_steps"] == 3 and result["key"]["adapt"]["test_steps"] == 3
    assert np.asarray(result["conditions"][0]["methods"]["hypernet"]["acc_steps"]).shape == (1, 2, 4)
    for section in ("hyper", "film"):
        model = tmp_path / f"{section}.json"
        model.write_text(json.dumps({section: {"embed_dim": 4} if section == "hyper" else {"tau": 2.0}}))
        message = refused(["--checkpoint", ckpt[("zero_shot", 0)], "--dataset", "mnist", "--config", model], capsys)
        assert section in message and "fixed by the checkpoint" in message


def test_config_for_checkpoint_keeps_model_settings(tmp_path):
    """Model sections come from the checkpoint; data/eval from the profile (default: the checkpoint's); adapt from
    the checkpoint, then --config, but for adapt.test_steps (the profile's, then --config)."""
    trained = tiny_config(adapt={"inner_loss": "entropy"}, film={"tau": 3.0})
    meta = {"config": config_to_dict(trained)}
    same = config_for_checkpoint(meta)
    assert same.profile == "smoke" and same.eval == load_config("smoke").eval and same.adapt == trained.adapt
    cfg = config_for_checkpoint(meta, profile="default", overrides={"eval": {"num_tasks": 7}})
    assert (cfg.hyper, cfg.film, cfg.vae, cfg.backbone, cfg.task, cfg.meta) == \
        (trained.hyper, trained.film, trained.vae, trained.backbone, trained.task, trained.meta)
    assert cfg.adapt.inner_loss == "entropy" and cfg.eval.num_tasks == 7 and cfg.data.max_images_per_split is None
    assert cfg.eval.shapes == load_config("default").eval.shapes
    adapt = tmp_path / "adapt.json"
    adapt.write_text(json.dumps({"adapt": {"num_inner_steps": 9}}))
    tuned = config_for_checkpoint(meta, config_path=adapt)
    assert tuned.adapt.num_inner_steps == 9 and tuned.adapt.inner_loss == "entropy"
    # the test-time step count is the profile's or the config's, whatever the checkpoint recorded (not its identity)
    recorded = {"config": config_to_dict(tiny_config(adapt={"inner_loss": "entropy", "test_steps": 6}))}
    assert config_for_checkpoint(recorded).adapt.test_steps == load_config("smoke").adapt.test_steps == 4
    assert config_for_checkpoint(recorded, profile="default").adapt.steps_at_test == 8 != trained.adapt.num_inner_steps
    adapt.write_text(json.dumps({"adapt": {"test_steps": None}}))
    assert config_for_checkpoint(recorded, config_path=adapt).adapt.steps_at_test == trained.adapt.num_inner_steps
    with pytest.raises(EvalError, match="records no config"):
        config_for_checkpoint({})


def test_hmlib_eval_refuses_bad_arguments(trained, ckpt, tmp_path, capsys):
    """Path-like dataset names, bad shapes and task counts, unknown datasets, missing folders and files are refused
    with a reason."""
    zero = ckpt[("zero_shot", 0)]
    for name in ("../mnist", "a/b", "/etc"):
        assert "invalid --dataset name" in refused(["--checkpoint", zero, "--dataset", name], capsys)
    assert "expected an integer >= 2" in refused(["--checkpoint", zero, "--dataset", "mnist", "--tasks", "1"], capsys)
    assert "expected a task shape KxN" in refused(["--checkpoint", zero, "--shapes", "4by64"], capsys)
    for shape in ("1x8", "4x6"):
        assert "K >= 2 and N >= 2K" in refused(["--checkpoint", zero, "--shapes", shape], capsys)
    message = refused(["--checkpoint", zero, "--dataset", "nope"], capsys)
    assert "unknown dataset 'nope'" in message and "mnist" in message and "--data-dir" in message
    assert "unknown dataset 'nope'" in refused(["--checkpoint", zero, "--dataset", "nope+rotate"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no train.parquet" in refused(["--checkpoint", zero, "--dataset", "nope", "--data-dir", empty], capsys)
    assert "is not a folder" in refused(["--checkpoint", zero, "--dataset", "mnist", "--data-dir", tmp_path / "x"],
                                        capsys)
    assert "checkpoint not found" in refused(["--checkpoint", tmp_path / "missing.pt", "--dataset", "mnist"], capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "corrupt" in refused(["--checkpoint", garbage, "--dataset", "mnist"], capsys)
    (backbone,) = models_dir().glob("backbone_seed0-*.pt")
    assert "is a backbone checkpoint, not a hypernetwork one" in refused(["--checkpoint", backbone], capsys)


def test_hmlib_eval_faults_of_the_first_hour(trained, ckpt, tmp_path, capsys):
    """Found by a first-hour audit: --json naming a .md (the table then overwrote the JSON), a grid left empty by
    its shapes (an empty result, rc 0), a replicate recorded in models/pipeline.json but missing (silently dropped),
    the same dataset name from two --data-dir mirrors (one default result file: the second replaced the first), and
    --setting transductive without --dataset (it took the test datasets, of which notebook 03 adapted to few)."""
    zero = ckpt[("zero_shot", 0)]
    for name in ("e.md", "e.txt"):
        assert "name a .json file" in refused(["--checkpoint", zero, "--dataset", "mnist", "--json", tmp_path / name],
                                              capsys)
        assert not (tmp_path / name).exists()
    # checked with the other arguments, before any checkpoint is read (a missing one is not what it reports)
    assert "name a .json file" in refused(["--checkpoint", tmp_path / "nope.pt", "--json", tmp_path / "e.md"], capsys)
    assert "no condition to evaluate" in refused(["--checkpoint", zero, "--dataset", "mnist", "--shapes", "11x60",
                                                  "--json", tmp_path / "none.json"], capsys)
    assert not (tmp_path / "none.json").exists()
    write_json(models_dir() / "pipeline.json", {"0": zero.name, "1": "hypernet_seed1-gone.pt"})
    message = refused(["--dataset", "mnist", "--tasks", "2", "--quiet"], capsys)
    assert "hypernet_seed1-gone.pt, which is missing" in message and "--checkpoint" in message
    (models_dir() / "pipeline.json").write_text("{not json")
    assert "pipeline.json cannot be read as the manifest" in refused(["--dataset", "mnist", "--quiet"], capsys)
    mirrors = []
    for name in ("a", "b"):
        mirror = tmp_path / name / TEN
        shutil.copytree(trained.ten, mirror)
        mirrors.append(mirror.parent)
    args = ["eval", "--checkpoint", str(zero), "--dataset", TEN, "--shapes", "2x12", "--tasks", "2", "--quiet"]
    for mirror in mirrors:
        assert cli.main([*args, "--data-dir", str(mirror)]) == 0
    made = sorted((default_results_path("zero_shot").parent / "eval").glob("zero_shot-*.json"))
    assert sorted(load_results("zero_shot", p)["key"]["data"][TEN] for p in made) == \
        sorted(str((m / TEN).resolve()) for m in mirrors)
    capsys.readouterr()
    overrides = tmp_path / "tiny.json"  # the tiny protocol's data and transductive settings (default: the profile's)
    overrides.write_text(json.dumps({k: v for k, v in OVERRIDES.items() if k not in eval_cli.MODEL_SECTIONS}))
    assert cli.main(["eval", "--checkpoint", str(zero), "--setting", "transductive", "--tasks", "2", "--quiet",
                     "--config", str(overrides), "--json", str(tmp_path / "t.json")]) == 0
    assert load_results("transductive", tmp_path / "t.json")["key"]["datasets"] == list(trained.cfg.transductive.datasets)


def test_hmlib_eval_on_a_never_seen_mirror_folder_with_ten_classes(trained, ckpt, tmp_path, capsys):
    """An unregistered 10-class dataset in a local folder, at K = 10 and K = 2, through the command."""
    out = tmp_path / "ten.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", TEN, "--data-dir",
                     str(trained.ten.parent), "--shapes", "10x40", "2x12", "--json", str(out), "--tasks", "2",
                     "--quiet"]) == 0
    result = load_results("zero_shot", out)
    assert [b["condition"]["key"] for b in result["conditions"]] == [f"{TEN}_K10_N40", f"{TEN}_K2_N12"]
    assert np.asarray(result["conditions"][0]["suite"]["classes"]).shape == (2, 10)
    assert np.asarray(result["conditions"][0]["methods"]["kmeans_pixels"]["acc"]).shape == (1, 2)


def test_a_dataset_derived_from_a_meta_training_dataset_is_flagged(trained, ckpt, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", "fashion_mnist+rotate",
                     "--json", str(out), "--tasks", "2", "--quiet"]) == 0
    assert "fashion_mnist+rotate derive from meta-training datasets" in capsys.readouterr().err


def test_a_checkpoint_evaluates_in_a_fresh_home(trained, ckpt, tmp_path, monkeypatch):
    """The checkpoint alone is enough zero-shot (it bundles the VAE and backbone); nothing is trained."""
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(ckpt[("zero_shot", 0)], moved)
    fresh = tmp_path / "fresh_home"
    fresh.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(fresh))
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--checkpoint", str(moved), "--dataset", "mnist", "--json", str(out), "--tasks", "2",
                     "--quiet"]) == 0
    assert np.asarray(load_results("zero_shot", out)["conditions"][0]["methods"]["hypernet"]["acc_steps"]).shape[1] == 2
    assert not (fresh / "models").exists()
