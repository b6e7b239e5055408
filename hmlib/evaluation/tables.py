"""Tables of evaluation results: per condition, every method with its interval and paired differences; across
conditions, the mean paired difference with its interval and wins / ties / losses; markdown and report rows.

A *tie* is a paired 95% interval (over the condition's tasks) that contains zero. The interval of a mean over
conditions is a t-interval over the conditions' mean differences (conditions as the units).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from hmlib.artifacts import atomic_path, write_json
from hmlib.evaluation.methods import METHODS
from hmlib.stats import aggregate_seeds, paired, pct, signed, summarize

METHOD_ROWS = ("hypernet_adapted", "hypernet")  # the method's rows, before every baseline
REFERENCES = {"kmeans": "kmeans_embedding", "plain": "plain_choice"}  # fixed references of the summary


def _acc_by_seed(block: Mapping[str, Any], method: str) -> np.ndarray:
    """(seeds, tasks) accuracy of one method in a condition's block."""
    methods = block["methods"]
    if method in METHOD_ROWS:
        steps = np.asarray(methods["hypernet"]["acc_steps"], dtype=np.float64)  # (R, T, S+1)
        return steps[:, :, -1 if method == "hypernet_adapted" else 0]
    return np.asarray(methods[method]["acc"], dtype=np.float64)


def method_names(block: Mapping[str, Any]) -> list[str]:
    """The method's rows, then every scored baseline in registry order."""
    scored = [m for m in METHODS if m in block["methods"]]
    return [*METHOD_ROWS, *[m for m in scored if m not in METHOD_ROWS]]


def _seconds(block: Mapping[str, Any], method: str) -> float | None:
    if method == "hypernet":
        return None
    key = "hypernet" if method == "hypernet_adapted" else method
    return float(np.mean(block["methods"][key]["seconds"]))


def strongest_baseline(block: Mapping[str, Any]) -> str:
    """The label-free baseline with the highest mean accuracy in this condition (what a claim must beat)."""
    candidates = [m for m in method_names(block) if m not in METHOD_ROWS and not METHODS[m].supervised]
    return max(candidates, key=lambda m: _acc_by_seed(block, m).mean(axis=0).mean())


