"""``hmlib cluster`` end to end through the CLI, with the MODEL REPLACED by a stand-in.

Every test here swaps ``hmlib.cluster.estimator`` for :class:`cluster_fakes.BrightnessClusterer`, which clusters by
mean-brightness quantiles. So these tests check the command's argument checks, input handling, output files and
messages honestly, and say nothing about clustering quality; the test with a trained checkpoint is the estimator's.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cluster_fakes import BrightnessClusterer, install_estimator, write_checkpoint, write_mixed_folder
from datafactory import class_patterns, write_tiny_dataset
import hmlib.results
from hmlib import cli, paths
from hmlib.artifacts import ArtifactError, file_sha256, write_json
from hmlib.cluster.images import load_images
from hmlib.cluster.outputs import CSV_COLUMNS, OUTPUT_FILES


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A stand-in checkpoint file, also what the stand-in ``default_checkpoint()`` returns."""
    path = write_checkpoint(tmp_path / "models" / "zero_shot.pt")
    install_estimator(monkeypatch, path)
    return path


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "digits"
    return root, write_mixed_folder(root)


def run(capsys, *argv):
    """``(exit code, stdout, stderr)`` of ``hmlib cluster ...`` through the real top-level parser."""
    code = cli.main(["cluster", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def fails(capsys, *argv) -> str:
    """Run, expect exit status 2 and exactly one stderr line; return it."""
    code, out, err = run(capsys, *argv)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hmlib cluster: error: "), err
    return lines[0]


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_folder_run_writes_assignments_sheet_and_summary(mixed, checkpoint, capsys, hmlib_home):
    root, files = mixed
    code, out, err = run(capsys, root, "--k", 3, "--checkpoint", checkpoint)
    assert code == 0, err
    dest = hmlib_home / "results" / "cluster" / "digits"  # default: results/cluster/<name of PATH>/
    assert sorted(p.name for p in dest.iterdir()) == sorted(OUTPUT_FILES)
    model = BrightnessClusterer.created[-1]
    expected = load_images(root, progress=False)
    np.testing.assert_array_equal(model.fitted_on, expected.images)  # the estimator got hmlib's preprocessed arrays
    rows = read_csv(dest / "assignments.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r[0] for r in rows[1:]] == files["images"]  # relative paths, input order
    assert [int(r[1]) for r in rows[1:]] == model.labels_.tolist()
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], model.confidence_, atol=1e-6)
    summary = json.loads((dest / "summary.json").read_text())
    assert summary["checkpoint"] == str(checkpoint.resolve())
    assert summary["checkpoint_sha256"] == file_sha256(checkpoint)
    assert (summary["n_clusters"], summary["num_steps"], summary["requested_steps"]) == (3, 3, None)
    assert summary["estimator"]["model"] == "brightness quantiles (test stand-in)"
    assert summary["preprocessing"] == expected.preprocessing
    assert summary["input"] == {"path": str(root), "location": str(root.resolve()), "source": "folder", "split": None}
    assert summary["counts"] == {"images": len(files["images"]), "skipped": 2, "ignored": 2,
                                 "inverted": expected.inverted}
    assert [s["file"] for s in summary["skipped"]] == files["skipped"]
    assert summary["ignored"] == files["ignored"]
    assert [c["size"] for c in summary["clusters"]] == np.bincount(model.labels_, minlength=3).tolist()
    page = (dest / "clusters.html").read_text()
    assert page.count("<section class='cluster'") == 3 and "nested/truncated.png" in page
    # printed: skipped files with reasons, cluster sizes, where the files went
    assert "skipped 2 unreadable file(s):" in out and "  garbage.jpg: " in out and "  nested/truncated.png: " in out
    assert "ignored 2 file(s) that are not images" in out
    assert f"clustered {len(files['images'])} images" in out and "cluster   0:" in out
    assert str(dest / "summary.json") in out


def test_default_checkpoint_and_steps_are_passed_through(mixed, checkpoint, capsys, tmp_path):
    root, _ = mixed
    assert run(capsys, root, "--k", 2, "--steps", 0, "--out", tmp_path / "o1")[0] == 0
    model = BrightnessClusterer.created[-1]
    assert model.checkpoint_path == checkpoint and model.requested_steps == 0  # 0 means no adaptation, not "default"
    summary = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert (summary["num_steps"], summary["requested_steps"]) == (0, 0)


def test_parquet_input_names_rows(tmp_path, checkpoint, capsys):
    folder = write_tiny_dataset(tmp_path, "shapes", splits={"train": 20, "test": 9})
    assert run(capsys, folder, "--k", 3, "--out", tmp_path / "out", "--split", "train")[0] == 0
    rows = read_csv(tmp_path / "out" / "assignments.csv")
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(20)]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["input"]["source"] == "parquet" and summary["input"]["split"] == "train"


