"""HyperClusterer and `hmlib cluster` end to end on a real (tiny) trained checkpoint: no stand-in model here."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import silhouette_score

from datafactory import class_patterns
from hmlib import HyperClusterer, cli, paths
from hmlib.artifacts import ArtifactError, file_sha256, state_fingerprint, write_json
from hmlib.backbone.train import load_backbone
from hmlib.cluster import estimator
from hmlib.cluster.estimator import as_images, default_checkpoint
from hmlib.cluster.images import ClusterInputError, export_image_folder, load_images
from hmlib.hyper.adapt import adapt_candidates
from hmlib.features import normalize_task_np
from hmlib.hyper.bundle import load_bundle
from hmlib.metrics import clustering_accuracy
from tinyprotocol import K, train_home, use_home

NUM_IMAGES, PER_CLASS = 60, 10  # six classes of ten pattern images


@pytest.fixture(scope="module")
def trained(_tiny_mirror_root, tmp_path_factory):
    """The checkpoint of seed 0 (with models/pipeline.json naming it), trained once for the module."""
    return train_home(tmp_path_factory.mktemp("trained"), _tiny_mirror_root, [0])


@pytest.fixture
def ckpt(trained, hmlib_home, tiny_mirror):
    return use_home(trained, hmlib_home)


def patterns(num_classes: int, per_class: int = PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 28, 28) bar images of ``num_classes`` orientations and their labels."""
    labels = np.repeat(np.arange(num_classes), per_class)
    return class_patterns(labels, 6, seed=3), labels


def test_fit_predict_clusters_images_and_exposes_the_sklearn_attributes(ckpt):
    images, labels = patterns(K)
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=K)
    pred = clusterer.fit_predict(images)
    assert pred.shape == (len(images),) and set(pred) <= set(range(K))
    assert clusterer.labels_ is pred or np.array_equal(clusterer.labels_, pred)
    assert clusterer.confidence_.shape == (len(images),) and np.all((clusterer.confidence_ >= 0) & (clusterer.confidence_ <= 1))
    proba = clusterer.predict_proba(images)
    assert proba.shape == (len(images), K) and np.allclose(proba.sum(1), 1.0)
    np.testing.assert_array_equal(proba.argmax(1), pred)  # the fitted images are placed where fit put them
    assert clusterer.transform(images).shape == (len(images), clusterer.bundle.cfg.backbone.embed_dim)
    assert clustering_accuracy(pred, labels, K) > 1 / K + 0.2  # bars of distinct angles: well above chance


def test_any_k_and_pil_input_and_a_sample_for_large_sets(ckpt):
    images, labels = patterns(5)
    pil = [Image.fromarray(a).resize((40, 40)) for a in images]  # other size: hmlib's own preprocessing
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=5)
    assert clusterer.fit_predict(pil).shape == (len(pil),) and clusterer.predict_proba(pil).shape == (len(pil), 5)
    sampled = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=5, max_fit_images=20)
    assert sampled.fit_predict(images).shape == (len(images),)  # fitted on 20 images, every image assigned
    assert as_images(np.zeros((3, 28, 28), np.uint8)).shape == (3, 28, 28)


