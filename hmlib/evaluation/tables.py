"""Tables of evaluation results: summary rows with intervals and paired differences, markdown, report headlines."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hmlib.artifacts import atomic_path, write_json
from hmlib.evaluation.methods import METHODS
from hmlib.stats import aggregate_seeds, paired, pct, signed


def _seed_mean(acc: Sequence) -> np.ndarray:
    return np.asarray(acc, dtype=np.float64).mean(axis=0)


def summary_rows_for_size(result: Mapping[str, Any], num_images: int) -> list[dict[str, Any]]:
    """One row per method at one task size: accuracy over tasks (seed-averaged), seed spread, ms per task; the
    adapted hypernetwork's row adds its test-time gain and its paired difference with every unsupervised baseline."""
    block = result["sizes"][str(num_images)]
    base = {"setting": result["setting"], "dataset": result["dataset"], "num_images": int(num_images),
            "num_tasks": block["suite"]["num_tasks"]}
    hyper = np.asarray(block["methods"]["hypernet"]["acc_steps"], dtype=np.float64)  # (R, T, S+1)
    per_method = {"hypernet_adapted": hyper[:, :, -1], "hypernet": hyper[:, :, 0]}
    seconds = {"hypernet_adapted": np.mean(block["methods"]["hypernet"]["seconds"]), "hypernet": None}
    for name, scores in block["methods"].items():
        if name != "hypernet":
            per_method[name] = np.asarray(scores["acc"], dtype=np.float64)
            seconds[name] = float(np.mean(scores["seconds"]))
    rows = []
    for name, acc in per_method.items():
        method = METHODS.get(name)
        stats = aggregate_seeds(acc)
        row = {**base, "method": name, "label": method.label if method else name, "accuracy": stats["mean"],
               "ci": stats["ci"], "num_seeds": stats["num_seeds"], "seed_means": stats["seed_means"],
               "seed_std": stats["seed_std"], "supervised": bool(method and method.supervised),
               "ms_per_task": None if seconds[name] is None else 1000 * seconds[name]}
        if name == "hypernet_adapted":
            row["num_steps"] = int(hyper.shape[2] - 1)
            row["label"] = f"hypernetwork + {row['num_steps']} inner steps"
            row["gain"] = paired(_seed_mean(hyper[:, :, -1]), _seed_mean(hyper[:, :, 0]))
            row["vs"] = {other: paired(_seed_mean(acc), _seed_mean(per_method[other])) for other in per_method
                         if other not in ("hypernet", "hypernet_adapted") and not METHODS[other].supervised}
        rows.append(row)
    return rows


def strongest_baseline(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The unsupervised baseline row with the highest mean accuracy (what a claim must beat)."""
    candidates = [r for r in rows if r["method"] not in ("hypernet", "hypernet_adapted") and not r["supervised"]]
    return max(candidates, key=lambda r: r["accuracy"])


def summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Summary rows of every task size in a result."""
    return [row for n in result["sizes"] for row in result["sizes"][n]["summary"]]


def _acc(row: Mapping[str, Any]) -> str:
    text = pct({"mean": row["accuracy"], "ci": row["ci"]})
    if row.get("num_seeds", 1) > 1 and row.get("seed_std") is not None:
        text += f" (seed sd {100 * row['seed_std']:.1f})"
    return text


def markdown_table(result_or_rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """Markdown table: method, accuracy % ± 95% CI (seed sd), ms per task, paired difference with the strongest
    unsupervised baseline and the test-time gain (points; '*' where the interval excludes zero)."""
    rows = summary_rows(result_or_rows) if isinstance(result_or_rows, Mapping) else list(result_or_rows)
    lines = ["| setting | dataset | N | tasks | seeds | method | accuracy % (95% CI) | ms / task "
             "| vs strongest baseline, points | test-time gain, points |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for size in dict.fromkeys(r["num_images"] for r in rows):
        group = [r for r in rows if r["num_images"] == size]
        strongest = strongest_baseline(group)
        for row in group:
            ms = "" if row.get("ms_per_task") is None else f"{row['ms_per_task']:.1f}"
            versus = f"{signed(row['vs'][strongest['method']])} ({strongest['method']})" if "vs" in row else ""
            gain = signed(row["gain"]) if "gain" in row else ""
            lines.append(f"| {row['setting']} | {row['dataset']} | {row['num_images']} | {row['num_tasks']} | "
                         f"{row['num_seeds']} | {row['label']} | {_acc(row)} | {ms} | {versus} | {gain} |")
    return "\n".join(lines)


def headline_rows(results: Sequence[Mapping[str, Any]], num_images: int | None = None) -> list[dict[str, Any]]:
    """Flat rows of display strings for ``reports/index.html``: one per method (largest task size by default)."""
    flat = []
    for result in results:
        size = max(int(n) for n in result["sizes"]) if num_images is None else int(num_images)
        for row in result["sizes"][str(size)]["summary"]:
            strongest = strongest_baseline(result["sizes"][str(size)]["summary"])
            flat.append({"setting": row["setting"], "dataset": row["dataset"], "N": row["num_images"],
                         "tasks": row["num_tasks"], "seeds": row["num_seeds"], "method": row["label"],
                         "accuracy %": _acc(row),
                         "vs strongest baseline": signed(row["vs"][strongest["method"]]) if "vs" in row else "",
                         "gain, points": signed(row["gain"]) if "gain" in row else ""})
    return flat


def write_results(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write the result JSON and its markdown table (``.md`` beside it), both atomically."""
    path = Path(path)
    write_json(path, result)
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(f"# Evaluation: {result['dataset']}, {result['setting_label']}\n\n{markdown_table(result)}\n")
    return path
