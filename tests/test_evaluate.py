"""The evaluation protocol: the suite, the statistics, scoring a real (tiny) hypernetwork, results JSON and the CLI."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from hmlib import evaluate
from hmlib.artifacts import StaleArtifactError, save_checkpoint
from hmlib.config import AdaptConfig, HyperConfig, config_to_dict, load_config
from hmlib.evaluate import EvalInputs
from hmlib.hypernet import HyperNet
from hmlib.latents import LatentSet

NUM_CLASSES = 3
NUM_ALL_CLASSES = 5
PER_CLASS_TEST = 12
PER_CLASS_TRAIN = 20
NUM_TASKS = 4
NUM_IMAGES = 18
LATENT_DIM = 4
TINY_HYPER = {"embed_dim": 8, "head_hidden": 16, "target_hidden": [8], "num_context": 64}


def tiny_cfg(**eval_overrides):
    return load_config("smoke", overrides={
        "task": {"num_classes": NUM_CLASSES, "num_images": NUM_IMAGES},
        "hyper": TINY_HYPER,
        "adapt": {"num_inner_steps": 2},
        "meta": {"iterations": 2, "meta_batch_size": 2, "eval_every": 2, "eval_tasks": 2, "query_size": 8,
                 "val_fraction": 0.2},
        "eval": {"num_tasks": NUM_TASKS, "task_sizes": [NUM_IMAGES], "kmeans_n_init": 1,
                 "logreg_train_per_class": 8, **eval_overrides}})


def blob_latents(split: str, per_class: int, seed: int, vae_id: str = "vae-a") -> LatentSet:
    """Well-separated Gaussian blobs as VAE posteriors of NUM_ALL_CLASSES classes."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(NUM_ALL_CLASSES), per_class)
    rng.shuffle(labels)
    centres = np.random.default_rng(7).normal(size=(NUM_ALL_CLASSES, LATENT_DIM)) * 8
    mu = (centres[labels] + rng.normal(size=(len(labels), LATENT_DIM))).astype(np.float32)
    logvar = np.full_like(mu, -2.0)
    return LatentSet("toy", split, mu, logvar, labels.astype(np.int64), vae_id)


def synthetic_inputs(setting: str = "zero_shot", vae_id: str = "vae-a") -> EvalInputs:
    test = blob_latents("test", PER_CLASS_TEST, 1, vae_id)
    train = blob_latents("train", PER_CLASS_TRAIN, 2, vae_id)
    rng = np.random.default_rng(3)
    pixels = (rng.random((len(test.labels), 784)) * 0.2 + (test.labels[:, None] == np.arange(784) % 5) * 0.8)
    return EvalInputs("toy", setting, test, train, pixels.astype(np.float32), test.labels, "images-toy")


# --------------------------------------------------------------------------------------------- suite

