"""docs/results.json is the one record of the default run's figures; README's tables are generated from it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hmlib import cli, results
from hmlib.artifacts import read_json, write_json
from hmlib.evaluation.conditions import Condition
from hmlib.evaluation.tables import grid_summary, summary_markdown

TASKS, STEPS = 6, 4


def condition_block(dataset: str, gain: float) -> dict:
    """One condition as the evaluation writes it: the hypernetwork gains ``gain`` over k-means on every task."""
    kmeans = np.linspace(0.80, 0.90, TASKS)
    hyper = np.stack([kmeans] * STEPS + [kmeans + gain], axis=1)[None]  # (1, T, S+1)
    condition = Condition(dataset, 4, 256, 256)
    return {"condition": {**condition.__dict__, "key": condition.key, "label": condition.label,
                          "shift": condition.shift},
            "suite": {"num_tasks": TASKS},
            "methods": {"hypernet": {"acc_steps": hyper.tolist(), "seconds": [0.005]},
                        "kmeans_embedding": {"acc": [kmeans.tolist()], "seconds": [0.004]},
                        "plain_choice": {"acc": [(kmeans - 0.01).tolist()], "seconds": [0.02]},
                        "logreg_embedding": {"acc": [[1.0] * TASKS], "seconds": [0.01]}}}


def evaluation(setting: str, profile: str = "default") -> dict:
    """A summary file results/eval_<setting>.json of two conditions (one shifted)."""
    result = {"schema": "hmlib-eval/3", "setting": setting, "setting_label": setting.replace("_", "-"),
              "seeds": [0, 1, 2], "num_steps": STEPS, "num_tasks": TASKS, "profile": profile,
              "conditions": [condition_block("mnist", 0.02), condition_block("mnist+rotate", -0.03)]}
    result["summary"] = grid_summary(result)
    return result


def record_of(result: dict) -> dict:
    """What gather keeps of one evaluation."""
    return {k: result[k] for k in ("profile", "seeds", "num_steps", "num_tasks", "setting_label", "summary")}


RECORD = {"evaluation": {s: record_of(evaluation(s)) for s in ("zero_shot", "transductive")},
          "pipeline": {"01_data": {"wall_s": 60.0, "status": "ok", "profile": "default"}},
          "benchmarks": {"eval": {"method ms / task": 12.5, "_machine": "2 cores"}}}
README = ("intro\n<!-- results:results -->\nold\n<!-- /results:results -->\nmiddle\n"
          "<!-- results:pipeline -->\n<!-- /results:pipeline -->\n<!-- results:benchmarks -->\nx\n<!-- /results:benchmarks -->\n")


@pytest.fixture
def files(tmp_path, monkeypatch):
    """docs/results.json and README.md redirected to a scratch folder (the commands write and check them)."""
    path, readme = tmp_path / "docs" / "results.json", tmp_path / "README.md"
    readme.write_text(README)
    monkeypatch.setattr(results, "RESULTS_FILE", path)
    monkeypatch.setattr(results, "README", readme)
    check = results.check_readme  # its defaults are the repository's files, bound at import
    monkeypatch.setattr(results, "check_readme", lambda: check(readme, path))
    return path, readme


def write_home(home, profile: str = "default") -> None:
    """An artifact folder as `make run` leaves it: both settings' summaries, the run log and a benchmark."""
    for setting in ("zero_shot", "transductive"):
        write_json(home / "results" / f"eval_{setting}.json", evaluation(setting, profile))
    write_json(home / "reports" / "runs.json", {"notebooks": {"01_data": {"wall_s": 61.5, "status": "ok",
                                                                           "profile": profile, "extra": 1}}})
    write_json(home / "results" / "bench" / "eval.json", {"method ms / task": 9.5})


def test_the_committed_readme_agrees_with_the_committed_results_file():
    """Fails when a README figure was edited by hand or the results file changed without regenerating README."""
    assert results.RESULTS_FILE.is_file(), "docs/results.json is missing: run `make run`, `make bench`, `make results`"
    assert results.check_readme() == []


def test_render_fills_every_section_from_the_record_and_nothing_else():
    text = results.render_readme(README, RECORD)
    assert text.startswith("intro\n") and "\nmiddle\n" in text and "old" not in text
    assert summary_markdown(RECORD["evaluation"]["zero_shot"]) in text  # the grid's table, as the evaluation writes it
    assert "**Zero-shot** (6 tasks per condition, seeds [0, 1, 2], 4 inner steps)" in text
    assert "| mnist+rotate, K = 4, N = 256 |" in text and "| +2.0 ± 0.0 * |" in text and "| -3.0 ± 0.0 * |" in text
    assert "01_data 60 s" in text and "method ms / task | 12.5" in text and "_machine" not in text
    assert "profile" not in text.split("<!-- /results:results -->")[0]  # the default profile goes unsaid
    assert results.render_readme(text, RECORD) == text  # regenerating is idempotent


