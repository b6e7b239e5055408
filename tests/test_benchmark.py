"""``hmlib benchmark``: the grid (every clean held-out base x every benchmark corruption x benchmark.shapes) scored on
the pipeline's checkpoints (models/pipeline.json) as the evaluation scores, resumable condition by condition, and the
command end to end (a home without pipeline checkpoints refused with one line); ``--setting transductive``: every
dataset's train split adapted to first, then the same datasets' grid, paired per task with the zero-shot one."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hmlib import cli
from hmlib.artifacts import ArtifactError, MissingArtifactError, read_json, write_json
from hmlib.config import ConfigError, with_overrides
from hmlib.stats import paired
from hmlib.data import CORRUPTIONS, benchmark_corruptions, train_corruptions
from hmlib.evaluation import benchmark as benchmark_module, evaluate as evaluate_module
from hmlib.evaluation.benchmark import (BENCHMARK_FILE, BENCHMARK_FILES, benchmark_config, benchmark_datasets,
                                       comparison_markdown, run_benchmark, setting_comparison)
from hmlib.evaluation.conditions import build_suite, grid
from hmlib.evaluation.evaluate import EvalError, load_results, per_task_accuracy, score_hypernet
from hmlib.evaluation.inputs import seed_inputs
from hmlib.hyper.bundle import load_bundle
from hmlib.hyper.metatrain import pipeline_checkpoints
from hmlib.paths import models_dir, results_dir
from tinyprotocol import K, N, OVERRIDES, TEST_STEPS, tiny_config, train_home, use_home

SHAPES = [[K, N], [2, 12]]
BENCHMARK = {"corruptions": ["rotate", "shot_noise"], "shapes": SHAPES, "num_tasks": 2}  # eval.num_tasks is 3
DATASETS = ["mnist", "mnist+rotate", "mnist+shot_noise"]  # the tiny protocol holds out mnist and mnist+rotate


@pytest.fixture(scope="module")
def trained(_tiny_mirror_root, tmp_path_factory):
    """The tiny protocol's seed-0 checkpoint (models/pipeline.json names it), trained once for the module."""
    return train_home(tmp_path_factory.mktemp("trained"), _tiny_mirror_root, [0])


@pytest.fixture
def home(trained, hmlib_home, tiny_mirror):
    """This test's copy of the trained home: (setting, seed) -> checkpoint path."""
    return use_home(trained, hmlib_home)


def bench_cfg(trained, **benchmark):
    return with_overrides(trained.cfg, {"benchmark": {**BENCHMARK, **benchmark}})


def count_scorings(monkeypatch, interrupt_at: int | None = None) -> list:
    """Count the hypernetwork scorings (one per condition); raise KeyboardInterrupt at call ``interrupt_at``."""
    calls, real = [], evaluate_module.score_hypernet

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "score_hypernet", counted)
    return calls


# ------------------------------------------------------------------------------------------------ the grid

def test_benchmark_datasets_are_every_clean_base_and_every_configured_corruption_of_it():
    """Shifted held-out datasets contribute their clean base once; benchmark.corruptions None means the whole
    benchmark family (never a meta-training corruption); corruptions outside the family are refused."""
    cfg = tiny_config(benchmark={"corruptions": ["rotate", "shot_noise"]})
    assert cfg.meta.test_datasets == ("mnist", "mnist+rotate")
    assert benchmark_datasets(cfg) == DATASETS
    two = tiny_config(meta={"test_datasets": ["mnist+rotate", "kmnist", "mnist"]}, benchmark={"corruptions": ["fog"]})
    assert benchmark_datasets(two) == ["mnist", "mnist+fog", "kmnist", "kmnist+fog"]
    every = benchmark_datasets(tiny_config(benchmark={"corruptions": None}))
    assert every == ["mnist", *(f"mnist+{c}" for c in benchmark_corruptions())] and len(every) == 16
    assert all(CORRUPTIONS[name.split("+")[1]].family == "benchmark" for name in every[1:])
    with pytest.raises(ConfigError, match="benchmark.corruptions"):
        tiny_config(benchmark={"corruptions": [train_corruptions()[0]]})
    assert benchmark_config(cfg).eval.num_tasks == cfg.benchmark.num_tasks


