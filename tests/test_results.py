"""docs/results.json is the one record of the default run's figures; README's tables are generated from it."""
from __future__ import annotations

import pytest

from hmlib import results
from hmlib.artifacts import read_json, write_json

ROW = {"method": "hypernet_adapted", "label": "hypernetwork + 4 inner steps", "accuracy": 0.9, "ci": 0.01,
       "seed_std": 0.002, "num_seeds": 3, "ms_per_task": 5.0, "supervised": False,
       "gain": {"mean": 0.001, "ci": 0.002, "excludes_zero": False},
       "vs": {"kmeans_embedding": {"mean": 0.01, "ci": 0.002, "excludes_zero": True}}}
KMEANS = {"method": "kmeans_embedding", "label": "k-means on the backbone embedding", "accuracy": 0.89, "ci": 0.01,
          "seed_std": None, "num_seeds": 1, "ms_per_task": 4.0, "supervised": False}
RECORD = {"evaluation": {s: {"dataset": "mnist", "seeds": [0], "num_steps": 4, "sizes": {"256": [ROW, KMEANS]}}
                         for s in ("zero_shot", "transductive")},
          "pipeline": {"01_data": {"wall_s": 60.0, "status": "ok", "profile": "default"}},
          "benchmarks": {"eval": {"method ms / task": 12.5, "_machine": "2 cores"}}}
README = ("intro\n<!-- results:results -->\nold\n<!-- /results:results -->\nmiddle\n"
          "<!-- results:pipeline -->\n<!-- /results:pipeline -->\n<!-- results:benchmarks -->\nx\n<!-- /results:benchmarks -->\n")


def test_the_committed_readme_agrees_with_the_committed_results_file():
    """Fails when a README figure was edited by hand or the results file changed without regenerating README."""
    assert results.RESULTS_FILE.is_file(), "docs/results.json is missing: run `make run`, `make bench`, `make results`"
    assert results.check_readme() == []


def test_render_fills_every_section_from_the_record_and_nothing_else():
    text = results.render_readme(README, RECORD)
    assert text.startswith("intro\n") and "\nmiddle\n" in text and "old" not in text
    assert "90.0 ± 1.0 (sd 0.2)" in text and "89.0 ± 1.0" in text and "+1.0 ± 0.2 *" in text
    assert "01_data 60 s" in text and "method ms / task | 12.5" in text and "_machine" not in text
    assert results.render_readme(text, RECORD) == text  # regenerating is idempotent


def test_check_names_the_sections_that_disagree(tmp_path):
    path, readme = tmp_path / "results.json", tmp_path / "README.md"
    write_json(path, RECORD)
    readme.write_text(results.render_readme(README, RECORD))
    assert results.check_readme(readme, path) == []
    readme.write_text(readme.read_text().replace("90.0 ± 1.0", "92.0 ± 1.0"))  # a hand-edited figure
    assert results.check_readme(readme, path) == ["results"]
    changed = read_json(path)
    changed["pipeline"]["01_data"]["wall_s"] = 61.0
    write_json(path, changed)
    assert results.check_readme(readme, path) == ["pipeline", "results"]


def test_an_unknown_section_is_an_error():
    with pytest.raises(results.ResultsError, match="unknown results section 'nope'"):
        results.render_readme("<!-- results:nope -->\n<!-- /results:nope -->", RECORD)