def test_bad_inputs_are_clear_errors(ckpt, tmp_path):
    without_backbone = dataclasses.replace(load_bundle(ckpt[("zero_shot", 0)]), backbone=None)
    with pytest.raises(ValueError, match="carries no backbone"):
        HyperClusterer(without_backbone, n_clusters=3)
    with pytest.raises(ValueError, match="at least 2"):
        HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=1)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        HyperClusterer.from_checkpoint(tmp_path / "nope.pt", n_clusters=3)
    # numbers that are not whole, or below what they count, used to be truncated (2.5 clusters became 2) or to fail
    # deep inside numpy (max_fit_images = -5)
    bundle = load_bundle(ckpt[("zero_shot", 0)])
    for kwargs, name in (({"n_clusters": 2.5}, "n_clusters"), ({"n_clusters": True}, "n_clusters"),
                         ({"n_clusters": "3"}, "n_clusters"), ({"n_clusters": float("nan")}, "n_clusters"),
                         ({"n_clusters": 3, "num_steps": 2.7}, "num_steps"),
                         ({"n_clusters": 3, "num_steps": -1}, "num_steps"),
                         ({"n_clusters": 4, "max_fit_images": 3}, "max_fit_images"),
                         ({"n_clusters": 3, "max_fit_images": -5}, "max_fit_images")):
        with pytest.raises(ValueError, match=f"{name} must be a whole number"):
            HyperClusterer(bundle, **kwargs)
    assert HyperClusterer(bundle, n_clusters=np.int64(3), num_steps=2.0).num_steps == 2  # whole numbers of any type
    with pytest.raises(ValueError, match="a candidate K must be a whole number"):
        HyperClusterer(bundle, n_clusters=2).select_n_clusters(patterns(3)[0], candidates=(2.5, 3))
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=3)
    with pytest.raises(ValueError, match="call fit"):
        clusterer.predict(patterns(3)[0])
    with pytest.raises(ValueError, match="uint8"):
        clusterer.fit(np.zeros((4, 28, 28), np.float32))
    with pytest.raises(ValueError, match="cannot form"):
        clusterer.fit(patterns(1, per_class=2)[0])


def variant_of(pipeline, name: str, newer_by: float = 60.0):
    """A copy of the pipeline's checkpoint at ``name`` (under models/), newer than it."""
    path = pipeline.parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pipeline, path)
    os.utime(path, (pipeline.stat().st_mtime + newer_by,) * 2)
    return path


def test_default_checkpoint_is_the_pipelines_never_a_newer_ablation_variant(ckpt):
    """Without results/ (models copied elsewhere), models/pipeline.json names the pipeline's checkpoint; notebook
    04's re-trained variants (models/ablations/variant_seed<s>-*.pt, newer) and a newer stray hypernet file are
    never taken for it."""
    pipeline = ckpt[("zero_shot", 0)]
    assert not paths.results_dir().exists() and (paths.models_dir() / "pipeline.json").is_file()
    variant_of(pipeline, "ablations/variant_seed0-abcdef12.pt")
    stray = variant_of(pipeline, "hypernet_seed0-abcdef12.pt", newer_by=120)
    assert default_checkpoint() == pipeline
    (paths.models_dir() / "pipeline.json").unlink()  # no manifest: the newest models/hypernet_seed<s>-*.pt
    assert default_checkpoint() == stray
    stray.unlink()
    assert default_checkpoint() == pipeline  # the variant under models/ablations/ is still never chosen


def test_default_checkpoint_prefers_the_evaluated_one_then_the_manifest(ckpt):
    pipeline = ckpt[("zero_shot", 0)]
    evaluated = variant_of(pipeline, "hypernet_seed0-0123abcd.pt", newer_by=-60)  # older than the manifest's
    write_json(paths.results_dir() / "eval_zero_shot.json",
               {"checkpoints": [{"path": f"/elsewhere/models/{evaluated.name}", "seed": 0}]})
    assert default_checkpoint() == evaluated
    evaluated.unlink()  # the record names a file that is gone: the manifest's
    assert default_checkpoint() == pipeline
    (paths.results_dir() / "eval_zero_shot.json").write_text("{torn")
    (paths.models_dir() / "pipeline.json").write_text("[not, a, mapping")
    assert default_checkpoint() == pipeline  # both records unreadable: the newest hypernet file
    seed1 = variant_of(pipeline, "hypernet_seed1-0123abcd.pt")
    assert default_checkpoint() == pipeline and seed1.is_file()  # seed 0 first, even when seed 1 is newer
    pipeline.unlink()
    assert default_checkpoint() == seed1
    seed1.unlink()
    with pytest.raises(ArtifactError, match="no hypernetwork checkpoint"):
        default_checkpoint()


