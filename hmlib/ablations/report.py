"""Ablation results: per-task accuracies of every variant and seed, their summaries, tables and conclusions.

Accuracies are averaged over replicate seeds per task; intervals are over tasks (:mod:`hmlib.stats`), every
difference is paired per task, and a conclusion calls a difference better or worse only when its 95%
interval excludes zero. The sentences are generated from the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hmlib.stats import paired, pct, signed, summarize


@dataclass
class AblationResult:
    """Per-task accuracies of every variant: acc[label] is (seeds, tasks, steps+1); kmeans is (seeds, tasks)."""

    key: str
    title: str
    question: str
    reference: str | None
    variants: list[dict[str, Any]]
    acc: dict[str, np.ndarray]
    kmeans: np.ndarray
    conditions: list[str]  # the grid's conditions, in the order their tasks are pooled
    condition_tasks: list[int]  # tasks of each condition
    setting: str
    seeds: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def condition_slices(self) -> dict[str, slice]:
        """Which pooled tasks belong to each condition."""
        ends = np.cumsum(self.condition_tasks)
        return {c: slice(int(e - n), int(e)) for c, n, e in zip(self.conditions, self.condition_tasks, ends)}

    def by_condition(self, label: str) -> dict[str, dict[str, Any]]:
        """Per condition: the variant's accuracy after adaptation and its paired difference with the reference."""
        out = {}
        for cond, part in self.condition_slices().items():
            after = self.after(label)[part]
            row = {"after": summarize(after), "vs_kmeans": paired(after, self.kmeans.mean(axis=0)[part])}
            if self.reference is not None and label != self.reference:
                row["vs_reference"] = paired(after, self.after(self.reference)[part])
            out[cond] = row
        return out

    def curve(self, label: str) -> np.ndarray:
        """(T, S+1) accuracy after 0..S steps, averaged over seeds."""
        return self.acc[label].mean(axis=0)

    def before(self, label: str) -> np.ndarray:
        return self.curve(label)[:, 0]

    def after(self, label: str) -> np.ndarray:
        return self.curve(label)[:, -1]

    def summary(self) -> list[dict[str, Any]]:
        """One row per variant: before/after (mean, 95% half-width), paired gain, vs reference and vs k-means."""
        kmeans = self.kmeans.mean(axis=0)
        rows = []
        for info in self.variants:
            label = info["label"]
            after = self.after(label)
            row = {"variant": label, "steps": self.acc[label].shape[2] - 1, "tasks": int(after.shape[0]),
                   "seeds": len(self.seeds), "before": summarize(self.before(label)), "after": summarize(after),
                   "gain": paired(after, self.before(label)), "kmeans": summarize(kmeans),
                   "vs_kmeans": paired(after, kmeans)}
            if self.reference is not None and label != self.reference:
                row["vs_reference"] = paired(after, self.after(self.reference))
            rows.append(row)
        return rows

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "question": self.question, "reference": self.reference,
                "variants": self.variants, "acc": {k: v.tolist() for k, v in self.acc.items()},
                "kmeans": self.kmeans.tolist(), "conditions": self.conditions, "condition_tasks": self.condition_tasks,
                "setting": self.setting, "seeds": self.seeds, "meta": self.meta, "seconds": self.seconds}

    @classmethod
    def from_json(cls, saved: Mapping[str, Any]) -> "AblationResult":
        return cls(key=saved["key"], title=saved["title"], question=saved["question"], reference=saved["reference"],
                   variants=list(saved["variants"]),
                   acc={k: np.asarray(v, dtype=np.float64) for k, v in saved["acc"].items()},
                   kmeans=np.asarray(saved["kmeans"], dtype=np.float64), conditions=list(saved["conditions"]),
                   condition_tasks=[int(n) for n in saved["condition_tasks"]], setting=saved["setting"],
                   seeds=list(saved["seeds"]),
                   meta=dict(saved["meta"]), seconds=float(saved.get("seconds", 0.0)))


def step_table(result: AblationResult, label: str, steps: Iterable[int]) -> list[dict[str, Any]]:
    """Rows per step count: accuracy (mean, 95% half-width), paired gain over 0 steps and vs k-means."""
    curve, kmeans = result.curve(label), result.kmeans.mean(axis=0)
    rows = []
    for s in steps:
        if s >= curve.shape[1]:
            raise ValueError(f"step {s} was not computed (the curve stops at {curve.shape[1] - 1})")
        rows.append({"steps": int(s), "acc": summarize(curve[:, s]), "gain": paired(curve[:, s], curve[:, 0]),
                     "vs_kmeans": paired(curve[:, s], kmeans)})
    return rows


def step_table_rows(result: AblationResult, label: str, steps: Iterable[int]) -> list[dict[str, str]]:
    """Display rows of :func:`step_table` ('*': the interval excludes 0)."""
    return [{"inner steps": str(r["steps"]), "accuracy %": pct(r["acc"]), "gain vs 0 steps (pts)": signed(r["gain"]),
             "vs k-means on embedding (pts)": signed(r["vs_kmeans"])} for r in step_table(result, label, steps)]


