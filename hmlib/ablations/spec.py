"""What notebook 04 compares: each ablation is a list of variants scored on identical tasks of the suite.

A :class:`Variant` says which hypernetwork (the protocol's, one re-trained with config overrides, or an
untrained one), which test-time update (steps, inner lr or loss), what it is conditioned on (the task's own
VAE distribution or that of noise images) and how the backbone normalises (stored or per-task statistics).
Re-trained variants are trained for every replicate seed of ``ablation.num_seeds``, like the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from hmlib.config import Config
from hmlib.hyper.losses import INNER_LOSSES

CONTEXTS = ("task", "noise")


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation."""

    label: str
    train_overrides: Mapping[str, Any] | None = None  # None: the protocol's hypernetwork (notebook 03)
    adapt_overrides: Mapping[str, Any] = field(default_factory=dict)  # test-time overrides of cfg.adapt
    num_steps: int | None = None  # inner steps at test time; None = adapt.num_inner_steps
    context: str = "task"  # conditioning rows: the task's own, or the VAE distribution of noise images
    task_batchnorm: bool = False  # backbone normalisation statistics from each task's own images
    untrained: bool = False  # the hypernetwork at its initialisation (no meta-training)

    @property
    def retrained(self) -> bool:
        return self.train_overrides is not None


@dataclass(frozen=True)
class Ablation:
    """A named comparison: variants on identical tasks, paired against a reference variant."""

    key: str  # file stem of the cached JSON
    title: str
    question: str  # what the comparison answers, in one sentence
    variants: tuple[Variant, ...]
    reference: str | None  # label of the reference variant; None: compare with 0 steps only

    def variant(self, label: str) -> Variant:
        """The variant with this label."""
        for variant in self.variants:
            if variant.label == label:
                return variant
        raise KeyError(f"ablation '{self.key}' has no variant '{label}'; it has: "
                       f"{', '.join(v.label for v in self.variants)}")


def define_ablations(cfg: Config) -> list[Ablation]:
    """Every ablation of notebook 04, built from the configuration (order = notebook order)."""
    ab, main = cfg.ablation, Variant("main")
    lr_main = Variant(f"lr={cfg.adapt.inner_lr:g} (main)")
    loss_main = Variant(f"{cfg.adapt.inner_loss} (main)")
    other_losses = [name for name in INNER_LOSSES if name != cfg.adapt.inner_loss]
    ablations = [
        Ablation("steps", "Number of test-time inner steps",
                 "Does accuracy keep rising with more inner steps, plateau, or collapse?",
                 (Variant("main", num_steps=max(ab.step_grid)),), reference=None),
        Ablation("inner_lr", "Inner learning rate at test time",
                 "How sensitive is the test-time update to its step size?",
                 (lr_main, *(Variant(f"lr={lr:g}", adapt_overrides={"inner_lr": float(lr)})
                             for lr in ab.lr_grid if float(lr) != cfg.adapt.inner_lr)), reference=lr_main.label),
        Ablation("meta_learning", "What meta-training buys",
                 "Is the meta-trained hypernetwork better than its initialisation, and does the test-time update "
                 "need to be meta-learned (MT3)?",
                 (main, Variant("not meta-trained (initialisation)", untrained=True),
                  Variant("meta-trained without inner loop", train_overrides={"meta": {"use_inner_loop": False}})),
                 reference=main.label),
        Ablation("conditioning", "What the hypernetwork is conditioned on",
                 "Does the generated classifier depend on the task's own (label-free) VAE distribution?",
                 (main, Variant("pixel-noise context", context="noise"),
                  Variant("conditioned on the backbone embedding",
                          train_overrides={"hyper": {"conditioning_input": "embedding"}})), reference=main.label),
        Ablation("representation", "What the classifier acts on",
                 "How much do the backbone and per-task normalisation matter?",
                 (main, Variant("per-task normalisation statistics", task_batchnorm=True),
                  Variant("VAE latents only (no backbone)", train_overrides={"hyper": {"target_input": "latent"}})),
                 reference=main.label),
        Ablation("inner_loss", "Inner (unsupervised) loss at test time",
                 "Which label-free objective should the test-time update minimise (the hypernetwork as meta-trained)?",
                 (loss_main, *(Variant(loss, adapt_overrides={"inner_loss": loss}) for loss in other_losses)),
                 reference=loss_main.label),
    ]
    return ablations
