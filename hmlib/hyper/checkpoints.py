"""Hypernetwork checkpoints: what identifies one, finding a reusable or resumable one, rebuilding one.

A checkpoint ``models/hypernet_seed<s>-<hash>.pt`` holds the current and best-validation weights, the optimiser
(to resume), the bundle of upstream models it reads through (:mod:`hmlib.hyper.bundle`) and, in its meta, the
full config, the training history and ``complete``. Its identity (``training_settings`` + upstream ids) is
hashed into the name; a file of other settings at that name is set aside, never overwritten.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from hmlib.artifacts import ArtifactError, StaleArtifactError, load_checkpoint, set_aside, settings_diff
from hmlib.backbone.train import backbone_from_state
from hmlib.config import TEST_TIME_ONLY, Config, config_from_dict, config_to_dict, with_profile_test_time
from hmlib.hyper.hypernet import HyperNet
from hmlib.hyper.selector import SELECTION_RULE

CHECKPOINT_KIND = "hypernet"
IDENTITY_KEYS = ("kind", "seed", "training", "upstream", "context_dim", "feature_dim", "num_classes")


def training_settings(cfg: Config) -> dict[str, Any]:
    """Every config value that changes what meta-training produces (part of the checkpoint's identity): the
    shared sections and the section of the configured generator only, and the rule that keeps the selector (not
    ``adapt.test_steps``, a test-time setting)."""
    full = config_to_dict(cfg)
    generator = cfg.hyper.generation
    return {"data": {k: v for k, v in full["data"].items() if k not in ("data_dir", "use_hub")},
            "task": full["task"], "hyper": full["hyper"], generator: full.get(generator, {}),
            "adapt": {k: v for k, v in full["adapt"].items() if k not in TEST_TIME_ONLY},
            "meta": {k: v for k, v in full["meta"].items() if k not in ("retrain", "test_datasets")},
            "selection": SELECTION_RULE}


def load_existing(path: Path, meta: Mapping[str, Any], retrain: str) -> tuple[dict, dict] | None:
    """A matching checkpoint's (state, meta) to reuse or resume; None to train from scratch (nothing is deleted)."""
    if not path.exists():
        return None
    if retrain == "always":
        moved = set_aside(path, "previous")
        print(f"Retraining on request (meta.retrain='always'); the previous checkpoint is kept as {moved.name}.")
        return None
    expected = {k: meta[k] for k in IDENTITY_KEYS}
    try:
        state, recorded = load_checkpoint(path)
        diffs = settings_diff(recorded, expected)
        if diffs:
            raise StaleArtifactError(f"{path} was made with other settings or inputs:\n  " + "\n  ".join(diffs))
        return state, recorded
    except ArtifactError as err:
        if retrain == "never":
            raise
        moved = set_aside(path, "stale" if isinstance(err, StaleArtifactError) else "corrupt")
        print(f"{path.name} cannot be reused ({str(err).splitlines()[0]}); kept it as {moved.name}, training anew.")
    return None


def hypernet_from_checkpoint(state: Mapping[str, Any], meta: Mapping[str, Any], path: str | Path
                             ) -> tuple[HyperNet, Config]:
    """The best-validation hypernetwork of a checkpoint, eval mode (for 'film' with the backbone it modulates, as
    meta-trained: its weights are part of the hypernetwork's state), and its config (test-time-only settings those of
    its profile)."""
    if meta.get("kind") != CHECKPOINT_KIND or "config" not in meta:
        raise ArtifactError(f"{path} is not a hypernetwork checkpoint (kind={meta.get('kind')!r})")
    cfg = with_profile_test_time(config_from_dict(meta["config"]))  # adapt.test_steps: the profile's, not recorded
    backbone = None
    try:
        bundled = state.get("bundle") or {}
        if "backbone" in bundled:
            backbone = backbone_from_state(bundled["backbone"]["state"], bundled["backbone"]["meta"])
        hypernet = HyperNet(cfg, int(meta["context_dim"]), int(meta["num_classes"]), backbone=backbone,
                            feature_dim=meta.get("feature_dim"))
        hypernet.load_state_dict(state["best_model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path} does not fit this hmlib's HyperNet ({type(err).__name__}: "
                            f"{str(err).splitlines()[0]}); retrain it") from err
    return hypernet.eval(), cfg


def load_hypernet(path: str | Path) -> tuple[HyperNet, dict[str, Any]]:
    """Rebuild a meta-trained hypernetwork (its best validation weights) from a checkpoint, in eval mode."""
    state, meta = load_checkpoint(path)
    hypernet, _ = hypernet_from_checkpoint(state, meta, path)
    return hypernet, meta
