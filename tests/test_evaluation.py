"""The evaluation stage: the suite, the method registry, scoring tiny trained checkpoints over seeds, the results
cache, tables and figures, and ``hmlib eval`` end to end (fresh homes included)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.cluster import AgglomerativeClustering

from datafactory import write_tiny_dataset
from hmlib import cli
from hmlib.artifacts import ArtifactError, MissingArtifactError, StaleArtifactError, load_checkpoint, save_checkpoint
from hmlib.config import config_to_dict, load_config
from hmlib.data import load_split, sample_tasks
from hmlib.errors import HmlibError
from hmlib.evaluation import methods
from hmlib.evaluation import evaluate as evaluate_module
from hmlib.evaluation.cli import config_for_checkpoint
from hmlib.evaluation.evaluate import (EvalError, default_results_path, evaluate_setting, load_bundles, load_results,
                                       per_task_accuracy, score_baseline, score_hypernet)
from hmlib.evaluation.inputs import SeedInputs, seed_inputs
from hmlib.evaluation.methods import METHODS, Method, baselines, logreg_predict, register, run_clusterer
from hmlib.evaluation.quality import kmeans_quality, quality_table
from hmlib.evaluation.suite import build_suite, suite_fingerprint, suite_from_labels, suite_seed
from hmlib.evaluation.tables import (headline_rows, markdown_table, strongest_baseline, summary_rows,
                                     summary_rows_for_size)
from hmlib.hyper.bundle import bundle_for, load_bundle
from hmlib.hyper.inputs import TaskData
from hmlib.metrics import clustering_accuracy
from hmlib.plots import evaluation as plots
from hmlib.reports import record_headline
from hmlib.stats import mean_ci
from hmlib.vae.train import get_vae
from tinyprotocol import K, N, STEPS, TASKS, tiny_config, train_home, use_home

DIM, NUM_ALL_CLASSES, PER_CLASS, BLOB_TASKS, BLOB_N = 4, 5, 40, 4, 30
UNSUPERVISED = [m.name for m in baselines(unsupervised_only=True)]


@pytest.fixture(scope="module")
def trained(_tiny_mirror_root, tmp_path_factory):
    """Zero-shot checkpoints of seeds 0 and 1 and a transductive one of seed 0 (with mnist's own VAE), trained once;
    the zero-shot seed-0 checkpoint evaluated on mnist into results/eval_zero_shot.json."""
    trained = train_home(tmp_path_factory.mktemp("trained"), _tiny_mirror_root,
                         [("zero_shot", 0), ("zero_shot", 1), ("transductive", 0)], own_vaes=["mnist"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HMLIB_HOME", str(trained.home))
        patch.setenv("HMLIB_DATA_DIR", str(_tiny_mirror_root))
        evaluate_setting(trained.cfg, [trained.home / "models" / trained.checkpoints[("zero_shot", 0)]],
                         dataset="mnist", progress=False)
    return trained


@pytest.fixture
def ckpt(trained, hmlib_home, tiny_mirror):
    """This test's copy of the trained home (as HMLIB_HOME): (setting, seed) -> checkpoint path."""
    return use_home(trained, hmlib_home)


def evaluate(trained, checkpoints, path=None, **kw):
    """evaluate_setting on mnist with the tiny config (path None: results/eval_<setting>.json)."""
    return evaluate_setting(trained.cfg, checkpoints, dataset="mnist", path=path, progress=False, **kw)


def block_of(result):
    """The result's block of the one task size N."""
    return result["sizes"][str(N)]


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


def blob_suite(labels: np.ndarray, seed: int = 0):
    """BLOB_TASKS random K-class tasks of BLOB_N rows."""
    return sample_tasks(labels, BLOB_TASKS, K, BLOB_N, mode="random", seed=seed)


def synthetic_result(hyper: np.ndarray, accs: dict[str, np.ndarray]) -> dict:
    """A result dict as evaluate_setting writes it: hypernet (R, T, S+1), baselines (R, T), with summaries."""
    result = {"setting": "zero_shot", "dataset": "toy", "setting_label": "zero-shot", "sizes": {str(N): {
        "suite": {"num_tasks": hyper.shape[1]},
        "methods": {"hypernet": {"acc_steps": hyper.tolist(), "seconds": np.full(hyper.shape[:2], 0.01).tolist()},
                    **{name: {"acc": acc.tolist(), "seconds": np.full(acc.shape, 0.002).tolist()}
                       for name, acc in accs.items()}}}}}
    result["sizes"][str(N)]["summary"] = summary_rows_for_size(result, N)
    return result


def refused(args, capsys) -> str:
    """The message of a refused ``hmlib eval``: raised as an HmlibError, or printed with a non-zero exit code."""
    try:
        code = cli.main(["eval", *map(str, args)])
    except HmlibError as err:
        return str(err)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code not in (0, None)
    return capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- suite

def test_suite_is_deterministic_seeded_and_from_the_test_split(tiny_mirror):
    """The suite depends only on eval.seed, the dataset and N; every index is a test image of its task's class."""
    cfg = tiny_config()
    suite, again = build_suite(cfg, "mnist", N), build_suite(cfg, "mnist", N)
    assert suite.indices.shape == suite.labels.shape == (TASKS, N) and suite.classes.shape == (TASKS, K)
    for a, b in ((suite.indices, again.indices), (suite.labels, again.labels), (suite.classes, again.classes)):
        np.testing.assert_array_equal(a, b)
    test_labels = load_split("mnist", "test", cfg.data, progress=False).labels
    np.testing.assert_array_equal(test_labels[suite.indices], np.take_along_axis(suite.classes, suite.labels, 1))
    assert all(len(set(row)) == N for row in suite.indices.tolist())
    first = suite_from_labels(test_labels, cfg, "mnist", N, num_tasks=2)
    np.testing.assert_array_equal(first.indices, suite.indices[:2])  # fewer tasks: the first tasks of the suite
    other = build_suite(tiny_config(eval={"seed": 99}), "mnist", N)
    assert suite_fingerprint(other) != suite_fingerprint(suite) == suite_fingerprint(again)
    assert suite_seed(1234, "mnist", 64) == suite_seed(1234, "mnist", 64) != suite_seed(1234, "mnist", 256)
    assert suite_seed(1234, "mnist", 64) != suite_seed(1234, "kmnist", 64)


# ---------------------------------------------------------------------------------------- the baselines

@pytest.mark.parametrize("name", UNSUPERVISED)
def test_clusterers_recover_blobs_and_fail_on_noise(name):
    """Every registered unsupervised baseline recovers well-separated blobs and sits near chance on noise."""
    method = METHODS[name]
    rows, labels = blob_split(0)
    suite = blob_suite(labels)
    for t in range(BLOB_TASKS):
        pred, seconds = run_clusterer(method, rows[suite.indices[t]], K, seed=t, n_init=2)
        assert pred.shape == (BLOB_N,) and seconds > 0
        assert clustering_accuracy(pred, suite.labels[t], K) == 1.0
    noise, noise_labels = noise_split(1)
    suite = blob_suite(noise_labels)
    acc = [clustering_accuracy(run_clusterer(method, noise[suite.indices[t]], K, seed=t, n_init=2)[0],
                               suite.labels[t], K) for t in range(BLOB_TASKS)]
    assert np.mean(acc) < 0.7  # chance with Hungarian matching at N=30, K=3 is about 0.45


def test_clusterers_are_seeded():
    """The same seed gives the same clusters."""
    rows, labels = noise_split(2)
    idx = blob_suite(labels).indices[0]
    for name in UNSUPERVISED:
        first = run_clusterer(METHODS[name], rows[idx], K, seed=5, n_init=1)[0]
        np.testing.assert_array_equal(first, run_clusterer(METHODS[name], rows[idx], K, seed=5, n_init=1)[0])


def test_supervised_ceiling_reads_the_train_labels_of_the_task_classes():
    """The ceiling fits on labelled train rows of the task's classes: right labels give 100%, shifted ones fail."""
    cfg = tiny_config()
    test_x, test_y = blob_split(4)
    train_x, train_y = blob_split(3)
    suite = blob_suite(test_y)

    def inputs(train_labels):
        task_data = TaskData("blobs", "test", test_x, test_x, test_y)
        return SeedInputs(0, task_data, {"embedding": test_x}, {"embedding": train_x}, train_labels)

    acc, seconds = score_baseline(METHODS["logreg_embedding"], cfg, inputs(train_y), suite, seed=0)
    assert acc.shape == seconds.shape == (BLOB_TASKS,) and np.all(acc == 1.0)
    wrong, _ = score_baseline(METHODS["logreg_embedding"], cfg, inputs((train_y + 1) % NUM_ALL_CLASSES), suite, 0)
    assert wrong.mean() < 0.5
    missing = train_y.copy()
    missing[missing == suite.classes[0, 0]] = NUM_ALL_CLASSES + 1
    with pytest.raises(EvalError, match="no images in the train split"):
        score_baseline(METHODS["logreg_embedding"], cfg, inputs(missing), suite, 0)
    np.testing.assert_array_equal(logreg_predict(train_x, train_y, test_x), test_y)


def test_registry_order_and_kinds():
    """The hypernetwork's rows are not baselines; ceilings are supervised; register replaces a same-named method."""
    names = [m.name for m in baselines()]
    assert "hypernet" not in names and "hypernet_adapted" not in names
    assert {m.name for m in baselines()} - set(UNSUPERVISED) == {"logreg_embedding"}
    assert names[:2] == ["kmeans_embedding", "gmm_embedding"] and all(METHODS[n].reads for n in names)
    assert all(METHODS[n].cluster is not None for n in UNSUPERVISED)


def test_register_replaces_a_method_of_the_same_name(monkeypatch):
    """Registering an existing name replaces that method in place (its table position is kept)."""
    order = list(METHODS)
    monkeypatch.setitem(METHODS, "kmeans_pixels", METHODS["kmeans_pixels"])  # restored after the test
    register(dataclasses.replace(METHODS["kmeans_pixels"], label="k-means on pixels, renamed"))
    assert list(METHODS) == order and METHODS["kmeans_pixels"].label == "k-means on pixels, renamed"


# ------------------------------------------------------------------------------------------- tables

def test_paired_gains_and_seed_aggregation_in_summary_rows():
    """Rows average each task over seeds, give intervals over tasks, and pair every difference per task."""
    rng = np.random.default_rng(0)
    hyper = rng.uniform(0.4, 0.9, (2, 6, STEPS + 1))
    accs = {"kmeans_embedding": rng.uniform(0.4, 0.9, (2, 6)), "kmeans_pixels": rng.uniform(0.3, 0.5, (1, 6)),
            "logreg_embedding": np.ones((2, 6))}
    rows = {r["method"]: r for r in block_of(synthetic_result(hyper, accs))["summary"]}
    assert list(rows) == ["hypernet_adapted", "hypernet", *accs]
    adapted, after, before = rows["hypernet_adapted"], hyper[:, :, -1].mean(0), hyper[:, :, 0].mean(0)
    assert adapted["accuracy"] == pytest.approx(after.mean()) and adapted["ci"] == pytest.approx(mean_ci(after)[1])
    assert adapted["num_seeds"] == 2 and adapted["seed_means"] == pytest.approx(hyper[:, :, -1].mean(1))
    assert adapted["seed_std"] == pytest.approx(np.std(hyper[:, :, -1].mean(1), ddof=1))
    assert adapted["gain"]["mean"] == pytest.approx((after - before).mean())
    assert adapted["gain"]["ci"] == pytest.approx(mean_ci(after - before)[1])
    assert adapted["num_steps"] == STEPS and adapted["label"] == f"hypernetwork + {STEPS} inner steps"
    assert set(adapted["vs"]) == {"kmeans_embedding", "kmeans_pixels"}  # never against a supervised ceiling
    assert adapted["vs"]["kmeans_pixels"]["mean"] == pytest.approx((after - accs["kmeans_pixels"][0]).mean())
    assert rows["hypernet"]["accuracy"] == pytest.approx(before.mean()) and "gain" not in rows["hypernet"]
    assert rows["kmeans_pixels"]["num_seeds"] == 1 and rows["kmeans_pixels"]["seed_std"] is None
    assert rows["logreg_embedding"]["supervised"] and rows["kmeans_embedding"]["ms_per_task"] == pytest.approx(2.0)


def test_strongest_baseline_column_names_the_best_unsupervised_baseline():
    """The table compares the hypernetwork with the best unsupervised baseline, never with a supervised ceiling."""
    hyper = np.full((1, 4, STEPS + 1), 0.6)
    accs = {"kmeans_embedding": np.array([[0.5, 0.6, 0.5, 0.6]]), "gmm_latent": np.array([[0.7, 0.8, 0.7, 0.8]]),
            "kmeans_pixels": np.array([[0.4, 0.4, 0.4, 0.5]]), "logreg_embedding": np.ones((1, 4))}
    result = synthetic_result(hyper, accs)
    rows = summary_rows(result)
    assert strongest_baseline(rows)["method"] == "gmm_latent"
    table = markdown_table(result)
    adapted_line = next(line for line in table.splitlines() if f"+ {STEPS} inner steps" in line)
    assert "-15.0 ± " in adapted_line and "(gmm_latent)" in adapted_line and "*" in adapted_line
    assert table.count("(gmm_latent)") == 1 and "(kmeans_embedding)" not in table
    assert markdown_table(rows) == table and len(table.splitlines()) == 2 + len(rows)
    flat = headline_rows([result])
    assert len(flat) == len(rows) and all(isinstance(v, (str, int)) for row in flat for v in row.values())
    assert flat[0]["vs strongest baseline"].startswith("-15.0")
    assert record_headline("evaluation", flat, "Toy evaluation").is_file()


# ------------------------------------------------------------------------------- scoring checkpoints

def test_every_method_scores_the_same_deterministic_suite(trained, ckpt, tmp_path, monkeypatch):
    """One checkpoint: the hypernetwork after every step and every registered baseline on the one fixed suite."""
    path = default_results_path("zero_shot")
    result = evaluate(trained, [ckpt[("zero_shot", 0)]])
    assert path.is_file() and path.with_suffix(".md").is_file()
    block = block_of(result)
    assert set(block["methods"]) == {"hypernet", *(m.name for m in baselines())}
    suite = build_suite(trained.cfg, "mnist", N)
    assert block["suite"]["fingerprint"] == suite_fingerprint(suite) and block["suite"]["num_tasks"] == TASKS
    assert block["suite"]["classes"] == suite.classes.tolist()
    hyper = np.asarray(block["methods"]["hypernet"]["acc_steps"])
    assert hyper.shape == (1, TASKS, STEPS + 1) and np.all((hyper >= 1 / K) & (hyper <= 1))
    for name in (m.name for m in baselines()):
        acc = np.asarray(block["methods"][name]["acc"])
        assert acc.shape == (1, TASKS) and np.asarray(block["methods"][name]["seconds"]).shape == (1, TASKS)
    assert np.mean(block["methods"]["kmeans_pixels"]["acc"]) > 0.9  # the tiny mirror's classes are bars at angles
    adapted = next(r for r in block["summary"] if r["method"] == "hypernet_adapted")
    assert adapted["accuracy"] == pytest.approx(hyper[0, :, -1].mean())
    assert load_results("zero_shot") == result
    seen = []

    def spy(score):
        def record(*args):
            seen.append(suite_fingerprint(next(a for a in args if hasattr(a, "indices"))))
            return score(*args)
        return record

    monkeypatch.setattr(evaluate_module, "score_hypernet", spy(evaluate_module.score_hypernet))
    monkeypatch.setattr(evaluate_module, "score_baseline", spy(evaluate_module.score_baseline))
    monkeypatch.setattr(evaluate_module, "_PIXEL_SCORES", {})  # pixel scores are kept per process: start empty
    again = evaluate(trained, [ckpt[("zero_shot", 0)]], tmp_path / "again.json")  # computed anew
    assert len(seen) == 1 + len(baselines()) and set(seen) == {suite_fingerprint(suite)}
    for name, scores in block["methods"].items():
        key = "acc_steps" if name == "hypernet" else "acc"
        assert block_of(again)["methods"][name][key] == scores[key], name
    np.testing.assert_array_equal(per_task_accuracy(result, N, "hypernet_adapted"), hyper[0, :, -1])
    with pytest.raises(EvalError, match="no method 'nope'"):
        per_task_accuracy(result, N, "nope")


def test_zero_test_time_steps_score_the_unadapted_hypernetwork(trained, ckpt):
    """Scoring after 0 steps gives exactly the first column of a scoring after every step."""
    bundle = load_bundle(ckpt[("zero_shot", 0)])
    inputs = seed_inputs(bundle, trained.cfg, "mnist")
    suite = build_suite(trained.cfg, "mnist", N)
    acc, seconds = score_hypernet(bundle, trained.cfg, inputs, suite, None)
    assert acc.shape == (TASKS, STEPS + 1) and seconds.shape == (TASKS,) and np.all(seconds > 0)
    zero, _ = score_hypernet(bundle, trained.cfg, inputs, suite, 0)
    assert zero.shape == (TASKS, 1)
    np.testing.assert_array_equal(zero[:, 0], acc[:, 0])
    np.testing.assert_array_equal(score_hypernet(bundle, trained.cfg, inputs, suite, None)[0], acc)
    cached = np.asarray(block_of(evaluate(trained, [ckpt[("zero_shot", 0)]]))["methods"]["hypernet"]["acc_steps"])[0]
    np.testing.assert_array_equal(cached, acc)


def test_settings_share_one_suite(trained, ckpt):
    """Zero-shot and transductive checkpoints are scored on identical tasks."""
    zero = evaluate(trained, [ckpt[("zero_shot", 0)]])
    trans = evaluate(trained, [ckpt[("transductive", 0)]])
    assert (zero["setting"], trans["setting"]) == ("zero_shot", "transductive")
    assert block_of(zero)["suite"] == block_of(trans)["suite"]
    assert zero["setting_label"] != trans["setting_label"]


def test_scores_are_aggregated_over_replicate_seeds(trained, ckpt, tmp_path):
    """Two seeds: each is scored through its own models; rows average tasks over seeds; pixels are scored once."""
    result = evaluate(trained, [ckpt[("zero_shot", 0)], ckpt[("zero_shot", 1)]], tmp_path / "e.json")
    assert result["seeds"] == [0, 1]
    block = block_of(result)
    hyper = np.asarray(block["methods"]["hypernet"]["acc_steps"])
    assert hyper.shape == (2, TASKS, STEPS + 1)
    assert np.asarray(block["methods"]["kmeans_embedding"]["acc"]).shape == (2, TASKS)
    assert np.asarray(block["methods"]["kmeans_pixels"]["acc"]).shape == (1, TASKS)  # the same pixels for every seed
    one = block_of(evaluate(trained, [ckpt[("zero_shot", 0)]]))  # seed 0 alone (cached)
    assert one["methods"]["hypernet"]["acc_steps"][0] == block["methods"]["hypernet"]["acc_steps"][0]
    assert one["methods"]["kmeans_latent"]["acc"][0] == block["methods"]["kmeans_latent"]["acc"][0]
    assert one["methods"]["kmeans_pixels"]["acc"] == block["methods"]["kmeans_pixels"]["acc"]
    rows = {r["method"]: r for r in block["summary"]}
    adapted = rows["hypernet_adapted"]
    assert adapted["num_seeds"] == 2 and adapted["seed_means"] == pytest.approx(hyper[:, :, -1].mean(1))
    assert adapted["accuracy"] == pytest.approx(hyper[:, :, -1].mean())
    diff = hyper[:, :, -1].mean(0) - np.asarray(block["methods"]["kmeans_embedding"]["acc"]).mean(0)
    assert adapted["vs"]["kmeans_embedding"]["mean"] == pytest.approx(diff.mean())
    assert "seed sd" in markdown_table(result)


def test_duplicated_or_mismatched_checkpoints_are_refused(trained, ckpt, tmp_path):
    """Each replicate once: the same file twice, a copy of it, two checkpoints of one seed or of two settings fail."""
    zero = ckpt[("zero_shot", 0)]
    with pytest.raises(EvalError, match="same checkpoint"):
        load_bundles([zero, zero])
    copy = tmp_path / "copy.pt"
    shutil.copy(zero, copy)
    with pytest.raises(EvalError, match="same checkpoint"):
        load_bundles([zero, copy])
    state, meta = load_checkpoint(zero)
    state["best_model"] = {k: v + 0.01 for k, v in state["best_model"].items()}
    save_checkpoint(tmp_path / "other.pt", state, meta)
    with pytest.raises(EvalError, match="two checkpoints of replicate seed 0"):
        evaluate(trained, [zero, tmp_path / "other.pt"], tmp_path / "e.json")
    with pytest.raises(EvalError, match="mix settings"):
        load_bundles([ckpt[("zero_shot", 1)], ckpt[("transductive", 0)]])
    with pytest.raises(ArtifactError, match="checkpoint not found"):
        load_bundles([tmp_path / "missing.pt"])
    with pytest.raises(EvalError, match="no checkpoint"):
        load_bundles([])
    assert not (tmp_path / "e.json").exists()


def test_results_are_cached_and_recomputed_when_inputs_change(trained, ckpt, tiny_mirror, tmp_path, capsys,
                                                              monkeypatch):
    """A matching result is reused as it is; other settings, another checkpoint or other images recompute it."""
    path, zero = default_results_path("zero_shot"), ckpt[("zero_shot", 0)]
    first = json.loads(path.read_text())  # written by the fixture
    reused = evaluate(trained, [zero])
    assert "Reusing evaluation results" in capsys.readouterr().out
    assert reused == first  # timings come from the file, not a rerun

    fewer = evaluate_setting(tiny_config(eval={"num_tasks": TASKS - 1}), [zero], dataset="mnist", path=path,
                             progress=False)
    out = capsys.readouterr().out
    assert "Recomputing" in out and "num_tasks" in out
    assert block_of(fewer)["suite"]["num_tasks"] == TASKS - 1

    state, meta = load_checkpoint(zero)
    state["best_model"] = {k: v * 1.5 for k, v in state["best_model"].items()}
    save_checkpoint(zero, state, meta)  # the same name, other weights
    evaluate(trained, [zero], path)
    out = capsys.readouterr().out
    assert "Recomputing" in out and "checkpoints" in out
    evaluate(trained, [zero], path)
    assert "Reusing" in capsys.readouterr().out

    mirror = tmp_path / "mirror"
    shutil.copytree(tiny_mirror, mirror)
    write_tiny_dataset(mirror, "mnist", seed=77)  # other images under the same name
    monkeypatch.setenv("HMLIB_DATA_DIR", str(mirror))
    changed = evaluate(trained, [zero], path)
    out = capsys.readouterr().out
    assert "Recomputing" in out and "inputs" in out
    assert block_of(changed)["suite"]["num_tasks"] == TASKS

    path.write_text("{not json")
    evaluate(trained, [zero], path)
    assert "corrupt" in capsys.readouterr().out


def test_adding_a_baseline_is_one_register_call(trained, ckpt, monkeypatch, capsys):
    """register(Method(...)) with a new clusterer makes it a row of the evaluation table, under its label."""
    evaluate(trained, [ckpt[("zero_shot", 0)]])
    assert "Reusing" in capsys.readouterr().out
    monkeypatch.setitem(METHODS, "ward_embedding", None)  # removed again after the test
    register(Method("ward_embedding", "Ward clustering on the backbone embedding", "#123456", "embedding",
                    lambda x, k, seed, n_init: AgglomerativeClustering(n_clusters=k).fit_predict(x), normalize=True))
    assert methods.METHODS["ward_embedding"].label == "Ward clustering on the backbone embedding"
    result = evaluate(trained, [ckpt[("zero_shot", 0)]])
    assert "Recomputing" in capsys.readouterr().out  # a new method makes the cached result stale
    block = block_of(result)
    assert np.asarray(block["methods"]["ward_embedding"]["acc"]).shape == (1, TASKS)
    rows = {r["method"]: r for r in block["summary"]}
    assert rows["ward_embedding"]["label"] == "Ward clustering on the backbone embedding"
    assert "ward_embedding" in rows["hypernet_adapted"]["vs"]
    assert "| Ward clustering on the backbone embedding |" in markdown_table(result)


# ---------------------------------------------------------------------------------------------- bundles

def test_checkpoints_bundle_the_models_they_read_through(trained, ckpt):
    """Zero-shot checkpoints carry the shared VAE and the backbone; transductive ones the backbone only."""
    cfg = trained.cfg
    zero, trans = load_bundle(ckpt[("zero_shot", 0)]), load_bundle(ckpt[("transductive", 0)])
    assert zero.setting == "zero_shot" and zero.cfg == cfg and zero.meta["seed"] == 0
    vae, vae_meta = get_vae(cfg, "shared", 0, train=False, progress=False, verbose=False)
    assert zero.vae_meta["vae_id"] == vae_meta["vae_id"] and "path" not in zero.vae_meta
    for key, value in vae.state_dict().items():
        assert torch.equal(zero.vae.state_dict()[key], value)
    expected = bundle_for(cfg, "zero_shot", 0)
    assert set(expected) == {"vae", "backbone"} and zero.backbone_meta == expected["backbone"]["meta"]
    assert trans.vae is None and trans.backbone is not None
    assert set(bundle_for(cfg, "transductive", 0)) == {"backbone"}
    assert zero.hypernet.context_dim == 2 * cfg.vae.latent_dim and zero.hypernet.feature_dim == cfg.backbone.embed_dim


# --------------------------------------------------------------------------------------------- hmlib eval

def test_hmlib_eval_end_to_end(trained, ckpt, tmp_path, capsys):
    """``hmlib eval`` scores a checkpoint on a dataset, prints the table and writes JSON + markdown."""
    out = tmp_path / "out" / "mnist.json"
    code = cli.main(["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", "mnist", "--json", str(out),
                     "--tasks", "3", "--n", str(N), "--steps", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and out.with_suffix(".md").is_file()
    result = load_results("zero_shot", out)
    assert result["dataset"] == "mnist" and block_of(result)["suite"]["num_tasks"] == 3
    assert np.asarray(block_of(result)["methods"]["hypernet"]["acc_steps"]).shape == (1, 3, 2)
    assert "hypernetwork + 1 inner steps" in printed and "k-means on raw pixels" in printed
    assert "zero_shot" in printed and str(out) in printed
    assert cli.main(["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", "mnist", "--json", str(out),
                     "--tasks", "3", "--n", str(N), "--quiet"]) == 0  # an earlier result may be replaced


def test_hmlib_eval_honours_a_test_time_config_and_refuses_model_changes(trained, ckpt, tmp_path, capsys):
    """--config may change adapt.* (the table shows the new step count); a model section is refused."""
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"adapt": {"num_inner_steps": 3}}))
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", "mnist", "--config",
                     str(steps), "--json", str(out), "--tasks", "2", "--n", str(N), "--quiet"]) == 0
    assert "hypernetwork + 3 inner steps" in capsys.readouterr().out
    assert load_results("zero_shot", out)["identity"]["adapt"]["num_inner_steps"] == 3
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"hyper": {"embed_dim": 4}}))
    message = refused(["--checkpoint", ckpt[("zero_shot", 0)], "--dataset", "mnist", "--config", model], capsys)
    assert "hyper" in message and "fixed by the checkpoint" in message


