"""One device, chosen once (``device`` / ``--device``), reaches every stage; checkpoints move between devices.

Nothing here needs a GPU, and nothing is skipped without one:

* tensor-level code (the inner loop, the candidates, the cluster operations, the modulated backbone, the plain
  adaptation, augmentation) runs on torch's ``meta`` device, where, as on a GPU, combining a tensor with a CPU
  tensor is an error: a tensor made without ``device=`` inside them fails here;
* the stages run the tiny protocol with ``device = 'cuda:1'`` while ``resolve_device`` (in every stage module)
  records the name it is asked for and answers ``cpu:0``, a CPU device that differs from plain ``cpu`` in every
  ``.to(...)`` call: spies on ``Module.to`` and ``Tensor.to`` then show that each stage moved its models and its
  batches to the device it was given (a device derived from a CPU tensor would read ``cpu``);
* tensors that refuse ``.numpy()`` until copied with ``.cpu()``, as GPU tensors do (``OnGpu``), flow through every
  path from the models to numpy;
* checkpoints are written with their storages tagged ``cuda:0``, as a GPU writes them, and loaded here.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.serialization

from cluster_fakes import BrightnessClusterer, install_estimator, write_checkpoint, write_mixed_folder
from fakes import install_fake_data
from hmlib import cli, data
from hmlib.ablations.run import _cache_identity, ablation_grid, variant_curves
from hmlib.ablations.spec import Ablation, Variant
from hmlib.artifacts import SCHEMA_VERSION, load_checkpoint, on_cpu, save_checkpoint
from hmlib.backbone import modulation as mod
from hmlib.backbone.model import ConvBackbone, augment
from hmlib.backbone.train import backbone_identity
from hmlib.backbone.embeddings import embed_images
from hmlib.backbone.transductive import mine_neighbours, transductive_identity
from hmlib.cluster.estimator import HyperClusterer
from hmlib.config import ConfigError, configure_runtime, load_config, resolve_device
from hmlib.evaluation import plain_adaptation as plain
from hmlib.evaluation.evaluate import evaluate_setting
from hmlib.features import to_device
from hmlib.hyper import cluster_ops
from hmlib.hyper.adapt import adapt, adapt_candidates, features_of, predict_clusters, predict_task
from hmlib.hyper.bundle import load_bundle
from hmlib.hyper.checkpoints import training_settings
from hmlib.hyper.episodes import Episode
from hmlib.hyper.generators import TaskInputs
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.losses import aligned_cross_entropy, task_accuracy
from hmlib.runner import NotebookRun, run_notebooks
from hmlib.vae.train import encode_images, get_vae, vae_identity, vae_path
from hmlib.widgets import AdaptationExplorer
from tinyprotocol import K, LATENT_DIM, N, TrainedHome, tiny_config, train_home, use_home

META = torch.device("meta")
RESOLVED = torch.device("cpu", 0)  # what the recording resolve_device answers: the CPU, told apart from "cpu"
CONFIGURED = "cuda:1"  # the device the stage test's config names (never resolved for real)
STAGE_MODULES = ("hmlib.vae.train", "hmlib.backbone.train", "hmlib.backbone.transductive", "hmlib.hyper.metatrain",
                 "hmlib.hyper.bundle", "hmlib.evaluation.evaluate", "hmlib.ablations.run")
T, M = 2, 12  # tasks and images per task of the meta-device tests


def no_cuda(monkeypatch) -> None:
    """This machine has no CUDA GPU and no MPS, whatever machine runs the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# ------------------------------------------------------------------------------ the device setting

@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps"])
def test_device_names_the_config_accepts(name):
    """Any device name is accepted when a config is read (whether this machine has it is checked when it is used:
    a checkpoint made on a GPU records 'cuda' and must still load here)."""
    assert load_config("smoke", overrides={"device": name}).device == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:x", "cuda:", "meta", "", "cpu:0", 0])
def test_other_device_names_are_one_line_config_errors(name):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides={"device": name})
    assert str(err.value).startswith("device must be 'auto', 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps', got ")
    assert "\n" not in str(err.value)


