"""``HyperClusterer``: a meta-trained checkpoint as a scikit-learn-style clusterer of unlabeled images.

    clusterer = hmlib.HyperClusterer.from_checkpoint(path, n_clusters=5)
    labels = clusterer.fit_predict(images)      # uint8 (N, H, W) arrays or a list of PIL images

The checkpoint's bundled VAE reads the set's VAE distribution (the conditioning); the hypernetwork generates the
set's adaptation of the backbone (and its cluster head) and the inner loop improves it, exactly as on a task.
Sets larger than ``max_fit_images`` are fitted on an evenly spaced sample of that many images (conditioning,
normalisation statistics, prototypes and adaptation), and every image is then assigned in batches by the fitted,
adapted network (:meth:`HyperNet.extend`): memory stays bounded by the sample, not the set. ``device`` ('auto':
a GPU where there is one) is where the checkpoint's models are loaded and every computation runs; results come
back to the CPU as numpy arrays.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import silhouette_score

from hmlib import paths
from hmlib.artifacts import ArtifactError, read_json, state_fingerprint
from hmlib.backbone.embeddings import embed_images
from hmlib.backbone.transductive import (decides_before_adapting, evenly_spaced, gate as gate_decision,
                                         train_transductive)
from hmlib.cluster.images import ClusterInputError
from hmlib.config import IMAGE_SIZE, config_to_dict, with_overrides
from hmlib.data.preprocess import normalise_polarity, preprocess_images
from hmlib.features import normalize_task_np
from hmlib.evaluation.evaluate import default_results_path
from hmlib.hyper.adapt import adapt_candidates
from hmlib.hyper.bundle import Bundle, load_bundle
from hmlib.hyper.generators import TaskInputs
from hmlib.hyper.inputs import reads_images
from hmlib.hyper.metatrain import pipeline_checkpoints
from hmlib.vae.train import encode_images

MAX_FIT_IMAGES = 2048
MIN_ADAPT_IMAGES = 1000  # smallest set worth adapting the backbone to (SCAN-style neighbours need a dense set)
ASSIGN_BATCH = 4096
SILHOUETTE_SAMPLE = 2000  # images the silhouette of a candidate K is computed on (a seeded sample)


def default_checkpoint() -> Path:
    """The pipeline's checkpoint of the first replicate (never one of notebook 04's re-trained variants).

    In order: the checkpoints ``results/eval_zero_shot.json`` evaluated; the manifest meta-training keeps of the
    pipeline's own checkpoints (``models/pipeline.json``: found without ``results/``, e.g. models copied to another
    machine); the newest ``models/hypernet_seed<s>-*.pt``, seed 0 first (variants live in ``models/ablations/``
    under another name, so they are never taken for it).
    """
    record = default_results_path("zero_shot")
    candidates: list[Path] = []
    if record.is_file():
        try:
            candidates += [paths.models_dir() / Path(c["path"]).name for c in read_json(record).get("checkpoints", [])]
        except (ArtifactError, AttributeError, KeyError, TypeError):
            pass
    candidates += pipeline_checkpoints()
    for path in candidates:
        if path.is_file():
            return path
    found = sorted(paths.models_dir().glob("hypernet_seed0-*.pt"), key=lambda p: p.stat().st_mtime) or \
        sorted(paths.models_dir().glob("hypernet_seed*-*.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ArtifactError(f"no hypernetwork checkpoint in {paths.models_dir()}; train one with `make run` "
                            "or pass --checkpoint")
    return found[-1]


def as_images(images: Any) -> np.ndarray:
    """uint8 (N, 28, 28), ink bright on dark, from uint8 arrays of any size (N, H, W) or a list of PIL images (hmlib's
    preprocessing; arrays already 28 x 28 only have their polarity normalised, as every other input has); no images
    at all is a ClusterInputError (a ValueError)."""
    if isinstance(images, np.ndarray):
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W) or a list of PIL images, got {images.dtype} "
                             f"{images.shape}")
        if len(images) and images.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE):
            return normalise_polarity(images)[0]
        images = [Image.fromarray(a, mode="L") for a in images]
    images = list(images)
    if not images:
        raise ClusterInputError("no images to cluster (got an empty set); pass at least n_clusters images")
    return preprocess_images(images, progress=False, num_workers=1)


def whole(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int if it is a whole number >= ``minimum`` (2.0 is 2; 2.5, True or '3' are a ValueError, never
    silently truncated)."""
    number = isinstance(value, (int, np.integer, float, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not (number and float(value).is_integer() and int(value) >= minimum):  # inf and nan are not integers
        raise ValueError(f"{name} must be a whole number, at least {minimum}; got {value!r}")
    return int(value)


class HyperClusterer:
    """Cluster an unlabeled image set with a meta-trained hypernetwork (its zero-shot checkpoint)."""

    def __init__(self, bundle: Bundle, n_clusters: int, *, num_steps: int | None = None,
                 max_fit_images: int = MAX_FIT_IMAGES) -> None:
        if reads_images(bundle.cfg) and bundle.backbone is None:
            raise ValueError(f"{bundle.path.name} carries no backbone; re-run meta-training to rewrite it")
        n_clusters = whole(n_clusters, "n_clusters", 2)
        self.bundle, self.n_clusters = bundle, n_clusters
        self.max_fit_images = whole(max_fit_images, "max_fit_images", n_clusters)
        self.num_steps = bundle.cfg.adapt.steps_at_test if num_steps is None else whole(num_steps, "num_steps", 0)
        self.labels_: np.ndarray | None = None
        self.confidence_: np.ndarray | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, n_clusters: int, *, num_steps: int | None = None,
                        max_fit_images: int = MAX_FIT_IMAGES, device: torch.device | str = "auto"
                        ) -> "HyperClusterer":
        """A clusterer from a hypernetwork checkpoint file (weights_only; nothing is trained), on ``device``."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return cls(load_bundle(path, device), n_clusters, num_steps=num_steps, max_fit_images=max_fit_images)

    @property
    def device(self) -> torch.device:
        """Where the checkpoint's models are and the clustering runs (chosen when it was loaded)."""
        return self.bundle.device

    @property
    def checkpoint_path(self) -> Path:
        return self.bundle.path

    @property
    def checkpoint_sha256(self) -> str:
        return self.bundle.sha256

    def describe(self) -> dict[str, Any]:
        """Settings for a run summary."""
        return {"checkpoint": str(self.bundle.path), "sha256": self.bundle.sha256, "seed": self.bundle.meta["seed"], "trained_num_classes": self.bundle.meta["num_classes"],
                "n_clusters": self.n_clusters, "num_steps": self.num_steps, "max_fit_images": self.max_fit_images,
                "inner_loss": self.bundle.cfg.adapt.inner_loss, "generation": self.bundle.cfg.hyper.generation,
                "device": str(self.device),
                **({"adapted_backbone": self.adapted_} if hasattr(self, "adapted_") else {}),
                **({"candidate": self.candidate_} if hasattr(self, "candidate_") else {}),
                **({"k_selection": {"criterion": "silhouette on the standardised embedding",
                                    "scores": {str(k): v for k, v in self.k_scores_.items()}}}
                   if hasattr(self, "k_scores_") else {})}

    # ----------------------------------------------------------------------------------- internals
    def _rows(self, images: np.ndarray) -> np.ndarray:
        """Conditioning rows (the VAE distribution) of preprocessed images, (N, 2d)."""
        mu, logvar = encode_images(self.bundle.vae, images)
        return np.concatenate([mu, logvar], axis=1)

    def _inputs(self, context: np.ndarray, images: np.ndarray) -> TaskInputs:
        """One task of these rows and images, as the checkpoint's generator reads it."""
        context = torch.as_tensor(context[None])
        if reads_images(self.bundle.cfg):
            return TaskInputs(context, torch.as_tensor(images[None]))
        return TaskInputs(context, features=context)

    def adapt_to(self, images: Any, *, gate: bool = True, progress: bool = False) -> dict[str, Any] | None:
        """Adapt the checkpoint's backbone to this unlabeled set (the transductive stage: SCAN-style neighbour
        agreement, :mod:`hmlib.backbone.transductive`), and use it from now on unless the gate declines it
        (``transductive.gate``; ``adapted_["used"]`` is False and the backbone stays as trained; ``gate=False``:
        used regardless). Returns the adapted backbone's state and a description, or None where the gate declines
        before any training: the default rule (the backbone already recognises these images as its training
        classes) reads only the backbone as trained, so nothing is trained there. Sets smaller than
        ``MIN_ADAPT_IMAGES`` are refused (a ValueError saying why)."""
        images = as_images(images)
        if self.bundle.backbone is None:
            raise ValueError(f"{self.bundle.path.name} reads no backbone: there is nothing to adapt")
        if len(images) < MIN_ADAPT_IMAGES:
            raise ValueError(f"adapting the backbone needs at least {MIN_ADAPT_IMAGES:,} images (nearest neighbours "
                             f"in a sparse set are mostly other classes); this set has {len(images):,}")
        cfg = self.bundle.cfg if gate else with_overrides(self.bundle.cfg, {"transductive": {"gate": "off"}})
        sample = images[evenly_spaced(len(images), cfg.transductive.max_images)]
        decision = gate_decision(cfg, self.bundle.backbone, None, images) if decides_before_adapting(cfg) else None
        if decision is not None and decision["kept"] == "start":  # declined before any training: nothing to save
            self.adapted_ = {"images": 0, "epochs": 0, "seconds": 0.0, "used": False, "gate": decision}
            return None
        model, record = train_transductive(copy.deepcopy(self.bundle.backbone), sample, cfg, seed=self.bundle.seed,
                                           device=self.device, progress=progress, desc="adapt backbone")
        decision = decision or gate_decision(cfg, self.bundle.backbone, model, images)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        meta = {**{k: v for k, v in (self.bundle.backbone_meta or {}).items() if k != "history"},
                "kind": "backbone", "adapted_to": int(len(sample)), "transductive": config_to_dict(cfg.transductive),
                "history": record["history"], "backbone_id": state_fingerprint(state), "gate": decision}
        if decision["kept"] == "adapted":
            hypernet = copy.deepcopy(self.bundle.hypernet)
            hypernet.generator.backbone.load_state_dict(model.state_dict())
            self.bundle = dataclasses.replace(self.bundle, hypernet=hypernet.eval(),
                                              backbone=hypernet.generator.backbone)
        self.adapted_ = {"images": int(len(sample)), "epochs": cfg.transductive.epochs,
                         "seconds": record["seconds"], "used": decision["kept"] == "adapted", "gate": decision}
        return {"state": state, "meta": meta}

    def transform(self, images: Any) -> np.ndarray:
        """The backbone embeddings of the images (as trained), (N, D) float32; the VAE rows without a backbone."""
        images = as_images(images)
        if self.bundle.backbone is None:
            return self._rows(images)
        return embed_images(self.bundle.backbone, images)

    @torch.no_grad()
    def _logits(self, images: np.ndarray, fit: bool, rows: np.ndarray | None = None) -> np.ndarray:
        context = rows if rows is not None else self._rows(images)
        if fit:
            sample = np.linspace(0, len(images) - 1, min(len(images), self.max_fit_images)).astype(np.int64)
            if len(sample) < self.n_clusters:
                raise ValueError(f"{len(images)} images cannot form {self.n_clusters} clusters")
            results, pick = adapt_candidates(self.bundle.hypernet, self._inputs(context[sample], images[sample]),
                                             self.bundle.cfg.adapt, num_steps=self.num_steps,
                                             num_classes=self.n_clusters)
            result = results[int(pick[0])]  # the label-free choice (generated / stored / task statistics)
            supported = [n for n in self.bundle.cfg.adapt.candidates if n in self.bundle.hypernet.generator.candidates]
            self.candidate_ = (supported or ["generated"])[int(pick[0])]  # the name of the candidate kept
            self._params = {k: v.detach() for k, v in result.params.items()}
            self._state = result.state
        if not hasattr(self, "_params"):
            raise ValueError("call fit (or fit_predict) before predict / predict_proba")
        out = [self.bundle.hypernet.extend(self._params, self._state,
                                           self._inputs(context[i:i + ASSIGN_BATCH], images[i:i + ASSIGN_BATCH])
                                           ).cpu().numpy()[0]
               for i in range(0, len(images), ASSIGN_BATCH)]
        return np.concatenate(out)

    # ------------------------------------------------------------------------------------ public API
    def fit(self, images: Any, *, _rows: np.ndarray | None = None) -> "HyperClusterer":
        """Generate and adapt the set's classifier, then assign every image (``labels_``, ``confidence_``)."""
        logits = self._logits(as_images(images), fit=True, rows=_rows)
        probs = _softmax(logits)
        self.labels_ = probs.argmax(1).astype(np.int64)
        self.confidence_ = probs.max(1)
        return self

    def select_n_clusters(self, images: Any, candidates: Sequence[int] = tuple(range(2, 11))) -> int:
        """Choose K without labels, then fit with it: the candidate whose clusters have the highest mean silhouette
        on the set's standardised, L2-normalised embedding (``k_scores_`` keeps every candidate's score).

        A silhouette is defined for 2..N-1 clusters of N images, so larger candidates are dropped."""
        images = as_images(images)
        candidates = sorted({k for k in (whole(k, "a candidate K", 2) for k in candidates) if k < len(images)})
        if not candidates or candidates[0] < 2:
            raise ClusterInputError(f"candidates for K must be at least 2 and below the number of images "
                                    f"({len(images)}): a silhouette needs 2..N-1 clusters")
        rows = self._rows(images)
        z = normalize_task_np(self.transform(images), l2=True)
        scores: dict[int, float] = {}
        best: tuple | None = None  # the fitted state of the best candidate so far (kept, not refitted)
        for k in candidates:
            self.n_clusters = k
            labels = self.fit(images, _rows=rows).labels_
            scores[k] = float(silhouette_score(z, labels, sample_size=min(len(z), SILHOUETTE_SAMPLE), random_state=0)
                              ) if len(np.unique(labels)) > 1 else -1.0
            if best is None or scores[k] > scores[best[0]]:
                best = (k, self.labels_, self.confidence_, self._params, self._state, self.candidate_)
        self.k_scores_ = scores
        self.n_clusters, self.labels_, self.confidence_, self._params, self._state, self.candidate_ = best
        return self.n_clusters

    def fit_predict(self, images: Any) -> np.ndarray:
        """Cluster ids (N,) of the images (fits first)."""
        return self.fit(images).labels_

    def predict_proba(self, images: Any) -> np.ndarray:
        """(N, K) cluster probabilities of images under the fitted classifier (new images are placed, not refitted)."""
        return _softmax(self._logits(as_images(images), fit=False))

    def predict(self, images: Any) -> np.ndarray:
        """Cluster ids (N,) under the fitted classifier."""
        return self.predict_proba(images).argmax(1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


__all__: Sequence[str] = ("HyperClusterer", "as_images", "default_checkpoint")