def test_limit_and_per_cluster(mixed, checkpoint, capsys, tmp_path):
    root, files = mixed
    assert run(capsys, root, "--k", 2, "--limit", 5, "--per-cluster", 1, "--out", tmp_path / "o")[0] == 0
    rows = read_csv(tmp_path / "o" / "assignments.csv")
    assert [r[0] for r in rows[1:]] == files["images"][:5]


@pytest.mark.parametrize("k", [1, 0, -3])
def test_k_below_two_is_an_error(mixed, checkpoint, capsys, k):
    assert fails(capsys, mixed[0], "--k", k) == f"hmlib cluster: error: --k must be at least 2 (got {k})"


def test_k_larger_than_the_images_is_an_error(mixed, checkpoint, capsys, hmlib_home):
    root, files = mixed
    line = fails(capsys, root, "--k", 500)
    assert f"--k 500 is larger than the number of images ({len(files['images'])})" in line
    assert not (hmlib_home / "results").exists()  # nothing written
    assert not BrightnessClusterer.created  # the model was never loaded


def test_missing_path_empty_folder_and_no_images_are_errors(tmp_path, checkpoint, capsys, hmlib_home):
    assert "does not exist" in fails(capsys, tmp_path / "nowhere", "--k", 2)
    (tmp_path / "empty").mkdir()
    assert "is empty: no files to cluster" in fails(capsys, tmp_path / "empty", "--k", 2)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("hello")
    assert "holds no images Pillow can read" in fails(capsys, tmp_path / "docs", "--k", 2)
    assert "is a file; pass the folder" in fails(capsys, tmp_path / "docs" / "notes.txt", "--k", 2)
    assert not (hmlib_home / "results").exists()


def test_hub_id_offline_is_one_line(checkpoint, capsys):
    line = fails(capsys, "someorg/some-dataset", "--k", 2)
    assert "the Hugging Face hub could not load it" in line


def test_existing_output_folder_needs_overwrite(mixed, checkpoint, capsys, tmp_path):
    root, _ = mixed
    out = tmp_path / "out"
    out.mkdir()
    assert run(capsys, root, "--k", 2, "--out", out)[0] == 0  # an existing empty folder is fine
    (out / "mine.txt").write_text("keep me")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = fails(capsys, root, "--k", 3, "--out", out)
    assert "already exists and is not empty; pass --overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused: untouched
    assert run(capsys, root, "--k", 3, "--out", out, "--overwrite")[0] == 0
    assert json.loads((out / "summary.json").read_text())["n_clusters"] == 3
    assert (out / "mine.txt").read_text() == "keep me"  # only hmlib's own files are replaced
    assert not list(out.glob(".hmlib-tmp-*"))
    (tmp_path / "afile").write_text("x")
    assert "is an existing file" in fails(capsys, root, "--k", 2, "--out", tmp_path / "afile")