def test_resolve_device_refuses_a_gpu_this_machine_lacks(monkeypatch):
    no_cuda(monkeypatch)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    for name, words in (("cuda", "sees no CUDA GPU"), ("cuda:1", "sees no CUDA GPU"), ("mps", "MPS")):
        with pytest.raises(ConfigError, match=words):
            resolve_device(name)
    with pytest.raises(ConfigError, match="no CUDA GPU"):  # a stage fails at once, in one line, not in a kernel
        configure_runtime(load_config("smoke", overrides={"device": "cuda", "num_threads": None}))


def test_resolve_device_picks_the_gpu_and_checks_its_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_hmlib_device_overrides_the_config_file_not_explicit_overrides(tmp_path, monkeypatch):
    """``hmlib run --device`` reaches the notebook kernels as HMLIB_DEVICE, which load_config applies over the
    config file (the notebooks call load_config(profile, config_path)); explicit overrides still win."""
    path = tmp_path / "gpu.json"
    path.write_text('{"device": "cuda"}')
    assert load_config("smoke", path).device == "cuda"
    monkeypatch.setenv("HMLIB_DEVICE", "cpu")
    assert load_config("smoke", path).device == "cpu"
    assert load_config("smoke", path, {"device": "mps"}).device == "mps"
    monkeypatch.setenv("HMLIB_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="device must be"):
        load_config("smoke")


# ----------------------------------------------------------------------- identity and checkpoints

def test_the_device_is_in_no_artifact_identity():
    """Decision: the device is no part of any artifact's identity (hashes, names, result caches), so a model made on
    a GPU is reused on the CPU; the device that made it is recorded in its meta instead."""
    on_gpu, on_cpu_ = tiny_config(device="cuda"), tiny_config(device="cpu")
    fingerprints = {"mnist": "abc"}
    assert vae_identity(on_gpu, "shared", 0, fingerprints) == vae_identity(on_cpu_, "shared", 0, fingerprints)
    assert vae_path(on_gpu, "shared", 0, vae_identity(on_gpu, "shared", 0, fingerprints)) == \
        vae_path(on_cpu_, "shared", 0, vae_identity(on_cpu_, "shared", 0, fingerprints))
    assert backbone_identity(on_gpu, 0, fingerprints) == backbone_identity(on_cpu_, 0, fingerprints)
    image_set = type("ImageSet", (), {"name": "mnist", "fingerprint": "abc"})()
    assert transductive_identity(on_gpu, {"backbone_id": "b"}, image_set) == \
        transductive_identity(on_cpu_, {"backbone_id": "b"}, image_set)
    assert training_settings(on_gpu) == training_settings(on_cpu_)  # the hypernetwork's name and reuse
    ablation = Ablation("steps", "steps", "?", (Variant("main"),), None)
    assert _cache_identity(on_gpu, ablation, []) == _cache_identity(on_cpu_, ablation, [])


def save_as_a_gpu_would(path, state, meta) -> None:
    """A checkpoint as ``save_checkpoint`` writes it, but with every storage tagged 'cuda:0' (what torch.save writes
    for tensors that live on a GPU)."""
    payload = {"schema_version": SCHEMA_VERSION, "meta": dict(meta), "state": dict(state)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(payload, path)


def test_a_checkpoint_written_on_a_gpu_loads_on_this_cpu(tmp_path):
    state = {"weight": torch.arange(6.0).view(2, 3), "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}}}
    path = tmp_path / "gpu.pt"
    save_as_a_gpu_would(path, state, {"kind": "test", "device": "cuda:0"})
    if not torch.cuda.is_available():  # the file really claims a GPU: torch's own default cannot load it here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    loaded, meta = load_checkpoint(path)
    assert meta["device"] == "cuda:0"
    assert loaded["weight"].device == torch.device("cpu") and torch.equal(loaded["weight"], state["weight"])
    assert loaded["optimizer"]["state"][0]["exp_avg"].device == torch.device("cpu")
    assert load_checkpoint(path, map_location=META)[0]["weight"].device == META  # or onto a chosen device


class OnAnotherDevice(torch.Tensor):
    """A tensor that stands for one on a GPU: it must be copied to the CPU (``.cpu()``) before it is written."""

    copied = 0

    def cpu(self, *args, **kwargs):
        OnAnotherDevice.copied += 1
        return super().cpu(*args, **kwargs).as_subclass(torch.Tensor)


def test_save_checkpoint_writes_cpu_tensors_from_any_device(tmp_path):
    """States and optimiser states (nested dicts and lists) are copied to the CPU before they are written; a tensor
    of another kind left in the file would not load with weights_only."""
    gpu = lambda t: t.as_subclass(OnAnotherDevice)  # noqa: E731
    state = {"model": {"w": gpu(torch.ones(2, 2))}, "optimizer": {"state": {0: {"exp_avg": gpu(torch.zeros(2))}},
                                                                   "param_groups": [{"params": [0], "lr": 0.1}]},
             "history": [gpu(torch.tensor(1.0)), (gpu(torch.tensor(2.0)), 3)]}
    OnAnotherDevice.copied = 0
    save_checkpoint(tmp_path / "c.pt", state, {"kind": "test"})
    assert OnAnotherDevice.copied == 4
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    assert type(loaded["model"]["w"]) is torch.Tensor and torch.equal(loaded["model"]["w"], torch.ones(2, 2))
    assert loaded["optimizer"]["param_groups"] == [{"params": [0], "lr": 0.1}]
    assert isinstance(loaded["history"][1], tuple) and loaded["history"][1][1] == 3
    assert on_cpu({"a": [1, "x"]}) == {"a": [1, "x"]}


def test_a_vae_trained_on_a_gpu_is_reused_on_the_cpu(monkeypatch, capsys):
    """The decision, end to end: the same settings find the GPU's checkpoint (same name), load it on the CPU and
    say which device made it; its identity (the weights' hash) and so every downstream cache stay valid."""
    install_fake_data(monkeypatch, 40)
    cfg = tiny_config(device="cpu", vae={"latent_dim": 4, "epochs": 1, "batch_size": 16, "max_train_images": 32})
    _, made = get_vae(cfg, "shared", 0, progress=False)
    assert made["device"] == "cpu" and not made["reused"]
    state, meta = load_checkpoint(made["path"])
    save_as_a_gpu_would(made["path"], state, {**meta, "device": "cuda:0"})
    vae, reused = get_vae(cfg, "shared", 0, progress=False)
    assert reused["reused"] and reused["path"] == made["path"] and reused["device"] == "cuda:0"
    assert reused["vae_id"] == made["vae_id"]
    assert all(p.device == torch.device("cpu") for p in vae.parameters())


# --------------------------------------------------------------- tensor-level code on the meta device

@pytest.fixture(scope="module")
def meta_hypernet() -> HyperNet:
    """A tiny 'film' hypernetwork (its backbone included) on the meta device; the test-time choice by silhouette
    (the learned selector reads a flag: data)."""
    cfg = tiny_config(adapt={"choice": "silhouette"})
    return HyperNet(cfg, 8, K, backbone=ConvBackbone((4, 8), 8, 6)).to(META)


def cpu_inputs(num_tasks: int = T, num_images: int = M) -> TaskInputs:
    """Tasks as every loader builds them: on the CPU."""
    generator = torch.Generator().manual_seed(0)
    return TaskInputs(torch.randn(num_tasks, num_images, 8, generator=generator),
                      torch.randint(0, 256, (num_tasks, num_images, 28, 28), dtype=torch.uint8, generator=generator))


def test_the_inner_loop_runs_where_the_hypernetwork_is(meta_hypernet):
    """CPU tasks are copied to the hypernetwork's device; meta-training's inner loop (graph kept) and test time's
    keep every tensor there (a CPU tensor made inside would fail on meta, as on a GPU)."""
    cfg = tiny_config(adapt={"choice": "silhouette"}).adapt
    assert meta_hypernet.device == META and meta_hypernet.check(cpu_inputs()).images.device == META
    for graph in (True, False):
        result = adapt(meta_hypernet, cpu_inputs(), cfg, num_steps=2, create_graph=graph, num_classes=K)
        assert all(l.device == META for l in result.logits) and all(v.device == META for v in result.params.values())
        assert features_of(meta_hypernet, result).device == META
    noise_context = torch.randn(T, M, 8)  # the conditioning ablations pass CPU rows of their own
    assert adapt(meta_hypernet, cpu_inputs(), cfg, num_steps=1, num_classes=K,
                 context=noise_context).logits[-1].device == META
    other = TaskInputs(torch.randn(T, 5, 8), torch.randint(0, 256, (T, 5, 28, 28), dtype=torch.uint8))
    assert meta_hypernet.extend(result.params, result.state, other).device == META  # HyperClusterer's assignment


@pytest.mark.parametrize("candidates", [("generated", "stored", "task"), ("generated",)])
def test_the_test_time_choice_and_prediction_stay_on_the_device(meta_hypernet, candidates):
    cfg = tiny_config(adapt={"choice": "silhouette", "candidates": list(candidates)}).adapt
    results, pick = adapt_candidates(meta_hypernet, cpu_inputs(), cfg, num_steps=1, num_classes=K)
    assert pick.device == META and len(results) == len(candidates)
    assert predict_task(meta_hypernet, cpu_inputs(3), cfg, 1, num_classes=K, chunk=2).shape[:2] == (2, 3)
    assert predict_task(meta_hypernet, cpu_inputs(3), cfg, 1, num_classes=K, chunk=2).device == META


def test_cluster_operations_and_the_modulated_backbone_stay_on_the_device(meta_hypernet):
    h = torch.randn(T, M, 4, device=META)
    prototypes = cluster_ops.kmeans_prototypes(h, K, iters=2, inits=2)  # random seeding drawn on the CPU, moved
    assert prototypes.device == META
    assert cluster_ops.cosine_logits(h, prototypes, torch.zeros(T, 1, device=META)).device == META
    labels = torch.zeros(T, M, dtype=torch.long, device=META)
    assert cluster_ops.class_centroid_logits(h, labels, K, torch.zeros(T, 1, device=META)).device == META
    backbone = meta_hypernet.generator.backbone
    identity = mod.identity(backbone, T, blend=1.0)
    assert all(t.device == META for t in identity.tensors().values())
    assert mod.embed(backbone, torch.rand(T, M, 1, 28, 28, device=META), identity).device == META
    x = torch.rand(3, 1, 28, 28, device=META)
    assert augment(x, torch.Generator().manual_seed(0)).device == META  # CPU random numbers, device images


def test_plain_adaptation_runs_on_the_backbones_device(meta_hypernet):
    """The baseline without meta-learning is torch code too: its modulation, temperature and steps follow the
    backbone (the images are copied there by adapt_tasks; its result comes back to the CPU as numpy)."""
    backbone = meta_hypernet.generator.backbone
    flags = [p.requires_grad for p in backbone.parameters()]
    backbone.requires_grad_(False)  # as adapt_tasks does around it
    try:
        z = plain._adapt_chunk(backbone, torch.rand(T, M, 1, 28, 28, device=META), K, 1.0, 2, 0.01)
    finally:
        for p, flag in zip(backbone.parameters(), flags):
            p.requires_grad_(flag)
    assert z.device == META and z.shape[:2] == (T, M)


def test_batches_are_copied_to_the_device():
    labels = torch.zeros(T, M, dtype=torch.long)
    episode = Episode(cpu_inputs(), labels, K, ["none"] * T).to(META)
    assert episode.inputs.context.device == episode.inputs.images.device == episode.labels.device == META
    assert to_device(labels, META).device == META and to_device(labels, "cpu") is labels  # no copy on the CPU


# ----------------------------------------------------------------------------- the stages, recorded

@dataclass
class Placement:
    """What the stages asked for and where they put things while the tiny protocol ran."""

    asked: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))  # module -> device names
    modules: set[str] = field(default_factory=set)  # "<class>@<function>" of every module moved to RESOLVED
    batches: set[str] = field(default_factory=set)  # functions that copied a tensor (not a module's) to RESOLVED
    home: object = None
    trained: TrainedHome | None = None
    checkpoint: object = None
    cluster_labels: object = None
    results: dict = field(default_factory=dict)

    def resolver(self, module: str):
        def resolve(name: str = "auto") -> torch.device:
            self.asked[module].append(name)
            return RESOLVED
        return resolve


def _caller() -> tuple[str, bool]:
    """(the first function up the stack that is neither torch's, this module's nor a copying helper such as to_device
    or TaskInputs.to; whether the copy is part of moving a module)."""
    frame, in_module = sys._getframe(2), False
    while frame is not None and (frame.f_globals.get("__name__", "").startswith(("torch", __name__))
                                 or frame.f_code.co_name in ("to_device", "to")):
        in_module = in_module or frame.f_code.co_name == "_apply"
        frame = frame.f_back
    return (frame.f_code.co_name if frame is not None else "?"), in_module


@pytest.fixture(scope="module")
def placed(tmp_path_factory, _tiny_mirror_root) -> Placement:
    """Every stage of the tiny protocol with ``device = 'cuda:1'``: VAE, backbone, meta-training, the transductive
    backbone, an evaluation, ablation variants, the explorer and HyperClusterer."""
    record = Placement(home=tmp_path_factory.mktemp("placed"))
    module_to, tensor_to = torch.nn.Module.to, torch.Tensor.to

    def spy_module_to(self, *args, **kwargs):
        if RESOLVED in args or kwargs.get("device") == RESOLVED:
            record.modules.add(f"{type(self).__name__}@{_caller()[0]}")
        return module_to(self, *args, **kwargs)

    def spy_tensor_to(self, *args, **kwargs):
        if RESOLVED in args or kwargs.get("device") == RESOLVED:
            name, in_module = _caller()
            if not in_module:
                record.batches.add(name)
        return tensor_to(self, *args, **kwargs)

    cfg = tiny_config(device=CONFIGURED)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("HMLIB_HOME", record.home), ("HMLIB_DATA_DIR", _tiny_mirror_root),
                            ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1")):
            patch.setenv(name, str(value))
        patch.delenv("HMLIB_DEVICE", raising=False)
        for name in STAGE_MODULES:
            patch.setattr(importlib.import_module(name), "resolve_device", record.resolver(name))
        patch.setattr(torch.nn.Module, "to", spy_module_to)
        patch.setattr(torch.Tensor, "to", spy_tensor_to)
        record.trained = train_home(record.home, _tiny_mirror_root, [("transductive", 0)], cfg=cfg)
        record.checkpoint = record.home / "models" / record.trained.checkpoints[("transductive", 0)]
        record.results["eval"] = evaluate_setting(cfg, [record.checkpoint], "transductive", datasets=["mnist"],
                                                  shapes=[(K, N)], progress=False)
        condition = ablation_grid(cfg)[0]
        memo: dict = {}
        for variant in (Variant("untrained", untrained=True), Variant("noise", context="noise"),
                        Variant("statistics", backbone="statistics")):
            record.results[variant.label] = variant_curves(cfg, variant, condition, 0, memo)
        record.results["explorer"] = AdaptationExplorer.from_config(cfg, datasets=["mnist"]).state
        images = data.load_split("mnist", "test", cfg.data).images[:40]
        clusterer = HyperClusterer.from_checkpoint(record.checkpoint, n_clusters=K, device=RESOLVED)
        record.cluster_labels = clusterer.fit_predict(images)
    return record


def test_every_stage_asks_for_the_configured_device(placed):
    for module in ("hmlib.vae.train", "hmlib.backbone.train", "hmlib.backbone.transductive", "hmlib.hyper.metatrain",
                   "hmlib.evaluation.evaluate", "hmlib.ablations.run"):
        assert CONFIGURED in placed.asked[module], module
    assert str(RESOLVED) in placed.asked["hmlib.hyper.bundle"]  # bundles load where the caller resolved


def test_every_stage_moves_its_models_to_that_device(placed):
    """The VAE, the backbone (trained, reused and adapted), the hypernetwork (meta-trained and loaded from its
    bundle) and the transductive clustering head all went to the resolved device, each where it is made."""
    assert {"VAE@get_vae", "ConvBackbone@train_backbone", "ConvBackbone@get_backbone", "HyperNet@fit_hypernet",
            "HyperNet@load_bundle", "VAE@load_bundle", "ConvBackbone@train_transductive", "Linear@train_transductive",
            "ConvBackbone@_adapted_backbone"} <= placed.modules, placed.modules


def test_training_batches_are_copied_to_that_device(placed):
    """Batches are built on the CPU and copied by each training loop: VAE, backbone, transductive, meta-training."""
    assert {"train_vae", "train_backbone", "train_transductive", "fit_hypernet"} <= placed.batches, placed.batches


def test_checkpoints_record_the_device_that_made_them(placed):
    models = placed.home / "models"
    for pattern in ("vae_shared_*.pt", "backbone_seed0-*.pt", "backbone_seed0_on-*.pt", "hypernet_seed0-*.pt"):
        paths = sorted(models.glob(pattern))
        assert paths, pattern
        assert all(load_checkpoint(p)[1]["device"] == str(RESOLVED) for p in paths), pattern


def test_results_come_back_to_the_cpu_as_numpy(placed):
    assert isinstance(placed.cluster_labels, np.ndarray) and placed.cluster_labels.shape == (40,)
    assert all(isinstance(placed.results[k], np.ndarray) for k in ("untrained", "noise", "statistics"))
    assert isinstance(placed.results["explorer"].embedding, np.ndarray)
    assert placed.results["eval"]["conditions"] and placed.results["eval"]["summary"]


def test_a_bundle_and_a_clusterer_load_onto_the_chosen_device(placed, hmlib_home, tiny_mirror):
    path = use_home(placed.trained, hmlib_home)[("transductive", 0)]
    bundle = load_bundle(path, META)  # made with device 'cuda:1' (recorded in its config): loaded where asked
    assert bundle.cfg.device == CONFIGURED and bundle.device == bundle.hypernet.device == META
    assert all(p.device == META for model in (bundle.hypernet, bundle.vae, bundle.backbone)
               for p in model.parameters())
    clusterer = HyperClusterer.from_checkpoint(path, n_clusters=K, device=META)
    assert clusterer.device == META and clusterer.describe()["device"] == "meta"


class OnGpu(torch.Tensor):
    """Stands for a GPU tensor: whatever is computed from it is one too, and numpy refuses it until ``.cpu()``."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a device tensor to numpy: copy it to the CPU first (.cpu())")

    def cpu(self, *args, **kwargs):
        return super().cpu(*args, **kwargs).as_subclass(torch.Tensor)


def on_gpu(value):
    """Tensors (in a tuple, or TaskInputs) as OnGpu."""
    if isinstance(value, TaskInputs):
        return TaskInputs(*(None if t is None else t.as_subclass(OnGpu) for t in (value.context, value.images,
                                                                                  value.features)))
    if isinstance(value, tuple):
        return tuple(on_gpu(v) for v in value)
    return value.as_subclass(OnGpu)


def test_tensors_reach_numpy_only_through_the_cpu(placed, hmlib_home, tiny_mirror, monkeypatch):
    """Every path from the models to numpy (the explorer, HyperClusterer, the plain adaptation, encoding, embedding,
    neighbour mining, accuracies) copies to the CPU first: fed with tensors that refuse numpy as GPU tensors do,
    each still returns numpy arrays."""
    path = use_home(placed.trained, hmlib_home)[("transductive", 0)]
    cfg = dataclasses.replace(placed.trained.cfg, device="cpu")
    check = HyperNet.check
    monkeypatch.setattr(HyperNet, "check", lambda self, inputs: on_gpu(check(self, inputs)))
    state = AdaptationExplorer.from_config(cfg, datasets=["mnist"]).state
    assert isinstance(state.embedding, np.ndarray) and isinstance(state.pred, np.ndarray)
    images = data.load_split("mnist", "test", cfg.data).images[:40]
    clusterer = HyperClusterer.from_checkpoint(path, n_clusters=K, device="cpu")
    assert clusterer.fit_predict(images).shape == (40,) and clusterer.predict_proba(images[:5]).shape == (5, K)
    bundle = clusterer.bundle
    task = TaskInputs(torch.zeros(1, N, 2 * LATENT_DIM), torch.as_tensor(images[None, :N]))
    assert predict_clusters(bundle.hypernet, task, cfg.adapt, 1, num_classes=K).shape == (2, 1, N)
    z = plain.adapt_tasks(bundle.backbone, on_gpu(torch.as_tensor(images[None, :N])), K, blend=1.0, steps=1, lr=0.01)
    assert isinstance(z.embeddings, np.ndarray)
    encode, embed = bundle.vae.encode, bundle.backbone.embed
    monkeypatch.setattr(bundle.vae, "encode", lambda x: on_gpu(encode(x)))
    monkeypatch.setattr(bundle.backbone, "embed", lambda x: on_gpu(embed(x)))
    assert all(isinstance(a, np.ndarray) for a in encode_images(bundle.vae, images))
    assert isinstance(embed_images(bundle.backbone, images), np.ndarray)
    rows = embed_images(bundle.backbone, images)
    monkeypatch.setattr("hmlib.backbone.transductive.embed_images", lambda model, x: on_gpu(torch.as_tensor(rows)))
    assert mine_neighbours(bundle.backbone, images, 3).shape == (40, 3)
    logits = on_gpu(torch.randn(2, N, K))
    labels = torch.as_tensor(np.tile(np.arange(K), N // K)[None].repeat(2, 0))
    assert task_accuracy(logits, labels).shape == (2,) and aligned_cross_entropy(logits, labels).dim() == 0


# ---------------------------------------------------------------------------------- the commands

def test_run_hands_the_device_to_every_kernel(monkeypatch, tmp_path):
    """``hmlib run --device`` is checked before any kernel starts, then reaches every kernel as HMLIB_DEVICE."""
    envs = []

    def execute(source, parameters, out_dir, *, timeout, progress, env):
        envs.append(dict(env))
        return NotebookRun(source.stem, "ok", 0.0, tmp_path / source.name, None)

    monkeypatch.setattr("hmlib.runner.execute_notebook", execute)
    run_notebooks("smoke", only=["01", "02"], progress=False, device="cpu")
    assert [env["HMLIB_DEVICE"] for env in envs] == ["cpu", "cpu"]
    monkeypatch.setenv("HMLIB_DEVICE", envs[0]["HMLIB_DEVICE"])  # what a kernel's load_config then reads
    assert load_config("smoke").device == "cpu"
    no_cuda(monkeypatch)
    envs.clear()
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run_notebooks("smoke", only=["01"], progress=False, device="cuda")
    assert envs == []  # failed before any notebook


@pytest.mark.parametrize("command", [["run"], ["eval", "--checkpoint", "x.pt"], ["benchmark"],
                                     ["cluster", ".", "--k", "2"]])
def test_every_command_checks_device_like_the_config(command, capsys):
    assert cli.main([*command, "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device" in err[0] and "device must be 'auto', 'cpu', 'cuda'" in err[0]


class Captured(Exception):
    """Raised by a stand-in for the work a command would do, after recording its config."""


def test_eval_and_benchmark_take_their_device_from_the_command_line(placed, hmlib_home, tiny_mirror, monkeypatch,
                                                                    capsys):
    checkpoint = use_home(placed.trained, hmlib_home)[("transductive", 0)]
    seen = []

    def capture(cfg, *args, **kwargs):
        seen.append(cfg.device)
        raise Captured

    monkeypatch.setattr("hmlib.evaluation.cli.evaluate_setting", capture)
    monkeypatch.setattr("hmlib.evaluation.benchmark.run_benchmark", capture)
    for argv in (["eval", "--checkpoint", checkpoint, "--dataset", "mnist", "--device", "cpu", "--quiet"],
                 ["eval", "--checkpoint", checkpoint, "--dataset", "mnist", "--quiet"],
                 ["benchmark", "--profile", "smoke", "--device", "cpu", "--quiet"]):
        with pytest.raises(Captured):
            cli.main([str(a) for a in argv] + ["--debug"])
    capsys.readouterr()
    # the checkpoint's config says 'cuda:1' (the machine that made it): evaluation runs on this run's device
    assert seen == ["cpu", "auto", "cpu"]


def test_cluster_takes_its_device_from_the_command_line(tmp_path, monkeypatch, capsys):
    path = write_checkpoint(tmp_path / "models" / "zero_shot.pt")
    install_estimator(monkeypatch, path)
    root = tmp_path / "digits"
    write_mixed_folder(root)
    for extra, expected in ((["--device", "cpu"], "cpu"), ([], "auto")):
        code = cli.main(["cluster", str(root), "--k", "2", "--quiet", "--overwrite", "--out", str(tmp_path / "out"),
                         *extra])
        assert code == 0, capsys.readouterr()
        assert BrightnessClusterer.created[-1].device == expected
    no_cuda(monkeypatch)
    assert cli.main(["cluster", str(root), "--k", "2", "--quiet", "--device", "cuda", "--out",
                     str(tmp_path / "out2")]) == 2
    assert "hmlib cluster: error: --device: device = 'cuda' but torch" in capsys.readouterr().err