def test_hmlib_cluster_end_to_end_on_a_folder(ckpt, tmp_path, capsys):
    images, labels = patterns(K)
    folder = export_image_folder(images, tmp_path / "photos" / "nested")
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code = cli.main(["cluster", str(tmp_path / "photos"), "--k", str(K), "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(out / "assignments.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(images) and rows[0]["file"] == "nested/00000.png"
    assert {int(r["cluster"]) for r in rows} <= set(range(K))
    pred = np.array([int(r["cluster"]) for r in rows])
    assert clustering_accuracy(pred, labels, K) > 1 / K + 0.2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_clusters"] == K and summary["checkpoint_sha256"]
    assert [s["file"] for s in summary["skipped"]] == ["broken.png"]
    page = (out / "clusters.html").read_text()
    assert page.count("data:image/png;base64,") >= K and "http" not in page.replace("http-equiv", "")
    assert cli.main(["cluster", str(tmp_path / "photos"), "--k", str(K), "--out", str(out), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_export_refuses_a_folder_that_holds_files(tmp_path):
    folder = export_image_folder(np.zeros((2, 28, 28), np.uint8), tmp_path / "f")
    with pytest.raises(ClusterInputError, match="not empty"):
        export_image_folder(np.zeros((2, 28, 28), np.uint8), folder)
    assert len(list(export_image_folder(np.zeros((3, 28, 28), np.uint8), folder, overwrite=True).iterdir())) == 3


def test_select_n_clusters_takes_the_best_silhouette_and_fits_with_it(ckpt):
    """K from the data: every candidate scored by the silhouette of its clusters on the normalised embedding."""
    images, labels = patterns(K)
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=2)
    chosen = clusterer.select_n_clusters(images, candidates=(2, 3, 4, 5))
    assert sorted(clusterer.k_scores_) == [2, 3, 4, 5] and chosen == max(clusterer.k_scores_, key=clusterer.k_scores_.get)
    assert clusterer.n_clusters == chosen and set(clusterer.labels_) <= set(range(chosen))
    z = normalize_task_np(clusterer.transform(images), l2=True)
    assert clusterer.k_scores_[chosen] == pytest.approx(silhouette_score(z, clusterer.labels_, random_state=0))
    assert chosen == K  # the pattern classes are far apart: the criterion must find them
    assert clusterer.describe()["k_selection"]["scores"].keys() == {"2", "3", "4", "5"}
    with pytest.raises(ValueError, match="at least 2"):
        clusterer.select_n_clusters(images, candidates=(1,))


def test_hmlib_cluster_k_auto_end_to_end(ckpt, tmp_path, capsys):
    images, _ = patterns(K)
    export_image_folder(images, tmp_path / "photos")
    out = tmp_path / "out"
    code = cli.main(["cluster", str(tmp_path / "photos"), "--k", "auto", "--k-max", "5", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert f"chose K={summary['n_clusters']} without labels" in text
    assert set(summary["estimator"]["k_selection"]["scores"]) == {"2", "3", "4", "5"}
    with open(out / "assignments.csv") as fh:
        assert {int(r["cluster"]) for r in csv.DictReader(fh)} <= set(range(summary["n_clusters"]))
    assert cli.main(["cluster", str(tmp_path / "photos"), "--k", "many", "--out", str(tmp_path / "o2")]) == 2
    assert "expected an integer or 'auto'" in capsys.readouterr().err
    assert cli.main(["cluster", str(tmp_path / "photos"), "--k", "auto", "--k-max", "1", "--out", str(tmp_path / "o3")]) == 2
    assert "--k-max must be at least 2" in capsys.readouterr().err


def test_fit_predict_on_no_images_is_one_clear_error(ckpt):
    """Issue 19: zero images raised IndexError from deep inside the encoder."""
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=3)
    with pytest.raises(ClusterInputError, match="no images to cluster"):
        clusterer.fit_predict(np.zeros((0, 28, 28), np.uint8))


def test_select_n_clusters_leaves_out_k_equal_to_the_number_of_images(ckpt):
    """Issue 19: a silhouette needs 2..n-1 clusters; K = n made scikit-learn refuse the whole selection."""
    images = patterns(6)[0][::PER_CLASS][:5]  # five images, one per class: K = 5 would give each its own cluster
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=2)
    clusterer.select_n_clusters(images, candidates=range(2, 6))
    assert sorted(clusterer.k_scores_) == [2, 3, 4]


# ----------------------------------------------------------------------------------- the label-free choice

def test_fit_uses_the_candidate_the_label_free_choice_keeps_and_describe_reports_it(ckpt):
    """fit adapts every test-time candidate on the set (one task) and keeps the chosen one: its labels are that
    candidate's clusters after the inner steps, and describe() reports its name ("generated", "stored" or
    "task")."""
    images, _ = patterns(K)
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=K)
    assert "candidate" not in clusterer.describe()
    clusterer.fit(images)
    cfg = clusterer.bundle.cfg
    names = [n for n in cfg.adapt.candidates if n in clusterer.bundle.hypernet.generator.candidates]
    assert len(names) == 3  # film: generated, stored and task statistics compete
    results, pick = adapt_candidates(clusterer.bundle.hypernet, clusterer._inputs(clusterer._rows(images), images),
                                     cfg.adapt, num_steps=clusterer.num_steps, num_classes=K)
    described = clusterer.describe()
    assert clusterer.candidate_ == described["candidate"] == names[int(pick[0])]
    assert described["candidate"] in ("generated", "stored", "task")
    np.testing.assert_array_equal(clusterer.labels_, results[int(pick[0])].logits[-1][0].argmax(-1).cpu().numpy())


def test_select_n_clusters_reports_the_candidate_of_the_chosen_k(ckpt, monkeypatch):
    """K auto: describe() reports the candidate kept for the chosen K, not that of the last K tried (the choice is
    scripted per K here, so the two differ)."""
    real, picks = estimator.adapt_candidates, {}

    def scripted(*args, num_classes, **kwargs):
        results, _ = real(*args, num_classes=num_classes, **kwargs)
        picks[num_classes] = 1 if num_classes == 5 else 2  # stored statistics for K = 5 only, else the task's
        return results, torch.full((1,), picks[num_classes])

    monkeypatch.setattr(estimator, "adapt_candidates", scripted)
    # 2 steps: a chosen K other than the last one tried (what the test needs; the count is not what it tests)
    clusterer = HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=2, num_steps=2)
    chosen = clusterer.select_n_clusters(patterns(K)[0], candidates=(2, 3, 4, 5))
    assert sorted(picks) == [2, 3, 4, 5] and chosen != 5
    assert picks[chosen] == 2 and clusterer.describe()["candidate"] == clusterer.candidate_ == "task"


# ----------------------------------------------------------------------------------- hmlib cluster --adapt

def capture_models(monkeypatch) -> list:
    """Record every HyperClusterer the command builds."""
    made, build = [], HyperClusterer.from_checkpoint.__func__

    def from_checkpoint(cls, *args, **kwargs):
        made.append(build(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(HyperClusterer, "from_checkpoint", classmethod(from_checkpoint))
    return made


def read_labels(out) -> np.ndarray:
    with open(out / "assignments.csv") as fh:
        return np.array([int(r["cluster"]) for r in csv.DictReader(fh)])


def test_hmlib_cluster_adapt_below_the_minimum_says_why_and_clusters_as_trained(ckpt, tmp_path, capsys):
    """--adapt on fewer than MIN_ADAPT_IMAGES images prints why it does not adapt, writes no backbone, and clusters
    exactly as without --adapt; adapt_to itself refuses such a set."""
    images, _ = patterns(K)
    export_image_folder(images, tmp_path / "photos")
    base = ["cluster", str(tmp_path / "photos"), "--k", str(K), "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli.main([*base, "--adapt", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"not adapting the backbone: --adapt needs at least {estimator.MIN_ADAPT_IMAGES:,} images" in printed
    assert f"these are {len(images)}" in printed and "adapted the backbone" not in printed
    assert not (out / "backbone_adapted.pt").exists()
    assert json.loads((out / "summary.json").read_text())["estimator"]["adapted_backbone"] == {
        "used": False, "reason": f"--adapt needs at least {estimator.MIN_ADAPT_IMAGES:,} images; these are {len(images)}"}
    np.testing.assert_array_equal(read_labels(out), read_labels(tmp_path / "plain"))
    # --overwrite into a folder where an earlier run saved an adapted backbone: that file does not stay beside the
    # new outputs (it would pass for this run's)
    (out / "backbone_adapted.pt").write_bytes(b"an earlier run's")
    assert cli.main([*base, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "backbone_adapted.pt").exists()
    assert "adapted_backbone" not in json.loads((out / "summary.json").read_text())["estimator"]
    with pytest.raises(ValueError, match="at least 1,000 images"):
        HyperClusterer.from_checkpoint(ckpt[("zero_shot", 0)], n_clusters=K).adapt_to(images)


def test_hmlib_cluster_adapt_saves_the_adapted_backbone_and_clusters_with_it(ckpt, tmp_path, capsys, monkeypatch):
    """Above the minimum (lowered here), --adapt adapts the checkpoint's backbone to the images (SCAN-style, the
    checkpoint's transductive settings: an evenly spaced sample of at most transductive.max_images), saves it as a
    loadable backbone checkpoint that says how many images it adapted to, records it in summary.json, and clusters
    with it: the assignments are those of the checkpoint with the saved backbone swapped in (the gate, scripted
    here, keeps the adaptation; the next test declines it)."""
    monkeypatch.setattr(estimator, "MIN_ADAPT_IMAGES", 50)
    kept = {"rule": "silhouette", "clusters": 4, "images": 120, "before": 0.2, "after": 0.3, "kept": "adapted"}
    monkeypatch.setattr(estimator, "gate_decision", lambda *args: kept)
    images, _ = patterns(6, per_class=20)  # 120 images
    export_image_folder(images, tmp_path / "photos")
    checkpoint = ckpt[("zero_shot", 0)]
    sha, original = file_sha256(checkpoint), load_bundle(checkpoint)
    sample = min(len(images), original.cfg.transductive.max_images)
    assert 50 <= sample < len(images)  # the tiny protocol adapts to a sample
    made = capture_models(monkeypatch)
    out = tmp_path / "out"
    code = cli.main(["cluster", str(tmp_path / "photos"), "--k", "4", "--adapt", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and f"adapted the backbone to {sample} images" in printed and "backbone_adapted.pt" in printed

    backbone, meta = load_backbone(out / "backbone_adapted.pt")
    assert meta["kind"] == "backbone" and meta["adapted_to"] == sample
    assert meta["transductive"]["epochs"] == original.cfg.transductive.epochs and len(meta["history"]) >= 1
    state = backbone.state_dict()
    assert meta["backbone_id"] == state_fingerprint(state) != original.backbone_meta["backbone_id"]
    assert any(not torch.equal(v, original.backbone.state_dict()[k].cpu()) for k, v in state.items())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["estimator"]["adapted_backbone"]["images"] == sample
    assert summary["estimator"]["adapted_backbone"]["epochs"] == original.cfg.transductive.epochs
    assert summary["estimator"]["adapted_backbone"]["used"] is True and meta["gate"] == kept
    assert "not using the adaptation" not in printed

    (model,) = made
    assert model.bundle.backbone is model.bundle.hypernet.generator.backbone
    for key, value in model.bundle.backbone.state_dict().items():
        assert torch.equal(value.cpu(), state[key]), key
    assert file_sha256(checkpoint) == sha  # the checkpoint itself is untouched
    swapped = load_bundle(checkpoint)
    swapped.hypernet.generator.backbone.load_state_dict(state)  # (copied to its device)
    expected = HyperClusterer(swapped, 4).fit_predict(load_images(tmp_path / "photos", progress=False).images)
    np.testing.assert_array_equal(read_labels(out), expected)


def cluster_plain_then_adapted(tmp_path, capsys) -> tuple:
    """120 pattern images clustered (K = 4) into tmp_path/plain, then with --adapt into tmp_path/out: (out, what
    the second printed)."""
    images, _ = patterns(6, per_class=20)
    export_image_folder(images, tmp_path / "photos")
    base = ["cluster", str(tmp_path / "photos"), "--k", "4", "--quiet"]
    assert cli.main([*base, "--out", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--adapt", "--out", str(tmp_path / "out")]) == 0
    return tmp_path / "out", capsys.readouterr().out


def test_hmlib_cluster_adapt_declined_by_the_confidence_rule_trains_nothing(ckpt, tmp_path, capsys, monkeypatch):
    """The default rule reads only the backbone as trained, so it is asked first: where it declines (the backbone
    recognises the images as its training classes), --adapt says so in one line, trains and saves nothing, records
    the decision in summary.json, and clusters exactly as without --adapt."""
    monkeypatch.setattr(estimator, "MIN_ADAPT_IMAGES", 50)
    declined = {"rule": "confidence", "threshold": 0.53, "images": 120, "repeats": 5, "confidence": 0.81,
                "confidence_ci": [0.79, 0.83], "kept": "start"}
    asked = []
    monkeypatch.setattr(estimator, "gate_decision", lambda *args: asked.append(args[2]) or declined)
    monkeypatch.setattr(estimator, "train_transductive", lambda *a, **k: pytest.fail("declined: nothing to train"))
    out, printed = cluster_plain_then_adapted(tmp_path, capsys)
    assert asked == [None]  # asked once, before any adaptation existed
    assert "adapted the backbone to" not in printed and "--adapt: not using the adaptation" in printed
    assert "mean confidence 0.810" in printed and "used as trained" in printed
    assert not (out / "backbone_adapted.pt").exists()
    recorded = json.loads((out / "summary.json").read_text())["estimator"]["adapted_backbone"]
    assert recorded["used"] is False and recorded["gate"] == declined and recorded["epochs"] == 0
    np.testing.assert_array_equal(read_labels(out), read_labels(tmp_path / "plain"))


def test_hmlib_cluster_adapt_declined_by_the_gate_clusters_as_trained(ckpt, tmp_path, capsys, monkeypatch):
    """Where a rule that reads the adaptation (transductive.gate = "silhouette") declines it (k-means separates the
    images less clearly after it), --adapt says so in one line, still saves the adapted backbone with the decision
    for inspection, records it in summary.json, and clusters exactly as without --adapt."""
    monkeypatch.setattr(estimator, "MIN_ADAPT_IMAGES", 50)
    monkeypatch.setattr(estimator, "decides_before_adapting", lambda cfg: False)  # as "silhouette" (not the default)
    declined = {"rule": "silhouette", "clusters": 4, "images": 120, "before": 0.31, "after": 0.27, "kept": "start"}
    monkeypatch.setattr(estimator, "gate_decision", lambda *args: declined)
    out, printed = cluster_plain_then_adapted(tmp_path, capsys)
    assert "adapted the backbone to" in printed and "--adapt: not using the adaptation" in printed
    assert "0.310 -> 0.270" in printed and "used as trained" in printed
    _, meta = load_backbone(out / "backbone_adapted.pt")
    assert meta["gate"] == declined
    recorded = json.loads((out / "summary.json").read_text())["estimator"]["adapted_backbone"]
    assert recorded["used"] is False and recorded["gate"] == declined
    np.testing.assert_array_equal(read_labels(out), read_labels(tmp_path / "plain"))


def test_hmlib_cluster_no_gate_uses_the_adaptation_regardless_and_needs_adapt(ckpt, tmp_path, capsys, monkeypatch):
    """--no-gate with --adapt: the adapted backbone is used without asking the gate (recorded as such); --no-gate
    without --adapt is refused in one line, before anything is read."""
    monkeypatch.setattr(estimator, "MIN_ADAPT_IMAGES", 50)
    images, _ = patterns(6, per_class=20)
    export_image_folder(images, tmp_path / "photos")
    base = ["cluster", str(tmp_path / "photos"), "--k", "4", "--quiet"]
    assert cli.main([*base, "--no-gate", "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "--no-gate applies to --adapt only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    assert cli.main([*base, "--adapt", "--no-gate", "--out", str(out)]) == 0
    assert "not using the adaptation" not in capsys.readouterr().out
    recorded = json.loads((out / "summary.json").read_text())["estimator"]["adapted_backbone"]
    assert recorded["used"] is True and recorded["gate"] == {"rule": "off", "kept": "adapted"}
