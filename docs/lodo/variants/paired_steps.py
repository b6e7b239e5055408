"""Two test-time inner-step counts, paired per task, on a finished run's checkpoints and evaluation suites (docs/METHOD.md,
"Eight inner steps at test time"): the hypernetwork as the run evaluated it (every candidate, the label-free choice),
scored with each count on the same tasks of every condition of results/eval_<setting>.json, method only (no
baseline, no training). Each task's difference is averaged over the replicate seeds; conditions pool with a
t-interval. Held-out figures: a report of a choice made on the folds, never a way to make one.

    HMLIB_HOME=<home of a finished make run> .venv/bin/python docs/lodo/variants/paired_steps.py --steps 3 8
"""
import argparse
import json

import numpy as np
from scipy import stats

from hmlib.config import configure_runtime, load_config
from hmlib.evaluation.conditions import grid, suite_for
from hmlib.evaluation.evaluate import load_bundles, score_hypernet
from hmlib.evaluation.inputs import seed_inputs
from hmlib.paths import results_dir


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and 95% t half-width."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=(3, 8), metavar=("A", "B"))
    parser.add_argument("--settings", nargs="+", default=["zero_shot", "transductive"])
    args = parser.parse_args()
    low, high = args.steps
    cfg = load_config("default")
    configure_runtime(cfg)
    record = {}
    for setting in args.settings:
        result = json.loads((results_dir() / f"eval_{setting}.json").read_text())
        bundles = load_bundles([c["path"] for c in result["checkpoints"]], "cpu")
        rows = []
        for block in result["conditions"]:
            key, dataset = block["condition"]["key"], block["condition"]["dataset"]
            condition = next(c for c in grid(cfg, [dataset], verbose=False) if c.key == key)
            acc = {low: [], high: []}
            for bundle in bundles:
                inputs = seed_inputs(bundle, cfg, dataset, setting, with_train=False, progress=False)
                suite = suite_for(cfg, condition, inputs.test.labels)
                for steps in acc:
                    acc[steps].append(score_hypernet(inputs, cfg, suite, steps)[0][:, -1])
            a, b = np.stack(acc[low]), np.stack(acc[high])  # (seeds, T)
            mean, half = interval(100 * (b - a).mean(0))
            rows.append({"condition": key, str(low): 100 * a.mean(), str(high): 100 * b.mean(), "diff": mean,
                         "half": half})
            print(f"{setting:13s} {key:28s} {low} steps {100 * a.mean():5.1f}  {high} steps {100 * b.mean():5.1f}  "
                  f"{high} minus {low} {mean:+.1f} ± {half:.1f}", flush=True)
        if len(rows) > 1:
            mean, half = interval([r["diff"] for r in rows])
            print(f"{setting:13s} over {len(rows)} conditions {mean:+.1f} ± {half:.1f} (t-interval over conditions); "
                  f"per condition {min(r['diff'] for r in rows):+.1f} to {max(r['diff'] for r in rows):+.1f}")
        record[setting] = rows
    out = results_dir() / f"paired_steps_{low}_{high}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