def write_hub_parquet(path, labels: np.ndarray, seed: int) -> None:
    """A tiny split in the hub schema (PNG images + ClassLabel), as in the offline mirror."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in labels]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(NUM_ALL_CLASSES)])})
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features).to_parquet(str(path))


@pytest.fixture
def toy_mirror(tmp_path):
    """A mirror folder holding an unregistered dataset 'toy' whose train and test splits differ."""
    root = tmp_path / "mirror"
    test_labels = np.tile(np.arange(NUM_ALL_CLASSES), PER_CLASS_TEST)  # interleaved
    train_labels = np.repeat(np.arange(NUM_ALL_CLASSES)[::-1], PER_CLASS_TRAIN)  # blocks, reversed
    write_hub_parquet(root / "toy" / "test.parquet", test_labels, 0)
    write_hub_parquet(root / "toy" / "train.parquet", train_labels, 1)
    return root


def mirror_cfg(root, **eval_overrides):
    cfg = tiny_cfg(**eval_overrides)
    data = dataclasses.replace(cfg.data, data_dir=str(root), custom_datasets={"toy": str(root / "toy")},
                               max_images_per_split=None)
    return dataclasses.replace(cfg, data=data)


def test_suite_is_deterministic_seeded_and_from_the_test_split(toy_mirror):
    from hmlib.data import load_split

    cfg = mirror_cfg(toy_mirror)
    suite = evaluate.build_suite(cfg, "toy", NUM_IMAGES)
    again = evaluate.build_suite(cfg, "toy", NUM_IMAGES)
    assert suite.indices.shape == suite.labels.shape == (NUM_TASKS, NUM_IMAGES)
    assert suite.classes.shape == (NUM_TASKS, NUM_CLASSES)
    for a, b in ((suite.indices, again.indices), (suite.labels, again.labels), (suite.classes, again.classes)):
        np.testing.assert_array_equal(a, b)
    test_labels = load_split("toy", "test", cfg.data, progress=False).labels
    assert suite.indices.max() < len(test_labels)
    # every index points at a test image of the class its task label names
    np.testing.assert_array_equal(test_labels[suite.indices], np.take_along_axis(suite.classes, suite.labels, 1))

    other_seed = evaluate.build_suite(mirror_cfg(toy_mirror, seed=99), "toy", NUM_IMAGES)
    assert evaluate.suite_fingerprint(other_seed) != evaluate.suite_fingerprint(suite)
    assert evaluate.suite_seed(1234, "toy", 64) != evaluate.suite_seed(1234, "toy", 256)
    assert evaluate.suite_seed(1234, "toy", 64) == evaluate.suite_seed(1234, "toy", 64)


# ---------------------------------------------------------------------------------------- statistics

def test_ci_math_on_known_values():
    stats = evaluate.summarize(np.array([0.2, 0.4, 0.6]))
    # t(0.975, df=2) = 4.302653; sd = 0.2; half-width = 4.302653 * 0.2 / sqrt(3)
    assert stats["mean"] == pytest.approx(0.4) and stats["n"] == 3
    assert stats["ci"] == pytest.approx(4.302653 * 0.2 / np.sqrt(3), rel=1e-5)

    gain = evaluate.paired_gain(np.array([0.5, 0.7, 0.9]), np.array([0.4, 0.5, 0.6]))
    assert gain["mean"] == pytest.approx(0.2)
    assert gain["ci"] == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert gain["excludes_zero"] is False and gain["share_improved"] == 1.0
    # the same marginal means, paired: a constant +0.1 gain on every task has a zero-width interval
    steady = evaluate.paired_gain(np.array([0.5, 0.6, 0.7]), np.array([0.4, 0.5, 0.6]))
    assert steady["mean"] == pytest.approx(0.1) and steady["ci"] == pytest.approx(0.0, abs=1e-12)
    assert steady["excludes_zero"] is True
    with pytest.raises(ValueError, match="matching shapes"):
        evaluate.paired_gain(np.ones(3), np.ones(4))

    seeds = evaluate.aggregate_seeds(np.array([[0.5, 0.6, 0.7], [0.7, 0.8, 0.9]]))
    assert seeds["mean"] == pytest.approx(0.7) and seeds["num_seeds"] == 2
    assert seeds["seed_means"] == pytest.approx([0.6, 0.8])
    assert seeds["seed_std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert seeds["ci"] == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)  # over per-task seed means


# ---------------------------------------------------------------------------------------- hypernet

def test_score_hypernet_runs_every_step_and_zero_steps_is_unadapted():
    torch.manual_seed(0)
    hypernet = HyperNet(HyperConfig(**{**TINY_HYPER, "target_hidden": (8,)}), LATENT_DIM, NUM_CLASSES)
    inputs = synthetic_inputs()
    suite = evaluate.suite_from_labels(inputs.labels, tiny_cfg(), "toy", NUM_IMAGES)
    adapt_cfg = AdaptConfig(num_inner_steps=2)
    scores = evaluate.score_hypernet(hypernet, adapt_cfg, inputs.test.mu, inputs.test.logvar, suite,
                                     pixels=inputs.pixels, progress=False)
    assert scores.acc_steps.shape == (NUM_TASKS, 3) and scores.seconds.shape == (NUM_TASKS,)
    assert np.all((scores.acc_steps >= 1 / NUM_CLASSES) & (scores.acc_steps <= 1.0))
    assert np.all(scores.seconds > 0)
    zero = evaluate.score_hypernet(hypernet, adapt_cfg, inputs.test.mu, inputs.test.logvar, suite,
                                   num_steps=0, progress=False)
    assert zero.acc_steps.shape == (NUM_TASKS, 1)
    np.testing.assert_array_equal(zero.acc_steps[:, 0], scores.acc_steps[:, 0])
    again = evaluate.score_hypernet(hypernet, adapt_cfg, inputs.test.mu, inputs.test.logvar, suite,
                                    pixels=inputs.pixels, progress=False)
    np.testing.assert_array_equal(again.acc_steps, scores.acc_steps)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A real (briefly) meta-trained hypernetwork on synthetic blobs, recorded as zero-shot on VAE 'vae-a'."""
    from hmlib.metatrain import fit_hypernet

    train_sets = {"blobs": blob_latents("train", 60, 11)}
    path = tmp_path / "hypernet_zero_shot_seed0.pt"
    fit_hypernet(tiny_cfg(), train_sets, seed=0, path=path, upstream={"vae_ids": {"blobs": "vae-a"}},
                 setting="zero_shot", progress=False)
    return path