def test_run_benchmark_scores_the_grid_on_the_pipelines_checkpoints(trained, home):
    """Every dataset x benchmark.shapes, benchmark.num_tasks tasks each, on the checkpoint models/pipeline.json names
    (never a newer stray one); the hypernetwork's accuracies are score_hypernet's on each condition's suite; the
    summary is results/benchmark_zero_shot.json (+ .md), each condition beside it."""
    cfg = bench_cfg(trained)
    pipeline = home[("zero_shot", 0)]
    stray = models_dir() / "hypernet_seed1-0123abcd.pt"
    stray.write_bytes(pipeline.read_bytes())  # not in the manifest: not the pipeline's
    result = run_benchmark(cfg, progress=False)
    path = results_dir() / BENCHMARK_FILE
    assert path.is_file() and path.with_suffix(".md").is_file() and load_results("zero_shot", path) == result
    assert [c["path"] for c in result["checkpoints"]] == [str(pipeline)] and result["seeds"] == [0]
    assert result["key"] == {"benchmark": True, "profile": "smoke"} and result["num_tasks"] == 2
    keys = [f"{d}_K{k}_N{n}" for d in DATASETS for k, n in SHAPES]
    assert [b["condition"]["key"] for b in result["conditions"]] == keys
    assert sorted(p.stem for p in path.with_suffix("").glob("*.json")) == sorted(keys)
    bench = benchmark_config(cfg)
    bundle = load_bundle(pipeline)
    for condition, block in zip(grid(bench, DATASETS, SHAPES, verbose=False), result["conditions"]):
        assert block["suite"]["num_tasks"] == 2 and "kmeans_embedding" in block["methods"]
        acc = np.asarray(block["methods"]["hypernet"]["acc_steps"])
        assert acc.shape == (1, 2, TEST_STEPS + 1)
        inputs = seed_inputs(bundle, bench, condition.dataset, "zero_shot", with_train=False)
        expected, _ = score_hypernet(inputs, bench, build_suite(bench, condition), None)
        np.testing.assert_array_equal(acc[0], expected)


def test_an_interrupted_benchmark_resumes_where_it_stopped(trained, home, monkeypatch):
    """Each condition is written when done: after an interruption only the unfinished conditions are scored and the
    finished files are reused as they are; a finished benchmark run again scores nothing."""
    cfg = bench_cfg(trained, shapes=[[K, N]])
    folder = (results_dir() / BENCHMARK_FILE).with_suffix("")
    calls = count_scorings(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, progress=False)
    done = {p.name: p.read_bytes() for p in folder.glob("*.json")}
    assert sorted(done) == ["mnist+rotate_K3_N18.json", "mnist_K3_N18.json"]
    assert not (results_dir() / BENCHMARK_FILE).exists()
    calls = count_scorings(monkeypatch)
    result = run_benchmark(cfg, progress=False)
    assert len(calls) == 1 and len(result["conditions"]) == 3
    assert {name: (folder / name).read_bytes() for name in done} == done
    calls = count_scorings(monkeypatch)
    assert run_benchmark(cfg, progress=False)["conditions"] == result["conditions"] and not calls


def test_run_benchmark_without_pipeline_checkpoints_is_a_missing_artifact(hmlib_home, tiny_mirror):
    with pytest.raises(MissingArtifactError, match="no pipeline checkpoint recorded in models/pipeline.json"):
        run_benchmark(tiny_config(benchmark=BENCHMARK), progress=False)


# ------------------------------------------------------------------------------------------- hmlib benchmark

def test_hmlib_benchmark_refuses_a_home_without_pipeline_checkpoints_in_one_line(hmlib_home, tiny_mirror, capsys):
    """No models/pipeline.json, or one naming files that are gone: one line saying how to make them, nothing
    written."""
    for manifest in (None, {"0": "hypernet_seed0-gone.pt"}):
        if manifest is not None:
            write_json(models_dir() / "pipeline.json", manifest)
        assert cli.main(["benchmark", "--profile", "smoke", "--quiet"]) == 2
        out, err = capsys.readouterr()
        assert err.strip().splitlines() == ["hmlib: error: no pipeline checkpoint recorded in models/pipeline.json; "
                                            "make them with `hmlib run --profile smoke`"]
        assert not results_dir().exists()


