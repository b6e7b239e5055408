"""Test-time adaptation ablations on the evaluation suite (notebook 04).

An :class:`Ablation` is a list of :class:`Variant` s (which hypernetwork, which test-time update,
which conditioning context, which dataset and setting) scored on the evaluation protocol's fixed
suite, so every variant sees identical tasks. For each variant and task we keep the clustering
accuracy after 0..S inner steps; summaries report mean accuracy with a 95% interval and the
*paired* per-task difference against the ablation's reference (``hmlib.metrics.mean_ci`` on
differences). Results are cached as JSON in ``results/ablations/<key>.json`` together with every
setting and upstream fingerprint that made them; a cache made by other checkpoints, latents,
tasks or settings is recomputed, never silently reused.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from hmlib.artifacts import ArtifactError, fingerprint, read_json, write_json
from hmlib.config import AdaptConfig, Config, ConfigError, config_from_dict, config_to_dict
from hmlib.metrics import batched_clustering_accuracy, mean_ci
from hmlib.paths import results_dir

RESULT_VERSION = 1
SETTINGS = ("zero_shot", "transductive")
CONTEXTS = ("task", "noise", "other")
INNER_LOSSES = ("geometry", "entropy", "infomax")


# ---------------------------------------------------------------------------------------------
# Specification


@dataclass(frozen=True)
class Variant:
    """One arm of an ablation: a hypernetwork, a test-time update, a conditioning context, a dataset."""

    label: str
    train_tag: str | None = None  # None: the protocol's hypernet (notebook 03); else an extra meta-training
    train_overrides: Mapping[str, Any] = field(default_factory=dict)  # nested config overrides for it
    adapt_overrides: Mapping[str, Any] = field(default_factory=dict)  # test-time overrides of cfg.adapt
    num_steps: int | None = None  # inner steps at test time; None = adapt.num_inner_steps
    context: str = "task"  # conditioning: "task" (its own VAE distribution), "noise", "other" dataset
    setting: str | None = None  # "zero_shot" / "transductive"; None = cfg.ablation.setting
    dataset: str | None = None  # held-out dataset scored; None = cfg.meta.test_datasets[0]


@dataclass(frozen=True)
class Ablation:
    """A named comparison: variants on identical tasks, paired against a reference variant."""

    key: str  # file stem of the cached JSON
    title: str
    question: str  # what the comparison answers, in one sentence
    variants: tuple[Variant, ...]
    reference: str | None  # label of the reference variant; None: compare with k-means only

    def variant(self, label: str) -> Variant:
        """The variant with this label."""
        for variant in self.variants:
            if variant.label == label:
                return variant
        raise KeyError(f"ablation '{self.key}' has no variant '{label}'; it has: "
                       f"{', '.join(v.label for v in self.variants)}")


def _deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, Mapping) and isinstance(
            merged.get(key), Mapping) else value
    return merged


def apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    """``cfg`` with nested overrides applied and validated (unknown keys raise ConfigError)."""
    return config_from_dict(_deep_merge(config_to_dict(cfg), overrides)) if overrides else cfg


def adapt_config(cfg: Config, variant: Variant) -> AdaptConfig:
    """The test-time AdaptConfig of a variant (cfg.adapt plus its overrides, its number of steps)."""
    changes = dict(variant.adapt_overrides)
    if variant.num_steps is not None:
        changes["num_inner_steps"] = int(variant.num_steps)
    return apply_overrides(cfg, {"adapt": changes}).adapt


def main_dataset(cfg: Config) -> str:
    """The held-out dataset the ablations are scored on (the protocol's first test dataset)."""
    return cfg.meta.test_datasets[0]


def _resolved(cfg: Config, variant: Variant) -> tuple[str, str]:
    """(dataset, setting) a variant is scored on."""
    setting = variant.setting or cfg.ablation.setting
    if setting not in SETTINGS:
        raise ConfigError(f"setting {setting!r} is not one of {SETTINGS}")
    if variant.context not in CONTEXTS:
        raise ConfigError(f"context {variant.context!r} is not one of {CONTEXTS}")
    return variant.dataset or main_dataset(cfg), setting


def _retrains(cfg: Config) -> bool:
    """Whether extra meta-trainings use fewer (or more) iterations than the protocol's hypernetwork."""
    return cfg.ablation.meta_iterations is not None and cfg.ablation.meta_iterations != cfg.meta.iterations


def _reference(cfg: Config, detail: str = "") -> Variant:
    """The main configuration; re-trained like the trained variants when their iteration count differs."""
    retrain = _retrains(cfg)
    note = "main, re-trained" if retrain else "main"
    label = f"{detail} ({note})" if detail else f"main{' (re-trained)' if retrain else ''}"
    return Variant(label, train_tag="reference" if retrain else None)


def _trained(tag: str, label: str, overrides: Mapping[str, Any], **kw: Any) -> Variant:
    """A variant with its own meta-training (config ``overrides``), saved under a distinct checkpoint name."""
    return Variant(label=label, train_tag=tag, train_overrides=dict(overrides), **kw)


def define_ablations(cfg: Config) -> list[Ablation]:
    """Every ablation of notebook 04, built from ``cfg.ablation`` (order = notebook order)."""
    ab = cfg.ablation
    main = _reference(cfg)
    lr_main = Variant(f"lr={cfg.adapt.inner_lr:g} (main)")
    loss_main = _reference(cfg, cfg.adapt.inner_loss)
    mixing_main = _reference(cfg, cfg.meta.task_mixing)
    other_mixing = "single" if cfg.meta.task_mixing == "mixed" else "mixed"
    other = next((d for d in cfg.meta.train_datasets if d != main_dataset(cfg)), None)
    conditioning = [main, dataclasses.replace(main, label="pixel-noise context", context="noise")]
    if other is not None:
        conditioning.append(dataclasses.replace(main, label=f"context from {other}", context="other"))
    if cfg.hyper.conditioning != "hyperfast":
        conditioning.append(_trained("hyperfast", "HyperFast-style conditioning",
                                     {"hyper": {"conditioning": "hyperfast"}}))
    ablations = [
        Ablation("steps", "Number of test-time inner steps",
                 "Does accuracy keep rising with more inner steps, plateau, or collapse?",
                 (Variant("main", num_steps=max(ab.step_grid)),), reference=None),
        Ablation("inner_lr", "Inner learning rate at test time",
                 "How sensitive is the test-time update to its step size?",
                 (lr_main, *(Variant(f"lr={lr:g}", adapt_overrides={"inner_lr": float(lr)})
                             for lr in ab.lr_grid if float(lr) != cfg.adapt.inner_lr)),
                 reference=lr_main.label),
        Ablation("inner_loss", "Inner (unsupervised) loss",
                 "Which label-free objective should the inner loop minimise?",
                 (loss_main, *(_trained(f"loss_{loss}", loss, {"adapt": {"inner_loss": loss}},
                                        adapt_overrides={"inner_loss": loss})
                               for loss in INNER_LOSSES if loss != cfg.adapt.inner_loss)),
                 reference=loss_main.label),
        Ablation("meta_learning", "Meta-learned adaptation vs adaptation bolted on",
                 "Does the test-time update need to be meta-learned (MT3), or can it be applied to any hypernet?",
                 (main, _trained("no_inner_loop", "meta-trained without inner loop",
                                 {"meta": {"use_inner_loop": False}})),
                 reference=main.label),
        Ablation("conditioning", "What the hypernetwork is conditioned on",
                 "Does the generated classifier depend on the task's own (label-free) VAE distribution?",
                 tuple(conditioning), reference=main.label),
        Ablation("vae_setting", "Shared VAE (zero-shot) vs per-dataset VAE (transductive)",
                 "How much does a VAE that has seen the held-out dataset (without labels) help?",
                 (Variant("zero-shot (shared VAE)", setting="zero_shot"),
                  Variant("transductive (per-dataset VAE)", setting="transductive")),
                 reference="zero-shot (shared VAE)"),
        Ablation("task_mixing", "Tasks per meta-training iteration",
                 "Should a meta-batch mix tasks from all meta-training datasets or draw from one?",
                 (mixing_main, _trained(f"mixing_{other_mixing}", f"{other_mixing} (one dataset per meta-batch)"
                                        if other_mixing == "single" else "mixed (all datasets in a meta-batch)",
                                        {"meta": {"task_mixing": other_mixing}})),
                 reference=mixing_main.label),
    ]
    lodo = lodo_datasets(cfg)
    if lodo:
        ablations.append(Ablation(
            "lodo", f"Leave one dataset out ({ab.lodo_setting.replace('_', '-')})",
            "Does the method transfer to every held-out dataset, not only to the protocol's?",
            tuple(_lodo_variant(cfg, held_out, lodo) for held_out in lodo), reference=None))
    return ablations


def lodo_datasets(cfg: Config) -> tuple[str, ...]:
    """Datasets held out in turn by the leave-one-dataset-out ablation."""
    return tuple(cfg.ablation.lodo_datasets) if cfg.ablation.lodo_datasets is not None else cfg.datasets


def _lodo_variant(cfg: Config, held_out: str, pool: Sequence[str]) -> Variant:
    train = tuple(d for d in pool if d != held_out)
    same_as_protocol = (set(train) == set(cfg.meta.train_datasets) and (held_out,) == tuple(cfg.meta.test_datasets))
    tag = None if (same_as_protocol and not _retrains(cfg)) else f"lodo_{held_out}"
    overrides = {} if tag is None else {"meta": {"train_datasets": list(train), "test_datasets": [held_out]}}
    return Variant(held_out, train_tag=tag, train_overrides=overrides, setting=cfg.ablation.lodo_setting,
                   dataset=held_out)


# ---------------------------------------------------------------------------------------------
# Scoring


def step_accuracies(logits: torch.Tensor | np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Clustering accuracy after each inner step.

    logits (S+1, N, K) with labels (N,) -> (S+1,); or a batch of tasks, logits (S+1, T, N, K) with
    labels (T, N) -> (T, S+1).
    """
    logits = torch.as_tensor(logits)
    labels = np.asarray(labels, dtype=np.int64)
    single = logits.ndim == 3
    if single:
        logits, labels = logits.unsqueeze(1), labels[None]
    if logits.ndim != 4 or logits.shape[1:3] != labels.shape:
        raise ValueError(f"expected logits (steps+1, [T,] N, K) matching labels ([T,] N); got "
                         f"{tuple(logits.shape)} and {labels.shape}")
    num_classes = logits.shape[-1]
    pred = logits.argmax(-1).cpu().numpy().astype(np.int64)  # (S+1, T, N)
    matched = batched_clustering_accuracy(pred.reshape(-1, pred.shape[-1]),
                                          np.broadcast_to(labels[None], pred.shape).reshape(-1, pred.shape[-1]),
                                          num_classes)
    acc = matched.reshape(pred.shape[:2]).T  # (T, S+1)
    return acc[0] if single else acc


def paired(values: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean and 95% half-width of per-task differences ``values - reference``, plus its interval."""
    values, reference = np.asarray(values, float), np.asarray(reference, float)
    if values.shape != reference.shape:
        raise ValueError(f"paired comparison needs identical tasks: shapes {values.shape} vs {reference.shape}")
    mean, half = mean_ci(values - reference)
    return {"mean": mean, "half": half, "low": mean - half, "high": mean + half,
            "excludes_zero": bool(half < abs(mean))}


def _ci(values: np.ndarray) -> dict[str, float]:
    mean, half = mean_ci(values)
    return {"mean": mean, "half": half}


@dataclass
class AblationResult:
    """Per-task accuracies of every variant of one ablation (loaded from or written to JSON)."""

    key: str
    title: str
    question: str
    reference: str | None
    variants: list[dict[str, Any]]  # label, dataset, setting, num_steps, context, checkpoint, ...
    acc: dict[str, np.ndarray]  # label -> (T, S+1) accuracy after 0..S inner steps
    baselines: dict[str, dict[str, np.ndarray]]  # "dataset/setting" -> baseline name -> (T,)
    meta: dict[str, Any]
    seconds: float = 0.0

    def variant_info(self, label: str) -> dict[str, Any]:
        """Recorded description of one variant."""
        for info in self.variants:
            if info["label"] == label:
                return info
        raise KeyError(f"ablation '{self.key}' has no variant '{label}'")

    def before(self, label: str) -> np.ndarray:
        """(T,) accuracy before adaptation (0 inner steps)."""
        return self.acc[label][:, 0]

    def after(self, label: str) -> np.ndarray:
        """(T,) accuracy after the variant's inner steps."""
        return self.acc[label][:, -1]

    def kmeans(self, label: str) -> np.ndarray | None:
        """(T,) k-means-on-VAE-means accuracy on the variant's tasks, if recorded."""
        info = self.variant_info(label)
        return self.baselines.get(f"{info['dataset']}/{info['setting']}", {}).get("kmeans_latent")

    def summary(self) -> list[dict[str, Any]]:
        """One row per variant: accuracy before/after (mean, 95% half-width), paired gain and differences."""
        rows = []
        for info in self.variants:
            label = info["label"]
            after = self.after(label)
            row = {"variant": label, "dataset": info["dataset"], "setting": info["setting"],
                   "steps": info["num_steps"], "tasks": int(after.shape[0]), "task_size": info.get("task_size"),
                   "before": _ci(self.before(label)), "after": _ci(after),
                   "gain": paired(after, self.before(label))}
            if self.reference is not None and label != self.reference:
                row["vs_reference"] = paired(after, self.after(self.reference))
            kmeans = self.kmeans(label)
            if kmeans is not None:
                row["kmeans"] = _ci(kmeans)
                row["vs_kmeans"] = paired(after, kmeans)
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"version": RESULT_VERSION, "key": self.key, "title": self.title, "question": self.question,
                "reference": self.reference, "variants": self.variants, "meta": self.meta,
                "seconds": self.seconds, "acc": {k: v.tolist() for k, v in self.acc.items()},
                "baselines": {k: {n: v.tolist() for n, v in b.items()} for k, b in self.baselines.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "AblationResult":
        return cls(key=data["key"], title=data["title"], question=data["question"], reference=data["reference"],
                   variants=list(data["variants"]), meta=dict(data["meta"]), seconds=float(data.get("seconds", 0.0)),
                   acc={k: np.asarray(v, dtype=np.float64) for k, v in data["acc"].items()},
                   baselines={k: {n: np.asarray(v, dtype=np.float64) for n, v in b.items()}
                              for k, b in data["baselines"].items()})


def step_table(result: AblationResult, label: str, steps: Iterable[int]) -> list[dict[str, Any]]:
    """Rows per step count: accuracy (mean, 95% half-width) and paired gain over 0 steps."""
    acc = result.acc[label]
    rows = []
    for s in steps:
        if s >= acc.shape[1]:
            raise ValueError(f"step {s} was not computed (the curve stops at {acc.shape[1] - 1})")
        rows.append({"steps": int(s), "acc": _ci(acc[:, s]), "gain": paired(acc[:, s], acc[:, 0])})
    return rows


def step_table_rows(result: AblationResult, label: str, steps: Iterable[int]) -> list[dict[str, str]]:
    """Display rows of :func:`step_table` (accuracy in %, '*': the gain's 95% interval excludes 0)."""
    return [{"inner steps": str(r["steps"]), "accuracy %": _pct(r["acc"]), "gain vs 0 steps (pts)": _signed(r["gain"])}
            for r in step_table(result, label, steps)]


def describe(cfg: Config) -> str:
    """Markdown paragraph stating what the ablations are scored on and how variants were trained."""
    ab = cfg.ablation
    retrain = (f"Variants that need their own meta-training run {ab.meta_iterations} iterations and are compared "
               f"with the main configuration re-trained for the same {ab.meta_iterations} iterations (the protocol's "
               f"hypernetwork had {cfg.meta.iterations})."
               if ab.meta_iterations is not None and ab.meta_iterations != cfg.meta.iterations else
               f"Variants that need their own meta-training run the protocol's {cfg.meta.iterations} iterations.")
    return (f"Every comparison uses the first {ab.num_tasks} tasks of the evaluation suite of **{main_dataset(cfg)}** "
            f"(test split, K = {cfg.task.num_classes}, N = {ab.task_size} images per task, suite seed "
            f"{cfg.eval.seed}), in the **{ab.setting.replace('_', '-')}** setting unless a table says otherwise, "
            f"with meta-training seed {cfg.meta.seed}. The main configuration adapts with "
            f"{cfg.adapt.num_inner_steps} steps of `{cfg.adapt.inner_loss}` at inner lr {cfg.adapt.inner_lr:g} "
            f"(`adapt_params = {cfg.adapt.adapt_params}`). {retrain} Accuracies are means over tasks with 95% "
            "confidence intervals; differences are paired per task, and `*` marks a difference whose interval "
            "excludes zero.")


def lodo_matrix(result: AblationResult) -> list[dict[str, Any]]:
    """Leave-one-dataset-out rows: held-out dataset, accuracy before/after adaptation, k-means, paired gains."""
    rows = []
    for row in result.summary():
        rows.append({"held_out": row["dataset"], "before": row["before"], "after": row["after"],
                     "kmeans": row.get("kmeans"), "gain": row["gain"], "vs_kmeans": row.get("vs_kmeans")})
    return rows


# ---------------------------------------------------------------------------------------------
# Tables and conclusions (text generated from the numbers)


def _pct(stat: Mapping[str, float] | None) -> str:
    return "–" if stat is None else f"{100 * stat['mean']:.1f} ± {100 * stat['half']:.1f}"


def _signed(stat: Mapping[str, float] | None) -> str:
    if stat is None:
        return "–"
    star = " *" if stat["excludes_zero"] else ""
    return f"{100 * stat['mean']:+.1f} ± {100 * stat['half']:.1f}{star}"


def table_rows(result: AblationResult) -> list[dict[str, str]]:
    """Display rows (strings, accuracy in %): '*' marks paired differences whose 95% interval excludes 0."""
    rows = []
    for row in result.summary():
        display = {"variant": row["variant"], "dataset": row["dataset"], "setting": row["setting"],
                   "steps": str(row["steps"]), "N": str(row["task_size"]), "before %": _pct(row["before"]),
                   "after %": _pct(row["after"]), "gain (pts)": _signed(row["gain"])}
        if result.reference is not None:
            display[f"vs {result.reference} (pts)"] = _signed(row.get("vs_reference"))
        if "kmeans" in row:
            display["k-means %"] = _pct(row["kmeans"])
            display["vs k-means (pts)"] = _signed(row["vs_kmeans"])
        rows.append(display)
    return rows


def _interval(stat: Mapping[str, float]) -> str:
    return f"{100 * stat['mean']:+.1f} points, 95% CI [{100 * stat['low']:+.1f}, {100 * stat['high']:+.1f}]"


def _verdict(stat: Mapping[str, float], better: str = "better", worse: str = "worse",
             same: str = "no clear difference") -> str:
    """'better (+3.1 points, 95% CI [...])', or `same` when the paired interval includes zero."""
    if not stat["excludes_zero"]:
        return f"{same} ({_interval(stat)})"
    return f"{better if stat['mean'] > 0 else worse} ({_interval(stat)})"


def _steps_sentence(result: AblationResult, step_grid: Sequence[int] | None) -> str:
    label = result.variants[0]["label"]
    acc = result.acc[label]
    grid = [s for s in (step_grid or range(acc.shape[1])) if s < acc.shape[1]]
    means = acc[:, grid].mean(0)
    best = grid[int(np.argmax(means))]
    gain = paired(acc[:, best], acc[:, 0])
    effect = _verdict(gain, "adaptation helps", "adaptation hurts", "no clear effect")
    if best == 0:
        return (f"**{result.title}**: accuracy is highest with no inner step ({100 * means[0]:.1f}%); "
                f"at {_steps(grid[-1])} it is {100 * means[-1]:.1f}% "
                f"({_verdict(paired(acc[:, grid[-1]], acc[:, 0]), 'higher', 'lower', 'no clear difference')}).")
    text = (f"**{result.title}**: accuracy goes from {100 * means[0]:.1f}% with no inner step to "
            f"{100 * means.max():.1f}% at {_steps(best)} (vs none: {effect})")
    if best == grid[-1]:
        return text + "; it is still highest at the largest step count."
    drop = paired(acc[:, grid[-1]], acc[:, best])
    tail = (f"is significantly lower at {_steps(grid[-1])} ({_interval(drop)})" if drop["excludes_zero"]
            and drop["mean"] < 0 else f"stays on a plateau up to {_steps(grid[-1])} ({_interval(drop)})")
    return text + f"; after its peak it {tail}."


def _steps(num: int) -> str:
    return f"{num} step" + ("" if num == 1 else "s")


def conclusions(results: Mapping[str, AblationResult], step_grid: Sequence[int] | None = None) -> list[str]:
    """One markdown sentence per ablation stating what it shows, derived only from its numbers.

    Differences are paired per task; a difference counts only when its 95% interval excludes zero.
    """
    lines = []
    for key, result in results.items():
        if key == "steps":
            lines.append(_steps_sentence(result, step_grid))
        elif result.reference is None:  # leave-one-dataset-out: gain and k-means per held-out dataset
            parts = []
            for row in result.summary():
                part = (f"{row['dataset']} {_pct(row['after'])}% after adaptation, gain "
                        + _verdict(row["gain"], "positive", "negative", "not significant"))
                if "vs_kmeans" in row:
                    part += ", vs k-means " + _verdict(row["vs_kmeans"])
                parts.append(part)
            lines.append(f"**{result.title}**: " + "; ".join(parts) + ".")
        else:
            parts = [f"{row['variant']}: {_verdict(row['vs_reference'])}" for row in result.summary()
                     if "vs_reference" in row]
            if parts:
                lines.append(f"**{result.title}** (after adaptation, vs {result.reference}): " + "; ".join(parts) + ".")
    return lines


def headline_rows(results: Mapping[str, AblationResult]) -> list[dict[str, Any]]:
    """Flat rows for the report index: every variant's accuracy and its paired difference (points)."""
    rows = []
    for key, result in results.items():
        for row in result.summary():
            diff = row.get("vs_reference") or (row["gain"] if result.reference is None else None)
            rows.append({
                "ablation": key, "variant": row["variant"], "dataset": row["dataset"], "setting": row["setting"],
                "accuracy %": round(100 * row["after"]["mean"], 1), "± %": round(100 * row["after"]["half"], 1),
                "difference (pts)": None if diff is None else round(100 * diff["mean"], 1),
                "difference ±": None if diff is None else round(100 * diff["half"], 1),
                "vs": result.reference or "0 steps",
                "CI excludes 0": None if diff is None else bool(diff["excludes_zero"])})
    return rows


# ---------------------------------------------------------------------------------------------
# JSON cache


def result_path(key: str) -> Path:
    """Where an ablation's cached JSON lives."""
    return results_dir() / "ablations" / f"{key}.json"


def load_cached(key: str, meta: Mapping[str, Any]) -> AblationResult | None:
    """The cached result if it exists and was made with exactly ``meta``; None if absent or stale."""
    path = result_path(key)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except ArtifactError:
        return None  # corrupt: recompute (atomic writes make this rare)
    if not isinstance(data, dict) or data.get("version") != RESULT_VERSION:
        return None
    if fingerprint(data.get("meta")) != fingerprint(dict(meta)):
        return None
    return AblationResult.from_json(data)


def save_result(result: AblationResult) -> Path:
    """Write an ablation result atomically to ``results/ablations/<key>.json``."""
    return write_json(result_path(result.key), result.to_json())


# ---------------------------------------------------------------------------------------------
# Running an ablation


@dataclass
class ResolvedVariant:
    """Everything one variant needs, loaded: its hypernetwork, latents, test-time update."""

    variant: Variant
    dataset: str
    setting: str
    train_cfg: Config  # the config its hypernetwork was (or is) meta-trained with
    adapt: AdaptConfig
    hypernet: Any  # hmlib.hypernet.HyperNet
    checkpoint: Path
    latents: Any  # hmlib.latents.LatentSet of the dataset's test split


def training_config(cfg: Config, variant: Variant) -> Config:
    """Config of a variant's meta-training: its overrides, and ablation.meta_iterations for extra trainings."""
    if variant.train_tag is None:
        return cfg
    train_cfg = apply_overrides(cfg, variant.train_overrides)
    if cfg.ablation.meta_iterations is not None:
        train_cfg = dataclasses.replace(
            train_cfg, meta=dataclasses.replace(train_cfg.meta, iterations=int(cfg.ablation.meta_iterations)))
    return train_cfg


def checkpoint_name(cfg: Config, variant: Variant, setting: str) -> str | None:
    """Checkpoint stem of a variant's hypernetwork (None: the protocol's default name)."""
    if variant.train_tag is None:
        return None
    iterations = training_config(cfg, variant).meta.iterations
    return f"hypernet_{setting}_seed{cfg.meta.seed}_ablation_{variant.train_tag}_it{iterations}"


def resolve_variant(cfg: Config, variant: Variant, *, progress: bool = True,
                    memo: dict | None = None) -> ResolvedVariant:
    """Load (or meta-train, if missing or stale) a variant's hypernetwork and its dataset's latents.

    ``memo`` (a dict shared across calls) keeps loaded hypernetworks and latents, so variants
    sharing a checkpoint load it once.
    """
    from hmlib.latents import get_latents
    from hmlib.metatrain import meta_train

    memo = {} if memo is None else memo
    dataset, setting = _resolved(cfg, variant)
    train_cfg = training_config(cfg, variant)
    name = checkpoint_name(cfg, variant, setting)
    model_key = ("hypernet", name, setting, fingerprint(config_to_dict(train_cfg)))
    if model_key not in memo:
        result = meta_train(train_cfg, setting, cfg.meta.seed, name=name, progress=progress)
        memo[model_key] = (result.hypernet.eval(), Path(result.checkpoint_path))
    latents_key = ("latents", dataset, setting, fingerprint(config_to_dict(train_cfg)))
    if latents_key not in memo:
        memo[latents_key] = get_latents(train_cfg, dataset, "test", setting, progress=progress)
    hypernet, checkpoint = memo[model_key]
    return ResolvedVariant(variant, dataset, setting, train_cfg, adapt_config(cfg, variant), hypernet,
                           checkpoint, memo[latents_key])


def task_size(cfg: Config, dataset: str) -> int:
    """Images per ablation task: ``ablation.task_size``, lowered to what the smallest test class allows."""
    from hmlib.data import fit_task_size, load_split

    labels = load_split(dataset, "test", cfg.data, progress=False).labels
    return fit_task_size(labels, cfg.task.num_classes, int(cfg.ablation.task_size))


def ablation_suite(cfg: Config, dataset: str) -> Any:
    """The first ``ablation.num_tasks`` tasks of the evaluation protocol's suite of ``dataset``.

    Tasks hold ``ablation.task_size`` images, fewer for a dataset whose test classes are too small
    (e.g. hebrew_chars: about 30-46 images per class); :func:`task_size` says how many.
    """
    from hmlib.evaluate import build_suite

    suite = build_suite(cfg, dataset, task_size(cfg, dataset))
    num_tasks = cfg.ablation.num_tasks
    if len(suite) < num_tasks:
        raise ConfigError(f"ablation.num_tasks = {num_tasks} but the evaluation suite of {dataset} has only "
                          f"{len(suite)} tasks; lower ablation.num_tasks or raise eval.num_tasks")
    return suite[:num_tasks]


def _context_images(cfg: Config, resolved: ResolvedVariant, suite: Any) -> np.ndarray | None:
    """uint8 images (T, M, 28, 28) whose VAE distribution replaces the task's own, or None for "task".

    "noise": M = N uniform-noise images per task (seeded); "other": the other dataset's suite tasks
    (M = its task size), so the context is a real task, just not this one.
    """
    from hmlib.data import load_split

    context = resolved.variant.context
    if context == "task":
        return None
    shape = np.asarray(suite.indices).shape
    if context == "noise":  # the prototype's ablation: uniform pixel noise, seeded per suite
        rng = np.random.default_rng(cfg.eval.seed)
        return rng.integers(0, 256, size=(*shape, 28, 28), dtype=np.uint8)
    other = other_dataset(cfg, resolved.dataset)
    other_suite = ablation_suite(cfg, other)
    images = load_split(other, "test", cfg.data, progress=False).images
    return images[np.asarray(other_suite.indices)]


def other_dataset(cfg: Config, dataset: str) -> str:
    """The dataset whose tasks supply the 'context from another dataset' conditioning."""
    for name in cfg.meta.train_datasets:
        if name != dataset:
            return name
    raise ConfigError("the 'other dataset' conditioning needs a meta-training dataset besides the scored one")


def variant_curves(cfg: Config, resolved: ResolvedVariant, suite: Any, *, batch_size: int = 50,
                   progress: bool = True) -> np.ndarray:
    """(T, S+1) accuracy of every suite task after 0..S inner steps of the variant's test-time update."""
    from hmlib.adapt import predict_task
    from hmlib.data import load_split
    from hmlib.hypernet import TaskInputs
    from hmlib.vae import encode_images, vae_for_setting

    hypernet, latents = resolved.hypernet, resolved.latents
    indices, labels = np.asarray(suite.indices), np.asarray(suite.labels)
    images = load_split(resolved.dataset, "test", cfg.data, progress=False).images if hypernet.use_pixels else None
    context_images = _context_images(cfg, resolved, suite)
    if context_images is not None:  # encode them with the VAE that made the task's own latents
        vae, _ = vae_for_setting(resolved.train_cfg, resolved.setting, resolved.dataset, progress=False,
                                 verbose=False)
        ctx_mu, ctx_logvar = encode_images(vae, context_images.reshape(-1, 28, 28))
        shape = context_images.shape[:2]  # (T, M): M may differ from N (another dataset's task size)
        ctx_mu, ctx_logvar = ctx_mu.reshape(*shape, -1), ctx_logvar.reshape(*shape, -1)
    curves = []
    for start in tqdm(range(0, len(indices), batch_size), desc=f"{resolved.variant.label}", disable=not progress,
                      leave=False):
        idx = indices[start:start + batch_size]  # (B, N)
        inputs = TaskInputs.from_arrays(latents.mu[idx], latents.logvar[idx],
                                        None if images is None else images[idx])
        context = None
        if context_images is not None:
            context = hypernet.context(TaskInputs.from_arrays(ctx_mu[start:start + batch_size],
                                                              ctx_logvar[start:start + batch_size]))
        with torch.no_grad():
            logits = predict_task(hypernet, inputs, resolved.adapt, context=context)  # (S+1, B, N, K)
        curves.append(step_accuracies(logits, labels[start:start + batch_size]))
    return np.concatenate(curves)


def _cache_meta(cfg: Config, ablation: Ablation, resolved: Sequence[ResolvedVariant],
                suites: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the cached numbers depend on: spec, settings, checkpoints, latents, tasks."""
    from hmlib.artifacts import file_sha256

    settings = config_to_dict(cfg)
    for volatile in ("profile", "device", "num_threads"):
        settings.pop(volatile, None)
    return {
        "spec": {"variants": [config_to_dict(v) for v in ablation.variants], "reference": ablation.reference},
        "config": settings,
        "inputs": {r.variant.label: {"checkpoint": r.checkpoint.name, "checkpoint_sha256": file_sha256(r.checkpoint),
                                     "vae_id": r.latents.vae_id, "adapt": config_to_dict(r.adapt),
                                     "suite": suites[r.dataset]["fingerprint"]}
                   for r in resolved},
    }


def run_ablation(cfg: Config, ablation: Ablation, *, recompute: bool = False, progress: bool = True,
                 verbose: bool = True, memo: dict | None = None) -> AblationResult:
    """Scores of every variant on identical tasks; loaded from JSON when made by the same inputs."""
    from hmlib.baselines import kmeans_latent
    from hmlib.evaluate import suite_fingerprint

    memo = {} if memo is None else memo
    resolved = [resolve_variant(cfg, v, progress=progress, memo=memo) for v in ablation.variants]
    suites = {}
    for dataset in dict.fromkeys(r.dataset for r in resolved):
        suite = ablation_suite(cfg, dataset)
        suites[dataset] = {"suite": suite, "fingerprint": suite_fingerprint(suite)}
    meta = _cache_meta(cfg, ablation, resolved, suites)
    if not recompute:
        cached = load_cached(ablation.key, meta)
        if cached is not None:
            if verbose:
                print(f"Loaded {ablation.key}: {result_path(ablation.key).name} matches every checkpoint, "
                      "latent set, task and setting.")
            return cached
        if verbose and result_path(ablation.key).is_file():
            print(f"Recomputing {ablation.key}: the cached result was made by other inputs or settings.")
    start = time.perf_counter()
    acc, baselines, infos = {}, {}, []
    for r in resolved:
        suite = suites[r.dataset]["suite"]
        acc[r.variant.label] = variant_curves(cfg, r, suite, progress=progress)
        key = f"{r.dataset}/{r.setting}"
        if key not in baselines:
            scores = kmeans_latent(r.latents.mu, suite, n_init=cfg.eval.kmeans_n_init, seed=cfg.eval.seed,
                                   progress=progress)
            baselines[key] = {"kmeans_latent": scores.acc}
        infos.append({"label": r.variant.label, "dataset": r.dataset, "setting": r.setting,
                      "task_size": int(np.asarray(suite.indices).shape[1]),
                      "num_steps": r.adapt.num_inner_steps, "inner_lr": r.adapt.inner_lr,
                      "inner_loss": r.adapt.inner_loss, "context": r.variant.context,
                      "checkpoint": r.checkpoint.name, "train_tag": r.variant.train_tag,
                      "meta_iterations": r.train_cfg.meta.iterations})
    result = AblationResult(key=ablation.key, title=ablation.title, question=ablation.question,
                            reference=ablation.reference, variants=infos, acc=acc, baselines=baselines, meta=meta,
                            seconds=time.perf_counter() - start)
    save_result(result)
    return result


def run_all(cfg: Config, keys: Sequence[str] | None = None, *, recompute: bool = False,
            progress: bool = True) -> dict[str, AblationResult]:
    """Run (or load) the ablations named in ``keys`` (all by default), in notebook order."""
    ablations = {a.key: a for a in define_ablations(cfg)}
    keys = list(ablations) if keys is None else list(keys)
    unknown = [k for k in keys if k not in ablations]
    if unknown:
        raise KeyError(f"unknown ablation(s) {unknown}; choose from {', '.join(ablations)}")
    memo: dict = {}
    return {k: run_ablation(cfg, ablations[k], recompute=recompute, progress=progress, memo=memo) for k in keys}