# ----------------------------------------------------------------------------------- results JSON

def test_evaluate_setting_writes_reuses_and_detects_stale_results(tmp_path, tiny_checkpoint, capsys):
    cfg = tiny_cfg()
    path = tmp_path / "eval_zero_shot.json"
    inputs = synthetic_inputs()
    result = evaluate.evaluate_setting(cfg, "zero_shot", [tiny_checkpoint], dataset="toy", path=path,
                                       inputs=inputs, progress=False)
    assert path.is_file() and path.with_suffix(".md").is_file()
    block = result["sizes"][str(NUM_IMAGES)]
    assert set(block["methods"]) == {"hypernet", "kmeans_latent", "gmm_latent", "kmeans_pixels", "logreg_ceiling"}
    for name in ("kmeans_latent", "gmm_latent", "kmeans_pixels", "logreg_ceiling"):
        assert len(block["methods"][name]["acc"]) == len(block["methods"][name]["seconds"]) == NUM_TASKS
        assert np.mean(block["methods"][name]["acc"]) > 0.9  # separated blobs
    assert np.asarray(block["methods"]["hypernet"]["acc_steps"]).shape == (1, NUM_TASKS, 3)
    suite = evaluate.suite_from_labels(inputs.labels, cfg, "toy", NUM_IMAGES)
    assert block["suite"]["fingerprint"] == evaluate.suite_fingerprint(suite)
    methods = {row["method"] for row in block["summary"]}
    assert {"hypernet", "hypernet_adapted", "logreg_ceiling"} <= methods
    adapted = next(row for row in block["summary"] if row["method"] == "hypernet_adapted")
    acc = np.asarray(block["methods"]["hypernet"]["acc_steps"])[0]
    assert adapted["accuracy"] == pytest.approx(acc[:, -1].mean())
    assert adapted["gain"] == pytest.approx((acc[:, -1] - acc[:, 0]).mean())
    flat = evaluate.headline_rows(result)
    assert len(flat) == len(block["summary"])
    assert all(isinstance(v, (str, int)) for row in flat for v in row.values())  # record_headline takes scalars
    table = evaluate.markdown_table(result)
    assert table.count("\n") == 2 + len(block["summary"]) - 1 and "zero_shot" in table

    # round trip: the file holds exactly what was returned, and a same-settings call reuses it
    assert evaluate.load_results("zero_shot", path) == json.loads(json.dumps(result))
    capsys.readouterr()
    reused = evaluate.evaluate_setting(cfg, "zero_shot", [tiny_checkpoint], dataset="toy", path=path,
                                       inputs=inputs, progress=False)
    assert "Reusing" in capsys.readouterr().out
    assert reused["sizes"][str(NUM_IMAGES)]["methods"]["kmeans_latent"]["seconds"] == \
        block["methods"]["kmeans_latent"]["seconds"]  # timings come from the file, not a rerun

    # other settings, or other latents, make it stale: recomputed, and deterministic for the seed
    fewer = evaluate.evaluate_setting(tiny_cfg(num_tasks=NUM_TASKS - 1), "zero_shot", [tiny_checkpoint],
                                      dataset="toy", path=path, inputs=inputs, progress=False)
    out = capsys.readouterr().out
    assert "Recomputing" in out and "num_tasks" in out
    assert fewer["sizes"][str(NUM_IMAGES)]["suite"]["num_tasks"] == NUM_TASKS - 1
    fresh = evaluate.evaluate_setting(cfg, "zero_shot", [tiny_checkpoint], dataset="toy", path=path,
                                      inputs=inputs, progress=False)
    assert "Recomputing" in capsys.readouterr().out
    for name in ("kmeans_latent", "gmm_latent", "kmeans_pixels", "logreg_ceiling"):
        assert fresh["sizes"][str(NUM_IMAGES)]["methods"][name]["acc"] == block["methods"][name]["acc"]
    assert fresh["sizes"][str(NUM_IMAGES)]["methods"]["hypernet"]["acc_steps"] == \
        block["methods"]["hypernet"]["acc_steps"]

    # only the hypernetwork side changed (fewer test-time steps): baselines come from the file, unchanged
    one_step = evaluate.evaluate_setting(cfg, "zero_shot", [tiny_checkpoint], dataset="toy", path=path, num_steps=1,
                                         inputs=inputs, progress=False)
    assert "reusing the baseline scores" in capsys.readouterr().out
    one_block = one_step["sizes"][str(NUM_IMAGES)]["methods"]
    assert one_block["kmeans_latent"] == fresh["sizes"][str(NUM_IMAGES)]["methods"]["kmeans_latent"]
    assert np.asarray(one_block["hypernet"]["acc_steps"]).shape == (1, NUM_TASKS, 2)

    path.write_text("{not json")
    evaluate.evaluate_setting(cfg, "zero_shot", [tiny_checkpoint], dataset="toy", path=path, inputs=inputs,
                              progress=False)
    assert "corrupt" in capsys.readouterr().out