def table_rows(result: AblationResult) -> list[dict[str, str]]:
    """Display rows (accuracy in %; '*' marks paired differences whose 95% interval excludes 0)."""
    rows = []
    for row in result.summary():
        display = {"variant": row["variant"], "steps": str(row["steps"]), "before %": pct(row["before"]),
                   "after %": pct(row["after"]), "gain (pts)": signed(row["gain"])}
        if result.reference is not None:
            display[f"vs {result.reference} (pts)"] = signed(row.get("vs_reference"))
        display["vs k-means (pts)"] = signed(row["vs_kmeans"])
        rows.append(display)
    return rows


def describe(cfg: Any, conditions: Sequence[str]) -> str:
    """Markdown paragraph stating what the ablations are scored on and how variants were trained."""
    ab = cfg.ablation
    iterations = ab.meta_iterations or cfg.meta.iterations
    return (f"Every comparison pools the first {ab.num_tasks} tasks of the evaluation suite of each of "
            f"{len(conditions)} held-out conditions ({', '.join(f'`{c}`' for c in conditions)}; test splits, suite seed "
            f"{cfg.eval.seed}) in the **{ab.setting.replace('_', '-')}** setting, averaged over the replicate seeds "
            f"{list(cfg.seeds[:ab.num_seeds])}: a re-trained variant is meta-trained ({iterations} iterations) once "
            f"per seed, on that seed's VAE and backbone, and saved under `models/ablations/`. The main configuration "
            f"adapts with {cfg.adapt.steps_at_test} steps of `{cfg.adapt.inner_loss}` at test time "
            f"({cfg.adapt.num_inner_steps} while meta-training). Accuracies are means over tasks with 95% intervals; "
            "differences are paired per task, `*` marks one whose interval excludes zero, and k-means on the backbone "
            "embedding of the same seed and tasks is the baseline beside every row.")


def _interval(stat: Mapping[str, Any]) -> str:
    if stat.get("ci") is None:
        return f"{100 * stat['mean']:+.1f} points, no interval (fewer than 2 tasks)"
    return f"{100 * stat['mean']:+.1f} points, 95% CI [{100 * stat['low']:+.1f}, {100 * stat['high']:+.1f}]"


def _verdict(stat: Mapping[str, Any], better: str = "better", worse: str = "worse",
             same: str = "no clear difference") -> str:
    """'better (+3.1 points, 95% CI [...])', or ``same`` when the paired interval includes zero."""
    if not stat["excludes_zero"]:
        return f"{same} ({_interval(stat)})"
    return f"{better if stat['mean'] > 0 else worse} ({_interval(stat)})"


def _steps(num: int) -> str:
    return f"{num} step" + ("" if num == 1 else "s")


def _steps_sentence(result: AblationResult, step_grid: Sequence[int] | None) -> str:
    curve = result.curve(result.variants[0]["label"])
    grid = [s for s in (step_grid or range(curve.shape[1])) if s < curve.shape[1]]
    means = curve[:, grid].mean(0)
    best = grid[int(np.argmax(means))]
    if best == 0:
        return (f"**{result.title}**: accuracy is highest with no inner step ({100 * means[0]:.1f}%); at "
                f"{_steps(grid[-1])} it is {100 * means[-1]:.1f}% "
                f"({_verdict(paired(curve[:, grid[-1]], curve[:, 0]), 'higher', 'lower')}).")
    effect = _verdict(paired(curve[:, best], curve[:, 0]), "adaptation helps", "adaptation hurts", "no clear effect")
    text = (f"**{result.title}**: accuracy goes from {100 * means[0]:.1f}% with no inner step to "
            f"{100 * means.max():.1f}% at {_steps(best)} (vs none: {effect})")
    if best == grid[-1]:
        return text + "; it is still highest at the largest step count."
    drop = paired(curve[:, grid[-1]], curve[:, best])
    tail = (f"is significantly lower at {_steps(grid[-1])} ({_interval(drop)})" if drop["excludes_zero"]
            and drop["mean"] < 0 else f"stays on a plateau up to {_steps(grid[-1])} ({_interval(drop)})")
    return text + f"; after its peak it {tail}."


def conclusions(results: Mapping[str, AblationResult], step_grid: Sequence[int] | None = None) -> list[str]:
    """One markdown sentence per ablation stating what it shows, derived only from its numbers."""
    lines = []
    for key, result in results.items():
        if result.reference is None:
            lines.append(_steps_sentence(result, step_grid))
            continue
        rows = result.summary()
        main = next(r for r in rows if r["variant"] == result.reference)
        parts = [f"{row['variant']}: {_verdict(row['vs_reference'])}" for row in rows if "vs_reference" in row]
        parts = parts or ["only the reference was run"]
        lines.append(f"**{result.title}** (after adaptation, vs {result.reference}): " + "; ".join(parts)
                     + f". The reference vs k-means on the embedding: {_verdict(main['vs_kmeans'])}.")
    return lines


def headline_rows(results: Mapping[str, AblationResult]) -> list[dict[str, Any]]:
    """Flat rows for the report index: every variant's accuracy and its paired difference (points)."""
    rows = []
    for key, result in results.items():
        for row in result.summary():
            diff = row.get("vs_reference") or (row["gain"] if result.reference is None else None)
            rows.append({"ablation": key, "variant": row["variant"], "accuracy %": pct(row["after"]),
                         "difference (pts)": "" if diff is None else signed(diff),
                         "vs": result.reference or "0 steps", "vs k-means (pts)": signed(row["vs_kmeans"])})
    return rows