def test_hmlib_benchmark_end_to_end(trained, home, tmp_path, monkeypatch, capsys):
    """The command with the run's own profile and overrides: the grid's summary printed, the JSON written; run
    again, it reuses every condition."""
    overrides = tmp_path / "bench.json"
    overrides.write_text(json.dumps({**OVERRIDES, "benchmark": {**BENCHMARK, "shapes": [[K, N]]}}))
    args = ["benchmark", "--profile", "smoke", "--config", str(overrides), "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    path = results_dir() / BENCHMARK_FILE
    assert f"wrote {path}" in printed and "note:" not in printed  # the checkpoints' own profile
    assert "mnist+shot_noise, K = 3, N = 18" in printed and "| over conditions" in printed
    result = load_results("zero_shot", path)
    assert [b["condition"]["dataset"] for b in result["conditions"]] == DATASETS
    calls = count_scorings(monkeypatch)
    assert cli.main(args) == 0 and not calls and "Recomputing" not in capsys.readouterr().out

    # the same command with other settings: refused in one line, the finished benchmark untouched (it used to be
    # recomputed in place and the summary replaced by the smaller grid); --overwrite replaces it
    before = {p: p.read_bytes() for p in [path, *path.with_suffix("").glob("*.json")]}
    overrides.write_text(json.dumps({**OVERRIDES, "benchmark": {**BENCHMARK, "shapes": [[K, N]], "num_tasks": 3}}))
    assert cli.main(args) == 2 and not calls
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a finished benchmark made with other settings (its task count)" in err[0]
    assert "--overwrite" in err[0] and {p: p.read_bytes() for p in before} == before
    assert cli.main([*args, "--overwrite"]) == 0 and load_results("zero_shot", path)["num_tasks"] == 3


def test_a_finished_benchmark_grows_but_is_never_replaced_by_other_settings(trained, home, monkeypatch):
    """A larger grid that holds a finished one resumes it (nothing lost); a grid without some of its datasets or
    shapes, or other checkpoints or test-time steps, is refused unless overwrite."""
    small = bench_cfg(trained, shapes=[[K, N]], corruptions=["rotate"])
    run_benchmark(small, progress=False)
    calls = count_scorings(monkeypatch)
    larger = run_benchmark(bench_cfg(trained, shapes=[[K, N]]), progress=False)  # + shot_noise: one new condition
    assert len(calls) == 1 and len(larger["conditions"]) == 3
    for other, what in ((small, "its datasets"), (bench_cfg(trained, shapes=[[2, 12]]), "its task shapes"),
                        (with_overrides(bench_cfg(trained, shapes=[[K, N]]), {"adapt": {"test_steps": 1}}),
                         "its test-time steps, its test-time settings")):
        with pytest.raises(ArtifactError, match=f"made with other settings \\({what}\\)"):
            run_benchmark(other, progress=False)
    path = results_dir() / BENCHMARK_FILE
    made_by_others = {**read_json(path), "checkpoints": [{"sha256": "0" * 64}]}
    write_json(path, made_by_others)
    with pytest.raises(ArtifactError, match="made with other settings \\(its checkpoints\\)"):
        run_benchmark(bench_cfg(trained, shapes=[[K, N]]), progress=False)
    assert read_json(path) == made_by_others
    assert len(run_benchmark(small, progress=False, overwrite=True)["conditions"]) == 2


# ------------------------------------------------------------------------------------ the transductive setting

def test_transductive_benchmark_adapts_to_every_dataset_then_scores_its_grid(trained, home, monkeypatch):
    """One adapted backbone per dataset (made from the dataset's train split, reused when run again), the grid of
    benchmark.transductive_shapes scored on them as the transductive evaluation scores, written to its own file; the
    zero-shot benchmark's file is not touched."""
    cfg = bench_cfg(trained, shapes=[[K, N], [2, 12]], transductive_shapes=[[K, N]])
    zero_shot = run_benchmark(cfg, progress=False)
    before = (results_dir() / BENCHMARK_FILE).read_bytes()
    result = run_benchmark(cfg, setting="transductive", progress=False)
    path = results_dir() / BENCHMARK_FILES["transductive"]
    assert load_results("transductive", path) == result and result["setting"] == "transductive"
    assert (results_dir() / BENCHMARK_FILE).read_bytes() == before
    assert [b["condition"]["key"] for b in result["conditions"]] == [f"{d}_K{K}_N{N}" for d in DATASETS]
    assert sorted(p.name[len("backbone_seed0_on-"):].rsplit("-", 1)[0]
                  for p in models_dir().glob("backbone_seed0_on-*.pt")) == sorted(DATASETS)
    bench = benchmark_config(cfg)
    bundle = load_bundle(home[("zero_shot", 0)])
    for condition, block in zip(grid(bench, DATASETS, [[K, N]], verbose=False), result["conditions"]):
        inputs = seed_inputs(bundle, bench, condition.dataset, "transductive", with_train=False)
        expected, _ = score_hypernet(inputs, bench, build_suite(bench, condition), None)
        np.testing.assert_array_equal(np.asarray(block["methods"]["hypernet"]["acc_steps"])[0], expected)
    stamps = {p.name: p.stat().st_mtime_ns for p in models_dir().glob("backbone_seed0_on-*.pt")}
    folder = path.with_suffix("")
    for condition_file in folder.glob("*.json"):
        condition_file.unlink()  # re-scored, but nothing re-adapted
    loads = []
    for module in (evaluate_module, benchmark_module):  # wherever a checkpoint could be read
        monkeypatch.setattr(module, "load_bundle", lambda *a, **k: loads.append(a[0]) or load_bundle(*a, **k),
                            raising=False)
    again = run_benchmark(cfg, setting="transductive", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in models_dir().glob("backbone_seed0_on-*.pt")} == stamps
    assert sorted(map(str, loads)) == sorted(map(str, pipeline_checkpoints()))  # each checkpoint read once
    for block, first in zip(again["conditions"], result["conditions"]):  # the same accuracies (timings differ)
        assert block["methods"]["hypernet"]["acc_steps"] == first["methods"]["hypernet"]["acc_steps"]
        assert block["methods"]["kmeans_embedding"]["acc"] == first["methods"]["kmeans_embedding"]["acc"]

    comparison = setting_comparison(result, zero_shot)
    assert [c["key"] for c in comparison["conditions"]] == [f"{d}_K{K}_N{N}" for d in DATASETS]  # [2, 12]: not in both
    for c, block in zip(comparison["conditions"], result["conditions"]):
        other = next(b for b in zero_shot["conditions"] if b["condition"]["key"] == c["key"])
        assert c["difference"] == paired(per_task_accuracy(block, "hypernet_adapted"),
                                         per_task_accuracy(other, "hypernet_adapted"))
    means = [c["difference"]["mean"] for c in comparison["conditions"]]
    assert comparison["overall"]["all"]["mean"] == pytest.approx(np.mean(means))
    assert comparison["overall"]["shifted"]["n"] == len(DATASETS) - 1
    table = comparison_markdown(comparison)
    assert table.count("\n| mnist") == len(DATASETS) and "over the shifted conditions" in table


def test_setting_comparison_refuses_results_of_other_tasks(trained, home):
    """Paired differences need the same tasks: a condition whose suites differ is one clear error."""
    cfg = bench_cfg(trained, shapes=[[K, N]], transductive_shapes=[[K, N]], corruptions=["rotate"])
    zero_shot = run_benchmark(cfg, progress=False)
    result = run_benchmark(cfg, setting="transductive", progress=False)
    other = json.loads(json.dumps(zero_shot))
    other["conditions"][0]["suite"]["seed"] += 1
    with pytest.raises(EvalError, match="the two results hold different tasks"):
        setting_comparison(result, other)
    with pytest.raises(ConfigError, match="unknown benchmark setting 'fewshot'"):
        run_benchmark(cfg, setting="fewshot", progress=False)


def test_hmlib_benchmark_transductive_end_to_end(trained, home, tmp_path, capsys):
    """The command with --setting transductive: its summary, then the paired comparison with the zero-shot
    benchmark of the same home; the file named."""
    overrides = tmp_path / "bench.json"
    overrides.write_text(json.dumps({**OVERRIDES, "benchmark": {**BENCHMARK, "shapes": [[K, N]],
                                                                 "transductive_shapes": [[K, N]]}}))
    args = ["benchmark", "--profile", "smoke", "--config", str(overrides), "--quiet"]
    assert cli.main([*args, "--setting", "transductive"]) == 0
    out = capsys.readouterr().out
    assert "Transductive minus zero-shot" not in out  # no zero-shot benchmark yet: nothing to pair with
    assert cli.main(args) == 0 and cli.main([*args, "--setting", "transductive"]) == 0
    out = capsys.readouterr().out
    assert "Transductive minus zero-shot" in out and "| mnist+shot_noise, K = 3, N = 18 |" in out
    assert f"wrote {results_dir() / BENCHMARK_FILES['transductive']}" in out