def test_hypernet_refuses_latents_of_another_vae(tmp_path, tiny_checkpoint):
    with pytest.raises(StaleArtifactError, match="vae-b"):
        evaluate.evaluate_setting(tiny_cfg(), "zero_shot", [tiny_checkpoint], dataset="toy",
                                  path=tmp_path / "e.json", inputs=synthetic_inputs(vae_id="vae-b"), progress=False)
    with pytest.raises(evaluate.EvalError, match="setting"):
        evaluate.evaluate_setting(tiny_cfg(), "transductive", [tiny_checkpoint], dataset="toy",
                                  path=tmp_path / "e.json", inputs=synthetic_inputs("transductive"), progress=False)


def test_settings_share_one_suite_and_baselines_only_runs(tmp_path):
    cfg = tiny_cfg()
    results = {setting: evaluate.evaluate_setting(cfg, setting, dataset="toy", path=tmp_path / f"{setting}.json",
                                                  inputs=synthetic_inputs(setting), progress=False)
               for setting in evaluate.SETTINGS}
    fingerprints = {r["sizes"][str(NUM_IMAGES)]["suite"]["fingerprint"] for r in results.values()}
    assert len(fingerprints) == 1
    assert "hypernet" not in results["zero_shot"]["sizes"][str(NUM_IMAGES)]["methods"]
    with pytest.raises(evaluate.EvalError, match="unknown setting"):
        evaluate.evaluate_setting(cfg, "few_shot", dataset="toy", inputs=synthetic_inputs(), progress=False)


def test_evaluation_figures_from_results(tmp_path):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from hmlib.plots import evaluation as plots

    result = evaluate.evaluate_setting(tiny_cfg(), "zero_shot", dataset="toy", path=tmp_path / "e.json",
                                       inputs=synthetic_inputs(), progress=False)
    rows = evaluate.summary_rows(result)
    kmeans = evaluate.per_task_accuracy(result, NUM_IMAGES, "kmeans_latent")
    assert kmeans.shape == (NUM_TASKS,)
    with pytest.raises(evaluate.EvalError, match="no hypernetwork"):
        evaluate.per_task_accuracy(result, NUM_IMAGES, "hypernet_adapted")
    figures = [plots.evaluation_table(rows, title="toy"), plots.accuracy_bars(rows, num_classes=NUM_CLASSES),
               plots.task_scatter(evaluate.per_task_accuracy(result, NUM_IMAGES, "gmm_latent"), kmeans)]
    assert all(isinstance(fig, Figure) for fig in figures)
    assert len(figures[1].axes[0].patches) == len(rows)  # one bar per method and group
    with pytest.raises(ValueError, match="differ in shape"):
        plots.task_scatter(kmeans[:2], kmeans)
    for fig in figures:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- CLI

def fake_hypernet_checkpoint(path, setting="zero_shot"):
    """A well-formed hmlib checkpoint with a hypernetwork's meta (enough for argument validation)."""
    save_checkpoint(path, {}, {"kind": "hypernet", "setting": setting, "seed": 0,
                               "config": config_to_dict(load_config("smoke"))})
    return path


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["eval", *args])
    return exit_info.value.code, capsys.readouterr().err


