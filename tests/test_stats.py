"""Statistics of per-task results: t-intervals, paired differences, aggregation over seeds, table strings."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hmlib.stats import aggregate_seeds, mean_ci, paired, pct, signed, summarize

NUM_TASKS = 25
T_975_ONE_DOF = 12.7062047  # t(0.975) with one degree of freedom


def test_mean_ci_matches_the_t_interval():
    """The half-width is that of scipy's t-interval; wider at higher confidence."""
    values = np.random.default_rng(0).normal(0.6, 0.1, NUM_TASKS)
    mean, half = mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean()) and half == pytest.approx((high - low) / 2)
    assert mean_ci(values, 0.99)[1] > half


def test_mean_ci_known_values_and_edge_cases():
    """Two values: sem x t(1 dof); one value: no interval (None, not 0); constant: zero width; empty: error."""
    mean, half = mean_ci(np.array([0.0, 1.0]))
    assert mean == 0.5 and half == pytest.approx(0.5 * T_975_ONE_DOF, rel=1e-6)
    assert mean_ci(np.array([0.7])) == (0.7, None)
    assert mean_ci(np.full(10, 0.3))[1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="empty"):
        mean_ci(np.array([]))


def test_summarize():
    """summarize gives mean, half-width and count over all values (flattened)."""
    out = summarize(np.array([[0.2, 0.4], [0.6, 0.8]]))
    assert out["n"] == 4 and out["mean"] == pytest.approx(0.5)
    assert out["ci"] == pytest.approx(mean_ci(np.array([0.2, 0.4, 0.6, 0.8]))[1])
    assert summarize(np.array([0.3]))["ci"] is None


def test_paired_difference_interval_and_share_improved():
    """Per-task differences: their mean and t-interval, whether it excludes zero, share of tasks improved."""
    rng = np.random.default_rng(1)
    reference = rng.uniform(0.4, 0.6, NUM_TASKS)
    better = reference + 0.05 + rng.normal(0, 0.01, NUM_TASKS)
    out = paired(better, reference)
    mean, half = mean_ci(better - reference)
    assert out["mean"] == pytest.approx(mean) and out["ci"] == pytest.approx(half) and out["n"] == NUM_TASKS
    assert out["low"] == pytest.approx(mean - half) and out["high"] == pytest.approx(mean + half)
    assert out["excludes_zero"] is True and out["share_improved"] == 1.0
    noise = paired(reference + rng.normal(0, 0.05, NUM_TASKS), reference)
    assert noise["low"] < 0 < noise["high"] and noise["excludes_zero"] is False
    mixed = paired(np.array([0.5, 0.7, 0.6, 0.6]), np.array([0.6, 0.6, 0.6, 0.5]))
    assert mixed["share_improved"] == pytest.approx(0.5)  # ties are not improvements


def test_paired_needs_identical_tasks_and_one_task_has_no_interval():
    """Different task counts are refused; one task gives a difference without an interval."""
    with pytest.raises(ValueError, match="identical tasks"):
        paired(np.zeros(5), np.zeros(4))
    one = paired(np.array([0.8]), np.array([0.5]))
    assert one["mean"] == pytest.approx(0.3) and one["ci"] is None
    assert one["low"] is None and one["high"] is None and one["excludes_zero"] is False


def test_aggregate_seeds_averages_each_task_over_seeds():
    """The interval is over tasks of the per-task seed mean; seed means and their spread are reported."""
    acc = np.array([[0.5, 0.7, 0.9, 0.6], [0.7, 0.7, 0.5, 0.8], [0.6, 0.4, 0.7, 0.7]])
    out = aggregate_seeds(acc)
    per_task = acc.mean(axis=0)
    assert out["mean"] == pytest.approx(per_task.mean()) and out["ci"] == pytest.approx(mean_ci(per_task)[1])
    assert out["n"] == 4 and out["num_seeds"] == 3  # tasks, not the 12 pooled (seed, task) values
    np.testing.assert_allclose(out["seed_means"], acc.mean(axis=1))
    assert out["seed_std"] == pytest.approx(np.std(acc.mean(axis=1), ddof=1))


def test_aggregate_seeds_one_seed_has_no_spread():
    """With one seed the task interval remains but the seed spread is None; a 1-D array is refused."""
    out = aggregate_seeds(np.array([[0.5, 0.7, 0.6]]))
    assert out["num_seeds"] == 1 and out["seed_std"] is None and out["ci"] is not None
    with pytest.raises(ValueError, match="num_seeds, num_tasks"):
        aggregate_seeds(np.array([0.5, 0.7]))


def test_pct_and_signed_strings():
    """Percent strings with the half-width, 'n/a' where the interval is undefined, '–' for no result."""
    assert pct({"mean": 0.713, "ci": 0.012}) == "71.3 ± 1.2"
    assert pct({"mean": 0.7, "ci": None}) == "70.0 ± n/a"
    assert pct(summarize(np.array([0.7]))) == "70.0 ± n/a"
    assert pct({"mean": 0.71234, "ci": 0.0}, digits=2) == "71.23 ± 0.00"
    assert pct(None) == "–" and signed(None) == "–"
    assert signed({"mean": 0.014, "ci": 0.003, "excludes_zero": True}) == "+1.4 ± 0.3 *"
    assert signed({"mean": -0.02, "ci": 0.05, "excludes_zero": False}) == "-2.0 ± 5.0"
    assert signed({"mean": 0.014, "ci": 0.003, "excludes_zero": True}, star=False) == "+1.4 ± 0.3"
    assert signed(paired(np.array([0.8]), np.array([0.5]))) == "+30.0 ± n/a"
