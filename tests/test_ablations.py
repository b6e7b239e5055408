"""Ablations: scoring every step, paired differences, the JSON cache, generated conclusions, the specs."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hmlib import ablations
from hmlib.ablations import AblationResult, Variant
from hmlib.config import ConfigError, HyperConfig, load_config
from hmlib.metrics import clustering_accuracy, mean_ci

TASKS, N, K, STEPS, LATENT_DIM = 40, 30, 3, 4, 4
TINY_HYPER = {"embed_dim": 8, "head_hidden": 16, "target_hidden": [8], "num_seeds": 2, "num_heads": 2}


def fake_curves(seed: int, shift: float, noise: float = 0.02, rising: bool = False) -> np.ndarray:
    """(TASKS, STEPS+1) accuracies around 0.5 + shift (task difficulty shared across variants via the seed 0)."""
    difficulty = np.random.default_rng(0).uniform(0.4, 0.6, TASKS)[:, None]
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 0.1, STEPS + 1)[None] if rising else 0.0
    return np.clip(difficulty + shift + ramp + rng.normal(0, noise, (TASKS, STEPS + 1)), 0, 1)


def make_result(key: str = "toy", reference: str | None = "ref", **curves: np.ndarray) -> AblationResult:
    curves = curves or {"ref": fake_curves(1, 0.0), "better": fake_curves(2, 0.1), "same": fake_curves(3, 0.0)}
    variants = [{"label": k, "dataset": "mnist", "setting": "zero_shot", "num_steps": STEPS, "task_size": N}
                for k in curves]
    kmeans = {"mnist/zero_shot": {"kmeans_latent": fake_curves(9, 0.05)[:, 0]}}
    return AblationResult(key=key, title="Toy ablation", question="Does it work?", reference=reference,
                          variants=variants, acc=dict(curves), baselines=kmeans, meta={"config": {"a": 1}})


# ------------------------------------------------------------------------------------------- scoring

def test_step_accuracies_match_hungarian_accuracy_per_task_and_step():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(STEPS + 1, 5, N, K, generator=gen)
    labels = np.random.default_rng(0).integers(0, K, (5, N))
    acc = ablations.step_accuracies(logits, labels)
    assert acc.shape == (5, STEPS + 1)
    expected = [[clustering_accuracy(logits[s, t].argmax(-1).numpy(), labels[t], K) for s in range(STEPS + 1)]
                for t in range(5)]
    np.testing.assert_allclose(acc, expected)
    np.testing.assert_allclose(ablations.step_accuracies(logits[:, 2], labels[2]), expected[2])
    # a permutation of the output units does not change clustering accuracy
    np.testing.assert_allclose(ablations.step_accuracies(logits[..., [2, 0, 1]], labels), acc)
    with pytest.raises(ValueError, match="matching labels"):
        ablations.step_accuracies(logits, labels[:, :-1])


def test_paired_difference_is_the_interval_of_per_task_differences():
    a, b = fake_curves(1, 0.05)[:, 0], fake_curves(2, 0.0)[:, 0]
    stat = ablations.paired(a, b)
    mean, half = mean_ci(a - b)
    assert stat["mean"] == pytest.approx(mean) and stat["half"] == pytest.approx(half)
    assert stat["excludes_zero"] is True and stat["low"] > 0
    # pairing removes the shared task difficulty: the paired interval is far narrower than the unpaired ones
    assert stat["half"] < mean_ci(a)[1]
    noise = ablations.paired(fake_curves(3, 0.0)[:, 0], fake_curves(4, 0.0)[:, 0])
    assert noise["excludes_zero"] is (noise["low"] > 0 or noise["high"] < 0)
    with pytest.raises(ValueError, match="identical tasks"):
        ablations.paired(a, b[:-1])


def test_summary_rows_and_table():
    result = make_result()
    rows = {r["variant"]: r for r in result.summary()}
    assert "vs_reference" not in rows["ref"]
    better = rows["better"]
    assert better["after"]["mean"] == pytest.approx(result.acc["better"][:, -1].mean())
    assert better["gain"]["mean"] == pytest.approx((result.acc["better"][:, -1] - result.acc["better"][:, 0]).mean())
    assert better["vs_reference"]["excludes_zero"] and better["vs_reference"]["mean"] > 0.05
    assert better["vs_kmeans"]["mean"] == pytest.approx(
        (result.acc["better"][:, -1] - result.baselines["mnist/zero_shot"]["kmeans_latent"]).mean())
    table = ablations.table_rows(result)
    assert [r["variant"] for r in table] == ["ref", "better", "same"]
    assert table[1]["vs ref (pts)"].startswith("+") and table[1]["vs ref (pts)"].endswith("*")
    assert table[0]["vs ref (pts)"] == "–"


def test_step_table_and_lodo_matrix():
    result = make_result(reference=None, main=fake_curves(1, 0.0, rising=True))
    rows = ablations.step_table(result, "main", [0, 2, STEPS])
    assert [r["steps"] for r in rows] == [0, 2, STEPS]
    assert rows[0]["gain"]["mean"] == 0.0 and rows[-1]["gain"]["mean"] > 0.05
    with pytest.raises(ValueError, match="not computed"):
        ablations.step_table(result, "main", [STEPS + 1])
    lodo = ablations.lodo_matrix(result)
    assert lodo[0]["held_out"] == "mnist" and lodo[0]["kmeans"] is not None


# ---------------------------------------------------------------------------------------- conclusions

def test_conclusions_follow_the_numbers():
    worse = make_result(ref=fake_curves(1, 0.0), worse=fake_curves(2, -0.1), same=fake_curves(3, 0.0, noise=0.05))
    text = "\n".join(ablations.conclusions({"toy": worse}))
    assert "vs ref): worse: worse (-10" in text
    stat = ablations.paired(worse.acc["same"][:, -1], worse.acc["ref"][:, -1])
    expected = "no clear difference" if not stat["excludes_zero"] else ("better" if stat["mean"] > 0 else "worse")
    assert text.split("same: ")[1].startswith(expected)

    rising = make_result(reference=None, main=fake_curves(1, 0.0, rising=True, noise=0.0))
    line = ablations.conclusions({"steps": rising})[0]
    assert "still highest at the largest step count" in line and "adaptation helps" in line
    peaked = np.concatenate([fake_curves(1, 0.0, rising=True, noise=0.0)[:, :3],
                             fake_curves(1, -0.2, noise=0.0)[:, :2]], axis=1)
    line = ablations.conclusions({"steps": make_result(reference=None, main=peaked)})[0]
    assert f"to {100 * peaked[:, 2].mean():.1f}% at 2 steps" in line and "significantly lower at 4 steps" in line
    flat = make_result(reference=None, main=fake_curves(1, 0.0, noise=0.0)[:, ::-1] - np.linspace(0, 0.1, STEPS + 1))
    assert "highest with no inner step" in ablations.conclusions({"steps": flat})[0]


# ------------------------------------------------------------------------------------------- cache

def test_cache_round_trip_and_staleness():
    result = make_result()
    path = ablations.save_result(result)
    assert path == ablations.result_path("toy") and path.parent.name == "ablations"
    loaded = ablations.load_cached("toy", result.meta)
    assert loaded is not None and loaded.summary() == result.summary()
    np.testing.assert_array_equal(loaded.acc["better"], result.acc["better"])
    assert ablations.load_cached("toy", {"config": {"a": 2}}) is None  # other settings: stale
    assert ablations.load_cached("other", result.meta) is None  # absent
    path.write_text("{torn")
    assert ablations.load_cached("toy", result.meta) is None  # corrupt: recompute


# -------------------------------------------------------------------------------------------- specs

def test_define_ablations_covers_the_brief_with_paired_references():
    cfg = load_config("default", overrides={"ablation": {"meta_iterations": None}})
    specs = {a.key: a for a in ablations.define_ablations(cfg)}
    assert list(specs) == ["steps", "inner_lr", "inner_loss", "meta_learning", "conditioning", "vae_setting",
                           "task_mixing", "lodo"]
    for spec in specs.values():
        labels = [v.label for v in spec.variants]
        assert len(set(labels)) == len(labels)
        if spec.reference is not None:
            assert spec.reference in labels
            # paired comparisons need identical tasks: every variant scores the same dataset
            assert len({ablations._resolved(cfg, v)[0] for v in spec.variants}) == 1
    assert specs["steps"].variants[0].num_steps == max(cfg.ablation.step_grid)
    assert {v.adapt_overrides.get("inner_lr") for v in specs["inner_lr"].variants[1:]} == \
        set(cfg.ablation.lr_grid) - {cfg.adapt.inner_lr}
    assert {v.context for v in specs["conditioning"].variants} == {"task", "noise", "other"}
    hyperfast = specs["conditioning"].variant("HyperFast-style conditioning")
    assert ablations.training_config(cfg, hyperfast).hyper.conditioning == "hyperfast"
    no_inner = specs["meta_learning"].variant("meta-trained without inner loop")
    assert ablations.training_config(cfg, no_inner).meta.use_inner_loop is False
    assert {v.setting for v in specs["vae_setting"].variants} == {"zero_shot", "transductive"}
    # leave-one-dataset-out: every protocol dataset held out once, trained on the others
    lodo = specs["lodo"].variants
    assert [v.dataset for v in lodo] == list(cfg.datasets)
    for v in lodo:
        train_cfg = ablations.training_config(cfg, v)
        assert v.dataset not in train_cfg.meta.train_datasets and train_cfg.meta.test_datasets == (v.dataset,)
    # without ablation.meta_iterations the protocol's own checkpoints are reused (no re-training)
    assert ablations.checkpoint_name(cfg, specs["meta_learning"].variants[0], "zero_shot") is None


def test_retrained_variants_get_distinct_names_and_a_retrained_reference():
    cfg = load_config("default", overrides={"ablation": {"meta_iterations": 50}})
    names = set()
    for spec in ablations.define_ablations(cfg):
        for v in spec.variants:
            if v.train_tag is not None:
                train_cfg = ablations.training_config(cfg, v)
                assert train_cfg.meta.iterations == 50
                names.add((ablations.checkpoint_name(cfg, v, v.setting or "zero_shot"), fingerprint_of(train_cfg)))
    by_name = {}
    for name, fp in names:
        by_name.setdefault(name, set()).add(fp)
    # one checkpoint name never stands for two different trainings, and none overwrites the protocol's
    assert all(len(fps) == 1 for fps in by_name.values())
    assert all(name and "_ablation_" in name for name in by_name)
    meta = ablations.define_ablations(cfg)[3]
    assert meta.reference == "main (re-trained)" and meta.variant(meta.reference).train_tag == "reference"


def fingerprint_of(cfg) -> str:
    from hmlib.artifacts import fingerprint
    from hmlib.config import config_to_dict

    return fingerprint(config_to_dict(cfg))


def test_bad_specs_raise_clear_errors():
    cfg = load_config("default")
    with pytest.raises(ConfigError, match="setting"):
        ablations._resolved(cfg, Variant("x", setting="few_shot"))
    with pytest.raises(ConfigError, match="context"):
        ablations._resolved(cfg, Variant("x", context="pixels"))
    with pytest.raises(ConfigError, match="unknown config key"):
        ablations.apply_overrides(cfg, {"meta": {"iterationz": 3}})
    with pytest.raises(ConfigError, match="inner_loss"):
        ablations.adapt_config(cfg, Variant("x", adapt_overrides={"inner_loss": "l1"}))
    with pytest.raises(KeyError, match="no variant"):
        ablations.define_ablations(cfg)[0].variant("nope")
    with pytest.raises(KeyError, match="unknown ablation"):
        ablations.run_all(cfg, ["nope"])
    with pytest.raises(ConfigError, match="ablation.setting"):
        load_config("default", overrides={"ablation": {"setting": "few_shot"}})


# ------------------------------------------------------------------- curves of a real tiny hypernet

def test_variant_curves_score_a_real_hypernet_on_every_task():
    from hmlib.adapt import predict_task
    from hmlib.data import sample_tasks
    from hmlib.hypernet import HyperNet, TaskInputs
    from hmlib.latents import LatentSet

    cfg = load_config("smoke", overrides={"hyper": TINY_HYPER, "task": {"num_classes": K},
                                          "adapt": {"num_inner_steps": STEPS, "inner_lr": 1.0}})
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    mu = (rng.normal(size=(400, LATENT_DIM)) + 3 * labels[:, None]).astype(np.float32)
    latents = LatentSet("toy", "test", mu, np.full_like(mu, -2.0), labels, "vae-x")
    suite = sample_tasks(labels, 7, K, N, seed=1)
    torch.manual_seed(0)
    hypernet = HyperNet(HyperConfig(**{**TINY_HYPER, "target_hidden": (8,)}), LATENT_DIM, K).eval()
    variant = Variant("main")
    resolved = ablations.ResolvedVariant(variant, "toy", "zero_shot", cfg, ablations.adapt_config(cfg, variant),
                                         hypernet, None, latents)
    curves = ablations.variant_curves(cfg, resolved, suite, batch_size=3, progress=False)
    assert curves.shape == (7, STEPS + 1)
    for t in (0, 6):  # batching tasks gives exactly the per-task result
        idx = suite.indices[t]
        logits = predict_task(hypernet, TaskInputs.from_arrays(mu[idx], latents.logvar[idx]), resolved.adapt)
        expected = [clustering_accuracy(logits[s].argmax(-1).numpy(), suite.labels[t], K) for s in range(STEPS + 1)]
        np.testing.assert_allclose(curves[t], expected, atol=1e-12)
    zero = dataclasses.replace(resolved, adapt=dataclasses.replace(resolved.adapt, inner_lr=1e-3 * 0))
    flat = ablations.variant_curves(cfg, zero, suite, progress=False)
    np.testing.assert_allclose(flat, np.repeat(flat[:, :1], STEPS + 1, axis=1))  # lr 0: nothing moves
    np.testing.assert_allclose(flat[:, 0], curves[:, 0])  # step 0 does not depend on the lr


# ------------------------------------------------------------------------------ end to end (tiny mirror)

@pytest.mark.slow
def test_run_all_on_a_tiny_mirror_then_reuses_the_cache(tmp_path, capsys):
    from datafactory import write_tiny_mirror

    root = write_tiny_mirror(tmp_path / "mirror")
    cfg = load_config("smoke", overrides={
        "data": {"data_dir": str(root), "use_hub": False, "max_images_per_split": None},
        "task": {"num_classes": K, "num_images": 18},
        "vae": {"epochs": 1, "latent_dim": LATENT_DIM, "max_train_images": 240, "batch_size": 64},
        "hyper": TINY_HYPER, "adapt": {"num_inner_steps": 2},
        "meta": {"iterations": 2, "meta_batch_size": 2, "eval_every": 2, "eval_tasks": 2, "query_size": 6,
                 "val_fraction": 0.4},
        "eval": {"num_tasks": 4, "task_sizes": [18], "kmeans_n_init": 1},
        "ablation": {"step_grid": [0, 1, 2, 4], "lr_grid": [0.1, 1.0], "num_tasks": 3, "task_size": 18,
                     "meta_iterations": 3}})
    results = ablations.run_all(cfg, progress=False)
    assert list(results) == [a.key for a in ablations.define_ablations(cfg)]
    for key, result in results.items():
        assert ablations.result_path(key).is_file()
        suites = {r.get("suite") for r in result.meta["inputs"].values()}
        if result.reference is not None:
            assert len(suites) == 1  # identical tasks for every variant of a paired comparison
        for label, acc in result.acc.items():
            info = result.variant_info(label)
            assert acc.shape == (3, info["num_steps"] + 1) and np.all((acc >= 0) & (acc <= 1))
    assert results["steps"].acc["main"].shape[1] == 5
    assert [r["held_out"] for r in ablations.lodo_matrix(results["lodo"])] == list(cfg.datasets)
    cond = results["conditioning"]
    # pixel-noise and other-dataset contexts use the reference's very checkpoint; only the context differs
    infos = {i["label"]: i for i in cond.variants}
    assert infos["pixel-noise context"]["checkpoint"] == infos[cond.reference]["checkpoint"]
    np.testing.assert_array_equal(cond.kmeans("pixel-noise context"), cond.kmeans(cond.reference))
    assert ablations.conclusions(results, cfg.ablation.step_grid)

    capsys.readouterr()
    again = ablations.run_all(cfg, ["inner_lr"], progress=False)
    assert "Loaded inner_lr" in capsys.readouterr().out
    np.testing.assert_array_equal(again["inner_lr"].acc["lr=0.1"], results["inner_lr"].acc["lr=0.1"])
    changed = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, kmeans_n_init=2))
    ablations.run_all(changed, ["inner_lr"], progress=False)
    assert "Recomputing inner_lr" in capsys.readouterr().out


def test_headline_rows_are_flat_and_accepted_by_the_report_index():
    from hmlib.reports import record_headline

    results = {"toy": make_result(), "steps": make_result(reference=None, main=fake_curves(1, 0.0, rising=True))}
    rows = ablations.headline_rows(results)
    assert len(rows) == 4 and all(not isinstance(v, (dict, list)) for r in rows for v in r.values())
    better = next(r for r in rows if r["variant"] == "better")
    assert better["difference (pts)"] == round(100 * ablations.paired(
        results["toy"].after("better"), results["toy"].after("ref"))["mean"], 1)
    assert better["CI excludes 0"] is True and better["vs"] == "ref"
    steps = next(r for r in rows if r["ablation"] == "steps")
    assert steps["vs"] == "0 steps" and steps["difference (pts)"] > 0  # gain over no adaptation
    path = record_headline("ablations", rows, "Toy ablations")
    assert path.is_file()


def test_describe_states_the_protocol_and_the_retraining():
    cfg = load_config("default", overrides={"ablation": {"meta_iterations": 50, "num_tasks": 7}})
    text = ablations.describe(cfg)
    assert "first 7 tasks" in text and "**mnist**" in text and "50 iterations" in text
    same = ablations.describe(load_config("default", overrides={"ablation": {"meta_iterations": None}}))
    assert "re-trained" not in same