def test_checkpoint_problems_are_one_line(mixed, tmp_path, monkeypatch, capsys):
    root, _ = mixed
    install_estimator(monkeypatch, FileNotFoundError("no zero-shot checkpoint: run notebook 03 first"))
    assert fails(capsys, root, "--k", 2) == "hmlib cluster: error: no zero-shot checkpoint: run notebook 03 first"
    install_estimator(monkeypatch, ArtifactError("checkpoint models/x.pt is corrupt\nsecond line"))
    assert fails(capsys, root, "--k", 2) == "hmlib cluster: error: checkpoint models/x.pt is corrupt"
    assert "checkpoint not found" in fails(capsys, root, "--k", 2, "--checkpoint", tmp_path / "missing.pt")


def test_missing_estimator_module_is_one_line(mixed, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hmlib.cluster.estimator", None)  # import fails as if it were not there
    assert "the clustering model is not available" in fails(capsys, mixed[0], "--k", 2)


def test_bad_numbers_are_errors(mixed, checkpoint, capsys):
    assert "--steps must be 0 or more" in fails(capsys, mixed[0], "--k", 2, "--steps", -1)
    assert "--limit must be at least 1" in fails(capsys, mixed[0], "--k", 2, "--limit", 0)


def test_estimator_breaking_its_contract_is_not_hidden(mixed, checkpoint, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(BrightnessClusterer, "fit", lambda self, images: setattr(self, "labels_", np.zeros(1))
                        or setattr(self, "confidence_", np.zeros(1)) or self)
    code, _, err = run(capsys, mixed[0], "--k", 2, "--out", tmp_path / "o")
    assert code == 1 and "Traceback" in err and "estimator labels_ must be" in err  # a bug: shown, not hidden
    assert not (tmp_path / "o").exists()


@pytest.fixture(params=["none", "recorded"])
def recorded_results(request, tmp_path, monkeypatch):
    """No results file, or one with cluster benchmark figures (percent signs included) for the --k help."""
    path = tmp_path / "results.json"
    if request.param == "recorded":
        write_json(path, {"benchmarks": {"cluster": {"mnist K=10: hmlib cluster %": 79.9,
                                                     "mnist K=10: k-means on the embedding %": 92.2}}})
    monkeypatch.setattr(hmlib.results, "RESULTS_FILE", path)
    return request.param


def test_help_lists_the_options(capsys, recorded_results):
    with pytest.raises(SystemExit) as info:
        cli.main(["cluster", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--k K", "--checkpoint CKPT", "--steps S", "--out DIR", "--overwrite", "--split", "PATH"):
        assert option in text
    expected = ("mnist K=10 79.9% (k-means on the embedding 92.2%)" if recorded_results == "recorded"
                else "no measurement recorded yet")
    assert expected in " ".join(text.split())


def test_console_entry_point_reports_a_missing_path(tmp_path):
    """The real ``python -m hmlib`` process: exit status 2 and one stderr line (nothing to replace here)."""
    proc = subprocess.run([sys.executable, "-m", "hmlib", "cluster", str(tmp_path / "nowhere"), "--k", "2"],
                          cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"hmlib cluster: error: {tmp_path / 'nowhere'} does not exist (expected a folder "
                                   "of images, a parquet mirror folder or a hub id such as 'org/name')")


def test_thousands_of_images_in_several_chunks_with_a_progress_bar(tmp_path, checkpoint, capsys):
    """More images than a task holds: decoded chunk by chunk (over worker processes), all of them assigned."""
    root = tmp_path / "many"
    for i, pattern in enumerate(class_patterns(np.arange(2000) % 5, 5, size=28, seed=1)):
        folder = root / f"batch_{i // 500}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern).save(folder / f"{i:04d}.png")
    code = cli.main(["cluster", str(root), "--k", "5", "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "decode" in err  # the tqdm bar
    rows = read_csv(tmp_path / "out" / "assignments.csv")[1:]
    assert len(rows) == 2000 and rows[0][0] == "batch_0/0000.png" and rows[-1][0] == "batch_3/1999.png"
    page = (tmp_path / "out" / "clusters.html").read_text()
    assert page.count("<section class='cluster'") == 5 and page.count("<img ") == 5 * 2 * 12
