"""Statistics of per-task results: means with 95% intervals, paired differences, aggregation over seeds.

The one home of these numbers for evaluation, ablations, reports and README tables. An interval needs at
least two values: with fewer, the half-width is ``None`` and tables print "n/a" instead of "± 0.0".
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


def mean_ci(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float | None]:
    """Mean and half-width of the t-based confidence interval (None for fewer than two values)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("mean_ci of an empty array")
    mean = float(values.mean())
    if values.size < 2:
        return mean, None
    sem = values.std(ddof=1) / np.sqrt(values.size)
    return mean, float(sem * scipy_stats.t.ppf(0.5 + confidence / 2, values.size - 1))


def summarize(values: np.ndarray) -> dict[str, Any]:
    """{'mean', 'ci' (half-width or None), 'n'} over the values (tasks)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    mean, half = mean_ci(values)
    return {"mean": mean, "ci": half, "n": int(values.size)}


def paired(values: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Per-task difference ``values - reference``: mean, half-width, interval, whether it excludes 0, share improved."""
    values, reference = np.asarray(values, np.float64), np.asarray(reference, np.float64)
    if values.shape != reference.shape:
        raise ValueError(f"a paired comparison needs identical tasks: shapes {values.shape} vs {reference.shape}")
    diff = values - reference
    out = summarize(diff)
    half = out["ci"]
    out.update(low=None if half is None else out["mean"] - half, high=None if half is None else out["mean"] + half,
               excludes_zero=bool(half is not None and abs(out["mean"]) > half),
               share_improved=float(np.mean(diff > 0)))
    return out


def aggregate_seeds(acc_by_seed: np.ndarray) -> dict[str, Any]:
    """(seeds, tasks) accuracies -> interval over tasks of the per-task seed mean, plus the seed-to-seed spread."""
    acc_by_seed = np.asarray(acc_by_seed, dtype=np.float64)
    if acc_by_seed.ndim != 2:
        raise ValueError(f"expected (num_seeds, num_tasks), got shape {acc_by_seed.shape}")
    out = summarize(acc_by_seed.mean(axis=0))
    seed_means = acc_by_seed.mean(axis=1)
    out.update(num_seeds=int(len(seed_means)), seed_means=seed_means.tolist(),
               seed_std=float(seed_means.std(ddof=1)) if len(seed_means) > 1 else None)
    return out


def pct(stat: dict[str, Any] | None, digits: int = 1) -> str:
    """'71.3 ± 1.2' (a fraction shown in percent), 'n/a' for the interval when it is undefined."""
    if stat is None:
        return "–"
    half = "n/a" if stat.get("ci") is None else f"{100 * stat['ci']:.{digits}f}"
    return f"{100 * stat['mean']:.{digits}f} ± {half}"


def signed(stat: dict[str, Any] | None, digits: int = 1, star: bool = True) -> str:
    """'+1.4 ± 0.3 *' for a paired difference in points; '*' when its interval excludes zero."""
    if stat is None:
        return "–"
    half = "n/a" if stat.get("ci") is None else f"{100 * stat['ci']:.{digits}f}"
    mark = " *" if star and stat.get("excludes_zero") else ""
    return f"{100 * stat['mean']:+.{digits}f} ± {half}{mark}"