def test_cli_argument_errors_are_clear(tmp_path, capsys):
    code, err = run_cli(["--checkpoint", str(tmp_path / "missing.pt"), "--dataset", "mnist"], capsys)
    assert code == 2 and "checkpoint not found" in err and "missing.pt" in err

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    code, err = run_cli(["--checkpoint", str(garbage), "--dataset", "mnist"], capsys)
    assert code == 2 and "corrupt" in err

    ckpt = fake_hypernet_checkpoint(tmp_path / "hypernet_zero_shot_seed0.pt")
    code, err = run_cli(["--checkpoint", str(ckpt), "--dataset", "nope"], capsys)
    assert code == 2 and "unknown dataset 'nope'" in err and "mnist" in err and "--data-dir" in err

    empty = tmp_path / "mirror"
    empty.mkdir()
    code, err = run_cli(["--checkpoint", str(ckpt), "--dataset", "nope", "--data-dir", str(empty)], capsys)
    assert code == 2 and "holds no train.parquet" in err

    code, err = run_cli(["--checkpoint", str(ckpt), "--dataset", "mnist", "--data-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "is not a folder" in err

    code, err = run_cli(["--checkpoint", str(ckpt), "--dataset", "mnist", "--tasks", "0"], capsys)
    assert code == 2 and "positive integer" in err

    other = fake_hypernet_checkpoint(tmp_path / "hypernet_transductive_seed0.pt", "transductive")
    code, err = run_cli(["--checkpoint", str(ckpt), str(other), "--dataset", "mnist"], capsys)
    assert code == 2 and "one setting" in err


def test_config_for_checkpoint_keeps_model_settings_and_takes_data_settings():
    trained = load_config("smoke", overrides={"hyper": TINY_HYPER, "adapt": {"inner_lr": 0.123}})
    meta = {"config": config_to_dict(trained)}
    same = evaluate.config_for_checkpoint(meta)
    assert same == trained
    other = evaluate.config_for_checkpoint(meta, profile="default", overrides={"eval": {"num_tasks": 7}})
    assert other.adapt.inner_lr == 0.123 and other.hyper == trained.hyper
    assert other.eval.num_tasks == 7 and other.data.max_images_per_split is None  # default profile's data


@pytest.mark.slow
def test_cli_end_to_end_on_a_never_seen_mirror_folder(tmp_path, capsys):
    """Tiny protocol: shared VAE + meta-training on mirror copies, then ``hmlib eval`` on an unregistered folder."""
    from hmlib.metatrain import meta_train

    mirror = tmp_path / "mirror"
    labels = np.repeat(np.arange(2), 60)
    for i, name in enumerate(("fashion_mnist", "hebrew_chars", "math_shapes", "mnist", "toy")):
        for j, split in enumerate(("train", "test")):
            write_hub_parquet(mirror / name / f"{split}.parquet", labels, 10 * i + j)
    cfg = load_config("smoke", overrides={
        "data": {"data_dir": str(mirror), "max_images_per_split": None},
        "task": {"num_classes": 2, "num_images": 16},
        "vae": {"latent_dim": LATENT_DIM, "epochs": 1, "batch_size": 32, "max_train_images": 120},
        "hyper": TINY_HYPER,
        "meta": {"iterations": 2, "meta_batch_size": 2, "eval_every": 2, "eval_tasks": 2, "query_size": 8,
                 "val_fraction": 0.3},
        "eval": {"num_tasks": 3, "task_sizes": [16], "kmeans_n_init": 1, "logreg_train_per_class": 10}})
    checkpoint = meta_train(cfg, "zero_shot", 0, progress=False).checkpoint_path
    out = tmp_path / "out" / "toy_eval.json"
    capsys.readouterr()
    code = evaluate.main(["eval", "--checkpoint", str(checkpoint), "--dataset", "toy", "--data-dir", str(mirror),
                          "--json", str(out), "--steps", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and out.is_file() and out.with_suffix(".md").is_file()
    result = evaluate.load_results("zero_shot", out)
    assert result["dataset"] == "toy" and result["config"]["data"]["custom_datasets"]["toy"] == str(mirror / "toy")
    assert np.asarray(result["sizes"]["16"]["methods"]["hypernet"]["acc_steps"]).shape == (1, 3, 2)
    assert "k-means on raw pixels" in printed and "zero_shot" in printed
