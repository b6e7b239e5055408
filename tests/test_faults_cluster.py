"""Fault pass (issue 19) on ``hmlib cluster``'s inputs and its output folder, with the MODEL REPLACED by a stand-in.

A named pipe in the folder (it hung the run), ``--k auto`` on exactly ``--k-max`` images (scikit-learn's message),
an empty image set (IndexError), two runs into one ``--out`` at once (both said they succeeded), a folder that
cannot be written (found out only at the end), and values that meant nothing (``--k-max 1`` or ``--k-max`` with a
fixed K ignored, an empty PATH clustering the working directory, an empty ``--out`` writing into it).
:class:`cluster_fakes.BrightnessClusterer` stands in for the model: these tests check the command, not clustering
quality.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from cluster_fakes import BrightnessClusterer, install_estimator, write_checkpoint, write_mixed_folder
from datafactory import class_patterns
from hmlib import cli
from hmlib.cluster.estimator import as_images
from hmlib.cluster.images import ClusterInputError, export_image_folder, load_images
from hmlib.cluster.outputs import LOCK_NAME, OUTPUT_FILES, claim_out_dir

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 30
HOLD_CLAIM = ("import sys, time\nfrom hmlib.cluster.outputs import claim_out_dir\n"
              "with claim_out_dir(sys.argv[1], False):\n    print('held', flush=True)\n    time.sleep(120)")


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    path = write_checkpoint(tmp_path / "models" / "zero_shot.pt")
    install_estimator(monkeypatch, path)
    return path


@pytest.fixture
def mixed(tmp_path):
    root = tmp_path / "digits"
    return root, write_mixed_folder(root)


def run(capsys, *argv):
    code = cli.main(["cluster", *map(str, argv), "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _without_hanging(target, fifos: list[Path]):
    """Run ``target()`` in a thread; if it is still blocked after HANG_GUARD_S, open the pipes' write ends (so a
    reader blocked in open() returns) and fail: the old code hung forever on a FIFO."""
    result: dict = {}

    def work():
        try:
            result["value"] = target()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test thread
            result["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(10)
        pytest.fail(f"blocked for {HANG_GUARD_S} s on a named pipe")
    if "error" in result:
        raise result["error"]
    return result["value"]


# ------------------------------------------------------------------------------------- non-regular files

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_named_pipes_and_broken_links_are_skipped_and_listed_not_opened(mixed):
    root, files = mixed
    os.mkfifo(root / "pipe.png")
    os.mkfifo(root / "nested" / "queue")
    os.symlink(root / "pipe.png", root / "link_to_pipe.png")
    os.symlink(root / "nowhere.png", root / "dangling.png")
    os.symlink(root / "plain_L.png", root / "link_to_image.png")  # a link to a regular image is read
    fifos = [root / "pipe.png", root / "nested" / "queue"]
    collection = _without_hanging(lambda: load_images(root, progress=False), fifos)
    reasons = dict(collection.skipped)
    assert "named pipe" in reasons["pipe.png"] and "named pipe" in reasons["nested/queue"]
    assert "named pipe" in reasons["link_to_pipe.png"] and "broken symbolic link" in reasons["dangling.png"]
    assert sorted(collection.names) == sorted(files["images"] + ["link_to_image.png"])


def test_links_to_folders_are_followed_once_and_loops_are_listed(tmp_path):
    """A linked subfolder used to be dropped without a word (os.walk does not follow links); now its images are
    read, and a link that leads back to a folder already listed is skipped and listed, never walked forever."""
    root, elsewhere = tmp_path / "set", tmp_path / "elsewhere"
    export_image_folder(class_patterns(np.arange(3) % 3, 3, seed=1), root / "real")
    export_image_folder(class_patterns(np.arange(4) % 2, 3, seed=2), elsewhere)
    os.symlink(elsewhere, root / "more", target_is_directory=True)
    os.symlink(root, root / "real" / "loop", target_is_directory=True)
    os.symlink(elsewhere, root / "again", target_is_directory=True)
    collection = load_images(root, progress=False)
    assert len(collection.names) == 7 and sum(n.startswith("again/") for n in collection.names) == 4  # sorted first
    twice = "a link to a folder listed already; not read twice"
    assert dict(collection.skipped) == {"more/": twice, "real/loop/": twice}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
def test_hmlib_cluster_on_a_folder_with_a_pipe_finishes_and_lists_it(mixed, checkpoint, capsys, tmp_path):
    root, files = mixed
    os.mkfifo(root / "incoming.png")
    out = tmp_path / "out"
    code, stdout, err = _without_hanging(lambda: run(capsys, root, "--k", 2, "--out", out), [root / "incoming.png"])
    assert code == 0, err
    assert "  incoming.png: not a regular file (a named pipe (FIFO)); not read" in stdout
    summary = json.loads((out / "summary.json").read_text())
    reason = "not a regular file (a named pipe (FIFO)); not read"
    assert {"file": "incoming.png", "reason": reason} in summary["skipped"]
    assert summary["counts"]["images"] == len(files["images"])


# ------------------------------------------------------------------------------------- K and empty sets

def test_k_auto_on_exactly_k_max_images_chooses_among_the_scorable_k(tmp_path, checkpoint, capsys):
    export_image_folder(class_patterns(np.arange(5) % 3, 3, seed=1), tmp_path / "five")
    code, stdout, err = run(capsys, tmp_path / "five", "--k", "auto", "--k-max", 5, "--out", tmp_path / "out")
    assert code == 0, err
    assert sorted(BrightnessClusterer.created[-1].k_scores_) == [2, 3, 4]  # K = 5 (one image each) has no silhouette
    assert "chose K=" in stdout


def test_k_auto_needs_three_images(tmp_path, checkpoint, capsys):
    export_image_folder(class_patterns(np.arange(2), 2, seed=1), tmp_path / "two")
    code, _, err = run(capsys, tmp_path / "two", "--k", "auto", "--out", tmp_path / "out")
    assert code == 2
    assert "--k auto needs at least 3 images" in one_line(err) and "pass --k instead" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("empty", [np.zeros((0, 28, 28), np.uint8), np.zeros((0, 40, 40), np.uint8), []],
                         ids=["28x28", "other-size", "list"])
def test_no_images_is_one_clear_error(empty):
    with pytest.raises(ClusterInputError, match="no images to cluster"):
        as_images(empty)


def test_a_28x28_array_of_dark_ink_on_light_is_inverted_like_every_other_input():
    """The estimator's 28 x 28 array path used to pass arrays through untouched, so dark-on-light images reached the
    model inverted (on 500 inverted mnist test images, K = 10: 57% against 80% for the same images as PIL images)."""
    bright_on_dark = class_patterns(np.repeat(np.arange(4), 5), 4, seed=2)
    dark_on_light = 255 - bright_on_dark
    np.testing.assert_array_equal(as_images(dark_on_light), bright_on_dark)
    np.testing.assert_array_equal(as_images(bright_on_dark), bright_on_dark)  # already right: untouched
    from PIL import Image
    as_pil = as_images([Image.fromarray(a) for a in dark_on_light])  # the other paths agree on the polarity
    assert np.mean(as_pil[:, 0, :]) < 128 and np.mean(as_images(dark_on_light)[:, 0, :]) < 128


# ------------------------------------------------------------------------------------- the output folder

def _slow_fit(monkeypatch, seconds: float) -> None:
    fit = BrightnessClusterer.fit

    def slow(self, images):
        threading.Event().wait(seconds)
        return fit(self, images)

    monkeypatch.setattr(BrightnessClusterer, "fit", slow)


def test_two_runs_into_one_out_at_once_exactly_one_succeeds(mixed, checkpoint, capsys, tmp_path, monkeypatch):
    root, _ = mixed
    out = tmp_path / "shared_out"
    _slow_fit(monkeypatch, 2.0)
    codes: list[int] = []
    argv = ["cluster", str(root), "--out", str(out), "--quiet"]
    threads = [threading.Thread(target=lambda k=k: codes.append(cli.main([*argv, "--k", str(k)]))) for k in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(codes) == [0, 2]
    err = capsys.readouterr().err
    assert f"another hmlib cluster run is writing to {out} right now" in err
    assert "wait for it to finish, or choose another --out" in err
    summary = json.loads((out / "summary.json").read_text())  # the winner's files, all of them
    clusters = {int(line.split(",")[1]) for line in (out / "assignments.csv").read_text().splitlines()[1:]}
    assert summary["n_clusters"] in (2, 3) and max(clusters) < summary["n_clusters"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)  # the lock is gone, nothing half-written


def test_a_held_claim_refuses_even_with_overwrite_and_a_released_one_does_not(mixed, checkpoint, capsys, tmp_path):
    root, _ = mixed
    out = tmp_path / "out"
    with claim_out_dir(out, overwrite=False):
        code, _, err = run(capsys, root, "--k", 2, "--out", out, "--overwrite")
        assert code == 2 and "another hmlib cluster run is writing to" in one_line(err)
        assert BrightnessClusterer.created == []  # refused before any work
    assert run(capsys, root, "--k", 2, "--out", out)[0] == 0
    assert not (out / LOCK_NAME).exists()


def test_a_killed_run_leaves_no_stale_lock(mixed, checkpoint, capsys, tmp_path):
    root, _ = mixed
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_CLAIM, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run(capsys, root, "--k", 2, "--out", out)[0] == 2
        holder.kill()
        holder.wait(30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (out / LOCK_NAME).exists()  # left behind by the kill, but no longer locked
    code, _, err = run(capsys, root, "--k", 2, "--out", out)
    assert code == 0, err


def test_an_unwritable_out_is_refused_before_any_work(mixed, checkpoint, capsys, tmp_path, monkeypatch):
    root, _ = mixed
    out = tmp_path / "readonly" / "out"
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # root ignores chmod: simulate a read-only file system under tmp_path/readonly
        if str(kwargs.get("dir", "")).startswith(str(tmp_path / "readonly")):
            raise OSError(errno.EROFS, "Read-only file system", str(kwargs["dir"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    code, _, err = run(capsys, root, "--k", 2, "--out", out)
    assert code == 2
    assert one_line(err) == (f"hmlib cluster: error: cannot write {out}: the file system is read-only (EROFS); "
                             "choose another --out")
    assert BrightnessClusterer.created == []  # the model was never loaded: refused before the long work


# ------------------------------------------------------------------------------------- values that mean nothing

@pytest.mark.parametrize("argv, expected", [
    (["--k", "3", "--k-max", "1"], "--k-max must be at least 2 (got 1)"),
    (["--k", "auto", "--k-max", "1"], "--k-max must be at least 2 (got 1)"),
    (["--k", "3", "--k-max", "5"], "--k-max applies to --k auto only; with --k 3 leave it out"),
    (["--k", "3", "--out", ""], "--out '' names no folder"),
    (["--k", "3", "--split", ""], "--split '' names no split"),
    (["--k", "3", "--checkpoint", ""], "--checkpoint '' names no file"),
])
def test_cluster_values_that_mean_nothing_are_refused(mixed, checkpoint, hmlib_home, capsys, argv, expected):
    code, _, err = run(capsys, mixed[0], *argv)
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"hmlib cluster: error: {expected}"), line
    assert not (hmlib_home / "results").exists()


def test_cluster_refuses_an_empty_path_instead_of_clustering_the_working_directory(mixed, checkpoint, monkeypatch,
                                                                                    capsys):
    monkeypatch.chdir(mixed[0])  # '' would resolve to here: a folder full of images
    code, _, err = run(capsys, "", "--k", 2)
    assert code == 2 and "PATH '' names nothing" in one_line(err)