def test_config_for_checkpoint_keeps_model_settings(tmp_path):
    """Model sections come from the checkpoint; data/eval from the profile (default: the checkpoint's); adapt from
    the checkpoint, then --config."""
    trained = tiny_config(adapt={"inner_lr": 0.123})
    meta = {"config": config_to_dict(trained)}
    same = config_for_checkpoint(meta)
    assert same.profile == "smoke" and same.eval == load_config("smoke").eval and same.adapt == trained.adapt
    cfg = config_for_checkpoint(meta, profile="default", overrides={"eval": {"num_tasks": 7}})  # a one-seed checkpoint
    assert (cfg.hyper, cfg.vae, cfg.backbone, cfg.task, cfg.meta) == (trained.hyper, trained.vae, trained.backbone,
                                                                     trained.task, trained.meta)
    assert cfg.adapt.inner_lr == 0.123 and cfg.eval.num_tasks == 7 and cfg.data.max_images_per_split is None
    adapt = tmp_path / "adapt.json"
    adapt.write_text(json.dumps({"adapt": {"num_inner_steps": 9}}))
    tuned = config_for_checkpoint(meta, config_path=adapt)
    assert tuned.adapt.num_inner_steps == 9 and tuned.adapt.inner_lr == 0.123
    with pytest.raises(EvalError, match="records no config"):
        config_for_checkpoint({})