def condition_rows(block: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method in one condition: accuracy over tasks (seed-averaged), seed spread, ms per task, and its
    paired difference with the condition's strongest label-free baseline; the adapted hypernetwork's row adds its
    test-time gain."""
    cond = block["condition"]
    strongest = strongest_baseline(block)
    reference = _acc_by_seed(block, strongest).mean(axis=0)
    rows = []
    for name in method_names(block):
        acc = _acc_by_seed(block, name)
        stats = aggregate_seeds(acc)
        method = METHODS.get(name)
        row = {"condition": cond["key"], "dataset": cond["dataset"], "shift": cond["shift"],
               "num_classes": cond["num_classes"], "num_images": cond["fitted"] or cond["num_images"],
               "num_tasks": block["suite"]["num_tasks"], "method": name, "label": method.label if method else name,
               "accuracy": stats["mean"], "ci": stats["ci"], "num_seeds": stats["num_seeds"],
               "seed_std": stats["seed_std"], "supervised": bool(method and method.supervised),
               "adapts": bool(method and method.adapts), "ms_per_task": None,
               "vs_strongest": paired(acc.mean(axis=0), reference), "strongest": strongest}
        seconds = _seconds(block, name)
        row["ms_per_task"] = None if seconds is None else 1000 * seconds
        if name == "hypernet_adapted":
            steps = np.asarray(block["methods"]["hypernet"]["acc_steps"], dtype=np.float64)
            row["num_steps"] = int(steps.shape[2] - 1)
            row["label"] = f"hypernetwork + {row['num_steps']} inner steps"
            row["gain"] = paired(steps[:, :, -1].mean(axis=0), steps[:, :, 0].mean(axis=0))
        rows.append(row)
    return rows


def over_conditions(diffs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of per-condition mean differences with a t-interval over conditions; wins / ties / losses."""
    means = np.array([d["mean"] for d in diffs])
    out = summarize(means) if len(means) else {"mean": float("nan"), "ci": None, "n": 0}
    half = out["ci"]
    out.update(excludes_zero=bool(half is not None and abs(out["mean"]) > half),
               wins=sum(bool(d["excludes_zero"] and d["mean"] > 0) for d in diffs),
               losses=sum(bool(d["excludes_zero"] and d["mean"] < 0) for d in diffs),
               ties=sum(not d["excludes_zero"] for d in diffs), worst=float(means.min()) if len(means) else None)
    return out


def grid_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """Per condition: the adapted hypernetwork's paired differences (vs the strongest baseline, k-means on the
    embedding, the plain adaptation with its label-free choice) and test-time gain; across conditions: their means
    with intervals and wins / ties / losses (overall, and over the shifted conditions)."""
    per_condition = []
    for block in result["conditions"]:
        rows = {r["method"]: r for r in condition_rows(block)}
        method = _acc_by_seed(block, "hypernet_adapted").mean(axis=0)
        entry = {"key": block["condition"]["key"], "label": block["condition"]["label"],
                 "dataset": block["condition"]["dataset"], "shift": block["condition"]["shift"],
                 "num_classes": block["condition"]["num_classes"], "num_images": rows["hypernet_adapted"]["num_images"],
                 "strongest": rows["hypernet_adapted"]["strongest"],
                 "vs_strongest": rows["hypernet_adapted"]["vs_strongest"], "gain": rows["hypernet_adapted"]["gain"],
                 "accuracy": {name: {"mean": r["accuracy"], "ci": r["ci"]} for name, r in rows.items()}}
        for key, name in REFERENCES.items():
            if name in block["methods"]:
                entry[f"vs_{key}"] = paired(method, _acc_by_seed(block, name).mean(axis=0))
        per_condition.append(entry)
    overall = {}
    for key in ("vs_strongest", "gain", *(f"vs_{k}" for k in REFERENCES)):
        diffs = [c[key] for c in per_condition if key in c]
        shifted = [c[key] for c in per_condition if key in c and c["shift"] != "clean"]
        overall[key] = {"all": over_conditions(diffs), "shifted": over_conditions(shifted)}
    return {"conditions": per_condition, "overall": overall}


def heatmap_data(result: Mapping[str, Any]) -> tuple[list[str], list[str], np.ndarray]:
    """(condition labels, method names, paired difference in points (conditions, methods)) of every unsupervised
    method against each condition's strongest label-free baseline; NaN where a method was not scored."""
    blocks = result["conditions"]
    names = [m for m in dict.fromkeys(n for b in blocks for n in method_names(b))
             if not (m in METHODS and METHODS[m].supervised)]
    values = np.full((len(blocks), len(names)), np.nan)
    for i, block in enumerate(blocks):
        reference = _acc_by_seed(block, strongest_baseline(block)).mean(axis=0)
        for j, name in enumerate(names):
            if name in METHOD_ROWS or name in block["methods"]:
                values[i, j] = 100 * float(np.mean(_acc_by_seed(block, name).mean(axis=0) - reference))
    return [b["condition"]["key"] for b in blocks], names, values


def _acc(row: Mapping[str, Any]) -> str:
    text = pct({"mean": row["accuracy"], "ci": row["ci"]})
    if row.get("num_seeds", 1) > 1 and row.get("seed_std") is not None:
        text += f" (sd {100 * row['seed_std']:.1f})"
    return text


def summary_markdown(result: Mapping[str, Any]) -> str:
    """The grid in one table (a row per condition), then the means over conditions (``result``: an evaluation
    result, or any mapping with its ``summary``)."""
    summary = result["summary"]
    lines = ["| condition | hypernetwork + adaptation | k-means on the embedding | plain adaptation (choice) | "
             "strongest label-free baseline | vs strongest | vs plain | test-time gain |",
             "|---|---:|---:|---:|---|---:|---:|---:|"]
    for c in summary["conditions"]:
        acc = c["accuracy"]
        cell = lambda m: pct(acc[m]) if m in acc else "–"  # noqa: E731
        lines.append(f"| {c['label']} | {cell('hypernet_adapted')} | {cell('kmeans_embedding')} | "
                     f"{cell('plain_choice')} | {METHODS[c['strongest']].label} | {signed(c['vs_strongest'])} | "
                     f"{signed(c.get('vs_plain'))} | {signed(c['gain'])} |")
    lines += ["", "| over conditions (mean of per-condition differences, t-interval over conditions) | mean, points | "
                  "wins / ties / losses | worst condition |", "|---|---:|---:|---:|"]
    labels = {"vs_strongest": "vs the strongest label-free baseline", "vs_kmeans": "vs k-means on the embedding",
              "vs_plain": "vs plain adaptation with its label-free choice", "gain": "test-time gain"}
    for key, label in labels.items():
        for part in ("all", "shifted"):
            stat = summary["overall"][key][part]
            if not stat.get("n"):
                continue
            worst = "" if stat["worst"] is None else f"{100 * stat['worst']:+.1f}"
            lines.append(f"| {label}{', shifted conditions' if part == 'shifted' else ''} | {signed(stat)} | "
                         f"{stat['wins']} / {stat['ties']} / {stat['losses']} | {worst} |")
    return "\n".join(lines)


def markdown_table(block: Mapping[str, Any]) -> str:
    """One condition: every method, accuracy % ± 95% CI (seed sd), ms per task, paired difference with the
    strongest label-free baseline and the test-time gain ('*' where the interval excludes zero)."""
    rows = condition_rows(block)
    lines = [f"**{block['condition']['label']}** ({rows[0]['num_tasks']} tasks, {rows[0]['num_seeds']} seeds; "
             f"strongest label-free baseline: {METHODS[rows[0]['strongest']].label})", "",
             "| method | accuracy % (95% CI) | ms / task | vs strongest baseline, points | test-time gain, points |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        ms = "" if row.get("ms_per_task") is None else f"{row['ms_per_task']:.1f}"
        gain = signed(row["gain"]) if "gain" in row else ""
        versus = "" if row["method"] == row["strongest"] else signed(row["vs_strongest"])
        lines.append(f"| {row['label']}{' (supervised)' if row['supervised'] else ''} | {_acc(row)} | {ms} | "
                     f"{versus} | {gain} |")
    return "\n".join(lines)


def headline_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flat rows of display strings for ``reports/index.html``: one per condition and setting."""
    flat = []
    for result in results:
        for c in result["summary"]["conditions"]:
            acc = c["accuracy"]
            flat.append({"setting": result["setting"], "condition": c["label"],
                         "hypernetwork %": pct(acc["hypernet_adapted"]),
                         "k-means %": pct(acc.get("kmeans_embedding")),
                         "plain adaptation %": pct(acc.get("plain_choice")),
                         "vs strongest": signed(c["vs_strongest"]), "gain": signed(c["gain"])})
    return flat


def write_results(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write the result JSON and its markdown tables (``.md`` beside it), both atomically."""
    path = Path(path)
    write_json(path, result)
    body = "\n\n".join(markdown_table(block) for block in result["conditions"])
    with atomic_path(path.with_suffix(".md")) as tmp:
        tmp.write_text(f"# Evaluation: {result['setting_label']}\n\n{summary_markdown(result)}\n\n{body}\n")
    return path
