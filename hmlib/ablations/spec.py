"""What notebook 04 compares: each ablation is a list of variants scored on identical tasks of the grid.

A :class:`Variant` says which model (the protocol's hypernetwork, one re-trained with config overrides, the same
architecture untrained, or a registered baseline with no hypernetwork at all), how it adapts at test time (steps,
step-size scale, inner loss, which generated parameters the inner loop updates), what it is conditioned on (the
task's own VAE distribution, that of noise images, or a constant code) and whether a generated quantity is
replaced by a constant (e.g. every normalisation blend). Re-trained variants are trained for every replicate seed
of ``ablation.num_seeds``, like the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from hmlib.config import Config
from hmlib.hyper.losses import INNER_LOSSES

CONTEXTS = ("task", "noise", "constant")


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation."""

    label: str
    train_overrides: Mapping[str, Any] | None = None  # None: the protocol's hypernetwork (notebook 03)
    adapt_overrides: Mapping[str, Any] = field(default_factory=dict)  # test-time overrides of cfg.adapt
    film_overrides: Mapping[str, Any] = field(default_factory=dict)  # test-time overrides of the generator's section
    num_steps: int | None = None  # inner steps at test time; None = adapt.test_steps
    context: str = "task"  # conditioning rows: the task's own, those of noise images, or a constant code
    fixed: Mapping[str, float] = field(default_factory=dict)  # generated tensors replaced by constants
    untrained: bool = False  # the hypernetwork at its initialisation (no meta-training)
    baseline: str | None = None  # a registered baseline scored instead of a hypernetwork (no meta-learning)
    backbone: str = "setting"  # "setting" (ablation.setting's), "zero_shot", "statistics" (the held-out dataset's
    # normalisation statistics only), "transductive" (adapted to its unlabeled train split where the gate keeps the
    # adaptation) or "ungated" (the adaptation always used)

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
    transductive_only: bool = False  # scored on the conditions of transductive.datasets only

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
    steps = cfg.adapt.steps_at_test
    lr_main = Variant("step sizes x 1 (main)")
    loss_main = Variant(f"{cfg.adapt.inner_loss} (main)")
    other_losses = [name for name in INNER_LOSSES if name != cfg.adapt.inner_loss]
    film = cfg.hyper.generation == "film"
    ablations = [
        # one run to the largest step count, each task on the candidate a test-time run keeps (run.variant_curves)
        Ablation("steps", "Number of test-time inner steps",
                 "Does accuracy keep rising with more inner steps, plateau, or collapse?",
                 (Variant("main", num_steps=max(ab.step_grid)),), reference=None),
        Ablation("step_size", "Step sizes at test time",
                 "How sensitive is the test-time update to its (meta-learned) step sizes?",
                 (lr_main, *(Variant(f"step sizes x {s:g}", adapt_overrides={"lr_scale": float(s)})
                             for s in ab.lr_grid if float(s) != 1.0)), reference=lr_main.label),
        Ablation("meta_learning", "What meta-learning buys",
                 "Is the meta-trained hypernetwork better than its initialisation, than meta-training without the "
                 "inner loop (MT3's question), and than the same kind of update with no hypernetwork at all?",
                 (main, Variant("not meta-trained (initialisation)", untrained=True),
                  Variant("meta-trained without inner loop", train_overrides={"meta": {"use_inner_loop": False}}),
                  *((Variant("no hypernetwork: plain adaptation (15 Adam steps, label-free choice)",
                             baseline="plain_choice"),) if film else ())),
                 reference=main.label),
        Ablation("conditioning", "What the hypernetwork is conditioned on",
                 "Does the generated adaptation depend on the task's own (label-free) VAE distribution?",
                 (main, Variant("pixel-noise context", context="noise"), Variant("constant code", context="constant")),
                 reference=main.label),
    ]
    if film:
        ablations += [
            Ablation("statistics", "Which normalisation statistics",
                     "Is the generated blend of stored and task statistics better than always using either?",
                     (main, Variant("stored statistics everywhere (blend 0)", fixed={"blend": 0.0}),
                      Variant("task statistics everywhere (blend 1)", fixed={"blend": 1.0})), reference=main.label),
            Ablation("choice", "When not to adapt: choosing among the test-time candidates",
                     "Does choosing per task between the generated adaptation and the stored or the task's own "
                     "statistics help, and is the meta-learned choice better than the silhouette rule?",
                     (main, Variant("silhouette rule", adapt_overrides={"choice": "silhouette"}),
                      Variant("always the generated adaptation", adapt_overrides={"candidates": ["generated"]})),
                     reference=main.label),
            Ablation("adapted", "What the inner loop updates",
                     f"Which generated parameters should the {steps} inner steps change?",
                     (Variant("head and FiLM (main)") if cfg.film.adapt == "both" else main,
                      *(Variant(f"{which} only", film_overrides={"adapt": which}) for which in ("head", "film")
                        if which != cfg.film.adapt)),
                     reference="head and FiLM (main)" if cfg.film.adapt == "both" else main.label),
        ]
        ablations.append(
            Ablation("transductive", "Adapting the backbone to the held-out dataset (transductive)",
                     "What do the held-out dataset's unlabeled train images buy: their normalisation statistics, "
                     "or the full self-supervised adaptation (with and without the gate that may decline it)?",
                     (Variant("zero-shot backbone", backbone="zero_shot"),
                      Variant("normalisation statistics only", backbone="statistics"),
                      Variant(f"full adaptation ({cfg.transductive.epochs} epochs)", backbone="transductive"),
                      Variant("full adaptation, always used (no gate)", backbone="ungated")),
                     reference="zero-shot backbone", transductive_only=True))
    ablations.append(
        Ablation("inner_loss", "Inner (unsupervised) loss at test time",
                 "Which label-free objective should the test-time update minimise (the hypernetwork as meta-trained)?",
                 (loss_main, *(Variant(loss, adapt_overrides={"inner_loss": loss}) for loss in other_losses
                               if not (loss == "augmentation" and not film))),
                 reference=loss_main.label))
    return ablations