def test_hmlib_eval_refuses_bad_arguments(trained, ckpt, tmp_path, capsys):
    """Path-like dataset names, --tasks 1, unknown datasets, missing folders and files are refused with a reason."""
    zero = ckpt[("zero_shot", 0)]
    for name in ("../mnist", "a/b", "/etc"):
        assert "invalid --dataset name" in refused(["--checkpoint", zero, "--dataset", name], capsys)
    assert "expected an integer >= 2" in refused(["--checkpoint", zero, "--dataset", "mnist", "--tasks", "1"], capsys)
    message = refused(["--checkpoint", zero, "--dataset", "nope"], capsys)
    assert "unknown dataset 'nope'" in message and "mnist" in message and "--data-dir" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no train.parquet" in refused(["--checkpoint", zero, "--dataset", "nope", "--data-dir", empty], capsys)
    assert "is not a folder" in refused(["--checkpoint", zero, "--dataset", "mnist", "--data-dir", tmp_path / "x"],
                                        capsys)
    assert "checkpoint not found" in refused(["--checkpoint", tmp_path / "missing.pt", "--dataset", "mnist"], capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "corrupt" in refused(["--checkpoint", garbage, "--dataset", "mnist"], capsys)


def test_hmlib_eval_never_overwrites_a_file_it_did_not_write(trained, ckpt, tmp_path, capsys):
    """--json (or the .md beside it) naming an existing file that is not an evaluation result needs --overwrite."""
    zero = ckpt[("zero_shot", 0)]
    args = ["--checkpoint", zero, "--dataset", "mnist", "--tasks", "2", "--n", str(N), "--quiet"]
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    assert "--overwrite" in refused([*args, "--json", notes], capsys)
    assert notes.read_text() == '{"mine": true}'
    table = tmp_path / "fresh.md"
    table.write_text("my notes")
    assert "--overwrite" in refused([*args, "--json", tmp_path / "fresh.json"], capsys)
    assert table.read_text() == "my notes" and not (tmp_path / "fresh.json").exists()
    assert cli.main(["eval", *map(str, args), "--json", str(notes), "--overwrite"]) == 0
    assert load_results("zero_shot", notes)["dataset"] == "mnist"


def test_hmlib_eval_on_a_never_seen_mirror_folder(trained, ckpt, tmp_path, capsys):
    """An unregistered dataset in a local mirror folder is evaluated with --data-dir."""
    extra = tmp_path / "extra"
    write_tiny_dataset(extra, "toy", seed=5)
    out = tmp_path / "toy.json"
    assert cli.main(["eval", "--checkpoint", str(ckpt[("zero_shot", 0)]), "--dataset", "toy", "--data-dir",
                     str(extra), "--json", str(out), "--tasks", "2", "--n", str(N), "--quiet"]) == 0
    result = load_results("zero_shot", out)
    assert result["dataset"] == "toy"
    assert np.asarray(block_of(result)["methods"]["kmeans_pixels"]["acc"]).shape == (1, 2)


def test_a_zero_shot_checkpoint_evaluates_in_a_fresh_home(trained, ckpt, tmp_path, monkeypatch, capsys):
    """The checkpoint alone is enough zero-shot (it bundles the VAE and backbone); nothing is trained."""
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(ckpt[("zero_shot", 0)], moved)
    fresh = tmp_path / "fresh_home"
    fresh.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(fresh))
    out = tmp_path / "e.json"
    assert cli.main(["eval", "--checkpoint", str(moved), "--dataset", "mnist", "--json", str(out), "--tasks", "2",
                     "--n", str(N), "--quiet"]) == 0
    assert np.asarray(block_of(load_results("zero_shot", out))["methods"]["hypernet"]["acc_steps"]).shape[1] == 2
    assert not (fresh / "models").exists()