def test_a_record_of_another_profile_says_so_in_the_readme():
    other = {**RECORD, "evaluation": {s: {**e, "profile": "smoke"} for s, e in RECORD["evaluation"].items()}}
    text = results.render_readme(README, other)
    assert text.count("profile `smoke`") == 2


def test_check_names_the_sections_that_disagree(tmp_path):
    path, readme = tmp_path / "results.json", tmp_path / "README.md"
    write_json(path, RECORD)
    readme.write_text(results.render_readme(README, RECORD))
    assert results.check_readme(readme, path) == []
    rotated = next(l for l in readme.read_text().splitlines() if l.startswith("| mnist+rotate"))
    readme.write_text(readme.read_text().replace(rotated, rotated.replace("-3.0", "-1.0")))  # a hand-edited figure
    assert results.check_readme(readme, path) == ["results"]
    changed = read_json(path)
    changed["pipeline"]["01_data"]["wall_s"] = 61.0
    write_json(path, changed)
    assert results.check_readme(readme, path) == ["pipeline", "results"]


def test_an_unknown_section_is_an_error():
    with pytest.raises(results.ResultsError, match="unknown results section 'nope'"):
        results.render_readme("<!-- results:nope -->\n<!-- /results:nope -->", RECORD)


def test_a_record_of_an_older_format_is_a_clear_error(tmp_path):
    """docs/results.json written before the grid evaluation has no summaries: one message saying what to run."""
    path, readme = tmp_path / "results.json", tmp_path / "README.md"
    write_json(path, {"evaluation": {"zero_shot": {"dataset": "mnist", "seeds": [0], "num_steps": 4,
                                                   "sizes": {"256": []}}}, "pipeline": {}, "benchmarks": {}})
    readme.write_text(README)
    with pytest.raises(results.ResultsError, match="older format.*hmlib results --write"):
        results.check_readme(readme, path)


def test_gather_refuses_another_profile_unless_allowed(hmlib_home):
    write_home(hmlib_home, profile="smoke")
    with pytest.raises(results.ResultsError, match="'smoke' run.*--allow-other-profile"):
        results.gather()
    record = results.gather(allow_other_profile=True)
    assert record["evaluation"]["zero_shot"]["profile"] == "smoke"
    assert record["evaluation"]["zero_shot"]["summary"] == evaluation("zero_shot", "smoke")["summary"]
    assert record["pipeline"] == {"01_data": {"wall_s": 61.5, "status": "ok", "profile": "smoke"}}
    assert record["benchmarks"] == {"eval": {"method ms / task": 9.5}}
    (hmlib_home / "results" / "eval_transductive.json").unlink()
    with pytest.raises(results.ResultsError, match="eval_transductive.json not found"):
        results.gather(allow_other_profile=True)


def test_hmlib_results_write_then_check(files, hmlib_home, tmp_path, capsys):
    """--write gathers the run into both files; --check then agrees, and names a section edited by hand."""
    path, readme = files
    write_home(hmlib_home)
    assert cli.main(["results", "--write"]) == 0
    assert read_json(path) == results.gather() and "mnist+rotate, K = 4" in readme.read_text()
    assert not list(readme.parent.glob(".hmlib-tmp-*"))
    assert cli.main(["results", "--check"]) == 0 and "README agrees" in capsys.readouterr().out
    readme.write_text(readme.read_text().replace("01_data 62 s", "01_data 10 s"))
    assert cli.main(["results", "--check"]) == 2
    assert "README sections pipeline disagree" in capsys.readouterr().err
    assert cli.main(["results", "--check", "--home", str(tmp_path / "nonexistent")]) == 2  # was ignored: passed
    assert "--home applies to --write" in capsys.readouterr().err


def test_hmlib_results_write_refuses_a_smoke_run_and_leaves_both_files(files, hmlib_home, tmp_path, capsys):
    path, readme = files
    other = tmp_path / "smoke_home"
    write_home(other, profile="smoke")
    assert cli.main(["results", "--write", "--home", str(other)]) == 2
    assert "'smoke' run" in capsys.readouterr().err
    assert not path.exists() and readme.read_text() == README
    assert cli.main(["results", "--write", "--home", str(other), "--allow-other-profile"]) == 0
    assert "profile `smoke`" in readme.read_text() and json.loads(path.read_text())["evaluation"]


def test_a_home_without_a_benchmark_keeps_the_committed_one(files, hmlib_home, tmp_path, capsys):
    """--write from a home that has a run but no benchmark, bench figures or run log keeps those parts of the
    committed record (it used to replace them by 'no run recorded' with rc 0) and says so; what the home has is
    new."""
    path, readme = files
    committed = {**RECORD, "benchmark": {"profile": "default", "summary": {}}}
    write_json(path, committed)
    other = tmp_path / "run_only"
    for setting in ("zero_shot", "transductive"):
        write_json(other / "results" / f"eval_{setting}.json", evaluation(setting))
    assert cli.main(["results", "--write", "--home", str(other)]) == 0
    out = capsys.readouterr().out
    assert "kept from the previous results.json" in out and "`make benchmark`;" in out and "`make bench`" in out
    assert "`make benchmark-transductive`" not in out  # nothing committed to keep
    written = read_json(path)
    for part in ("benchmark", "pipeline", "benchmarks"):
        assert written[part] == committed[part]
    assert written["evaluation"] == results.gather(other)["evaluation"] and "benchmark_transductive" not in written
    assert "01_data 60 s" in readme.read_text()  # the committed run log's wall time, not "no run recorded"


def test_a_readme_that_cannot_be_rendered_is_left_as_it_was(files, hmlib_home, capsys):
    """The README is replaced atomically: a failure while rendering leaves the old file and no temporary one."""
    path, readme = files
    write_home(hmlib_home)
    broken = README + "<!-- results:nope -->\n<!-- /results:nope -->\n"
    readme.write_text(broken)
    assert cli.main(["results", "--write"]) == 2
    assert "unknown results section 'nope'" in capsys.readouterr().err
    assert readme.read_text() == broken and not list(readme.parent.glob(".hmlib-tmp-*"))


def test_gather_pairs_the_transductive_benchmark_with_the_zero_shot_one(hmlib_home):
    """Both benchmark files: the transductive one is recorded with its per-task comparison to the zero-shot one (the
    same conditions, the same tasks), and the README section shows both tables; with only one, no comparison."""
    write_home(hmlib_home)
    zero_shot = evaluation("zero_shot")
    transductive = evaluation("transductive")
    for block in transductive["conditions"]:  # transductive = zero-shot + 1 point on every task
        block["methods"]["hypernet"]["acc_steps"] = (np.asarray(block["methods"]["hypernet"]["acc_steps"]) +
                                                     0.01).tolist()
    transductive["summary"] = grid_summary(transductive)
    write_json(hmlib_home / "results" / "benchmark_transductive.json", transductive)
    record = results.gather()
    assert "vs_zero_shot" not in record["benchmark_transductive"] and "benchmark" not in record
    section = "<!-- results:benchmark_transductive -->\n<!-- /results:benchmark_transductive -->\n"
    assert "Transductive minus" not in results.render_readme(section, record)
    write_json(hmlib_home / "results" / "benchmark_zero_shot.json", zero_shot)
    record = results.gather()
    comparison = record["benchmark_transductive"]["vs_zero_shot"]
    assert [c["key"] for c in comparison["conditions"]] == ["mnist_K4_N256", "mnist+rotate_K4_N256"]
    assert all(c["difference"]["mean"] == pytest.approx(0.01) for c in comparison["conditions"])
    assert comparison["overall"]["all"]["n"] == 2 and comparison["overall"]["shifted"]["n"] == 1
    text = results.render_readme(section, json.loads(json.dumps(record)))  # as read back from docs/results.json
    assert summary_markdown(record["benchmark_transductive"]) in text
    assert "transductive minus zero-shot on the same tasks" in text and "| mnist+rotate, K = 4, N = 256 | +1.0" in text
    assert "_no `make benchmark-transductive` run recorded_" in results.render_readme(section, RECORD)


def test_the_transductive_evaluation_is_paired_with_the_zero_shot_one(hmlib_home):
    """gather records the transductive hypernetwork minus the zero-shot one on each condition's same tasks, and the
    README's results section shows it below the transductive table."""
    write_home(hmlib_home)
    transductive = evaluation("transductive")
    transductive["conditions"][1]["methods"]["hypernet"]["acc_steps"] = (
        np.asarray(transductive["conditions"][1]["methods"]["hypernet"]["acc_steps"]) + 0.05).tolist()
    transductive["summary"] = grid_summary(transductive)
    write_json(hmlib_home / "results" / "eval_transductive.json", transductive)
    record = json.loads(json.dumps(results.gather()))
    versus = record["evaluation"]["transductive"]["vs_zero_shot"]
    assert [c["difference"]["mean"] for c in versus["conditions"]] == pytest.approx([0.0, 0.05])
    assert "vs_zero_shot" not in record["evaluation"]["zero_shot"]
    text = results.render_readme(README, record)
    section = text.split("**Transductive**")[1]
    assert "transductive minus zero-shot on the same tasks" in section
    assert "| mnist, K = 4, N = 256 | +0.0 ± 0.0 |" in section and "| mnist+rotate, K = 4, N = 256 | +5.0 ± 0.0 * |" in section