def test_a_transductive_checkpoint_in_a_fresh_home_names_the_missing_vae(trained, ckpt, tmp_path, monkeypatch, capsys):
    """Transductive evaluation reads the dataset's own VAE from models/: absent, one MissingArtifactError names it."""
    moved = tmp_path / "model.pt"
    shutil.copy(ckpt[("transductive", 0)], moved)
    fresh = tmp_path / "fresh_home"
    fresh.mkdir()
    monkeypatch.setenv("HMLIB_HOME", str(fresh))
    code = cli.main(["eval", "--checkpoint", str(moved), "--dataset", "mnist", "--json", str(tmp_path / "e.json"),
                     "--quiet"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("hmlib: error: ")
    message = lines[0].removeprefix("hmlib: error: ")
    assert message.startswith("VAE ") and "vae_mnist_d4_seed0" in message and "not found" in message
    assert "hmlib run --profile smoke --only 02" in message and not (fresh / "models").exists()


# --------------------------------------------------------------------------------------- other outputs

def test_results_paths_and_schema():
    """Results live in results/eval_<setting>.json; a result of another schema is stale."""
    assert default_results_path("zero_shot").name == "eval_zero_shot.json"
    with pytest.raises(EvalError, match="unknown setting"):
        default_results_path("few_shot")
    path = default_results_path("transductive")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"schema": "hmlib-eval/1"}))
    with pytest.raises(StaleArtifactError, match="schema"):
        load_results("transductive")


def test_evaluation_figures_from_results():
    """The table, bars and per-task scatter are drawn from summary rows and per-task accuracies."""
    rng = np.random.default_rng(1)
    result = synthetic_result(rng.uniform(0.5, 1, (1, 5, STEPS + 1)),
                              {"kmeans_embedding": rng.uniform(0.5, 1, (1, 5)), "logreg_embedding": np.ones((1, 5))})
    rows = summary_rows(result)
    kmeans = per_task_accuracy(result, N, "kmeans_embedding")
    figures = [plots.evaluation_table(rows, title="toy"), plots.accuracy_bars(rows, num_classes=K),
               plots.task_scatter(per_task_accuracy(result, N, "hypernet_adapted"), kmeans)]
    assert all(isinstance(fig, Figure) for fig in figures)
    assert len(figures[1].axes[0].patches) == len(rows)  # one bar per method and group
    with pytest.raises(ValueError, match="differ in shape"):
        plots.task_scatter(kmeans[:2], kmeans)
    plt.close("all")


def test_kmeans_quality_of_a_representation():
    """Notebook 02's quality check: k-means accuracy per random task, and a table row per representation."""
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
