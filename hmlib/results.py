"""The committed record of the default run: ``docs/results.json``, and the README tables generated from it.

``hmlib results --write`` (after ``make run`` and ``make bench``) gathers the evaluation results, the notebooks'
wall times and the benchmark figures from the artifact folder into ``docs/results.json`` and rewrites every README
section between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` from it. ``hmlib results --check`` (and a
test) fails when the README and the file disagree, so no figure in the README is copied by hand.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from hmlib import paths
from hmlib.artifacts import ArtifactError, atomic_path, read_json, write_json
from hmlib.config import SETTINGS
from hmlib.errors import HmlibError

RESULTS_FILE = paths.REPO_ROOT / "docs" / "results.json"
README = paths.REPO_ROOT / "README.md"
SECTION = re.compile(r"(<!-- results:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


class ResultsError(HmlibError):
    """The results record or the README cannot be brought in line."""


def gather(home: Path | None = None, *, allow_other_profile: bool = False) -> dict[str, Any]:
    """The record from an artifact folder (``$HMLIB_HOME`` by default): the evaluation summaries, wall times and
    benchmarks. A run of another profile than ``default`` (a smoke run, a 2-task run) is refused unless
    ``allow_other_profile``: the README's prose describes the default protocol."""
    from hmlib.evaluation.benchmark import setting_comparison  # evaluation imports torch: only when gathering

    home = Path(home) if home is not None else paths.home()
    record: dict[str, Any] = {"evaluation": {}, "pipeline": {}, "benchmarks": {}}
    evaluations = {}
    for setting in SETTINGS:
        path = home / "results" / f"eval_{setting}.json"
        if not path.is_file():
            raise ResultsError(f"{path} not found; run `make run` first")
        evaluations[setting] = result = read_json(path)
        if result.get("profile") != "default" and not allow_other_profile:
            raise ResultsError(f"{path} comes from a '{result.get('profile')}' run, not the default protocol the "
                               "README describes; run `make run` (or pass --allow-other-profile and say so)")
        record["evaluation"][setting] = _summary_entry(result)
    record["evaluation"]["transductive"]["vs_zero_shot"] = setting_comparison(evaluations["transductive"],
                                                                              evaluations["zero_shot"])
    benchmarks = {key: home / "results" / f"benchmark_{setting}.json"
                  for key, setting in (("benchmark", "zero_shot"), ("benchmark_transductive", "transductive"))}
    found = {key: read_json(path) for key, path in benchmarks.items() if path.is_file()}
    record.update({key: _summary_entry(result) for key, result in found.items()})
    if len(found) == len(benchmarks):
        record["benchmark_transductive"]["vs_zero_shot"] = setting_comparison(found["benchmark_transductive"],
                                                                              found["benchmark"])
    runs = home / "reports" / "runs.json"
    if runs.is_file():
        log = read_json(runs).get("notebooks", {})
        record["pipeline"] = {name: {"wall_s": entry.get("wall_s"), "status": entry.get("status"),
                                     "profile": entry.get("profile")} for name, entry in sorted(log.items())}
    for path in sorted((home / "results" / "bench").glob("*.json")):
        record["benchmarks"][path.stem] = read_json(path)
    return record


KEPT_PARTS = {"benchmark": "`make benchmark`", "benchmark_transductive": "`make benchmark-transductive`",
              "pipeline": "the notebooks' wall times (reports/runs.json)", "benchmarks": "`make bench`"}


def keep_missing(record: dict[str, Any], previous: Mapping[str, Any]) -> list[str]:
    """Fill the parts of :data:`KEPT_PARTS` that the gathered ``record`` lacks (that run was not made in this home)
    from the ``previous`` record, so a home without a benchmark never wipes the committed one; what was kept."""
    kept = []
    for part, what in KEPT_PARTS.items():
        if not record.get(part) and previous.get(part):
            record[part] = previous[part]
            kept.append(what)
    return kept


def _summary_entry(result: Mapping[str, Any]) -> dict[str, Any]:
    """What the record keeps of an evaluation or benchmark result: its protocol and its grid summary."""
    return {"profile": result.get("profile"), "seeds": result["seeds"], "num_steps": result["num_steps"],
            "num_tasks": result["num_tasks"], "setting_label": result["setting_label"], "summary": result["summary"]}


def _results_table(record: Mapping[str, Any]) -> str:
    from hmlib.evaluation.tables import summary_markdown  # evaluation imports torch: only when rendering

    parts = []
    evaluation = record["evaluation"]
    for setting in sorted(evaluation, key=lambda s: list(SETTINGS).index(s) if s in SETTINGS else len(SETTINGS)):
        entry = evaluation[setting]  # in SETTINGS order: the file's keys are sorted, the README's order is fixed
        if "summary" not in entry:
            raise ResultsError(f"the results record holds a {setting} evaluation of an older format (no grid "
                               "summary); regenerate it with `hmlib results --write` after `make run`")
        profile = "" if entry.get("profile") in (None, "default") else f", profile `{entry['profile']}`"
        parts.append(f"**{entry['setting_label'].capitalize()}** ({entry['num_tasks']} tasks per condition, seeds "
                     f"{entry['seeds']}, {entry['num_steps']} inner steps{profile}):\n\n{summary_markdown(entry)}\n")
        parts.append(_versus_zero_shot(entry))
    return "\n".join(p for p in parts if p)


def _versus_zero_shot(entry: Mapping[str, Any]) -> str:
    """The paired comparison with the zero-shot setting a transductive entry carries ('' when it has none)."""
    from hmlib.evaluation.benchmark import comparison_markdown

    if not entry.get("vs_zero_shot", {}).get("conditions"):
        return ""
    return ("The hypernetwork after its inner steps, transductive minus zero-shot on the same tasks (paired per "
            f"task):\n\n{comparison_markdown(entry['vs_zero_shot'])}\n")


def _pipeline_table(record: Mapping[str, Any]) -> str:
    pipeline = record.get("pipeline") or {}
    if not pipeline:
        return "_no pipeline run recorded_\n"
    total = sum(v["wall_s"] or 0 for v in pipeline.values())
    cells = ", ".join(f"{name} {entry['wall_s']:.0f} s" for name, entry in pipeline.items())
    return f"Total **{total:.0f} s ({total / 60:.1f} min)**: {cells}.\n"


def _bench_table(record: Mapping[str, Any]) -> str:
    benches = record.get("benchmarks") or {}
    if not benches:
        return "_no benchmark recorded_\n"
    lines = ["| benchmark | figure | value |", "|---|---|---:|"]
    for name, figures in benches.items():
        for key, value in figures.items():
            if key.startswith("_"):
                continue
            lines.append(f"| {name} | {key} | {value if not isinstance(value, float) else f'{value:,.1f}'} |")
    return "\n".join(lines) + "\n"


def _benchmark_section(entry: Mapping[str, Any] | None, setting: str, command: str) -> str:
    """A benchmark's grid table (and, transductive, its pairing with the zero-shot benchmark)."""
    from hmlib.evaluation.tables import summary_markdown

    if not entry:
        return f"_no `{command}` run recorded_\n"
    versus = _versus_zero_shot(entry)
    return (f"{entry['num_tasks']} tasks per condition, seeds {entry['seeds']}, {entry['num_steps']} inner steps, "
            f"{setting}:\n\n{summary_markdown(entry)}\n" + (f"\n{versus}" if versus else ""))


def _benchmark_table(record: Mapping[str, Any]) -> str:
    return _benchmark_section(record.get("benchmark"), "zero-shot", "make benchmark")


def _transductive_benchmark_table(record: Mapping[str, Any]) -> str:
    return _benchmark_section(record.get("benchmark_transductive"), "transductive", "make benchmark-transductive")


RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "results": _results_table, "benchmark": _benchmark_table, "benchmark_transductive": _transductive_benchmark_table,
    "pipeline": _pipeline_table, "benchmarks": _bench_table}


def render_readme(text: str, record: Mapping[str, Any]) -> str:
    """``text`` with every results section regenerated from ``record``."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise ResultsError(f"README has an unknown results section {name!r}; known: {', '.join(RENDERERS)}")
        return match.group(1) + RENDERERS[name](record) + match.group(4)

    return SECTION.sub(replace, text)


def check_readme(readme: Path = README, results: Path = RESULTS_FILE) -> list[str]:
    """Names of README results sections that disagree with the results file (empty when in line)."""
    record = read_json(results)
    text = readme.read_text()
    expected = render_readme(text, record)
    have = {m.group("name"): m.group("body") for m in SECTION.finditer(text)}
    want = {m.group("name"): m.group("body") for m in SECTION.finditer(expected)}
    return sorted(name for name in want if have.get(name) != want[name])


def cluster_accuracy_note(results: Path | None = None) -> str:
    """What accuracy to expect of ``hmlib cluster`` at several K, beside k-means on the same embedding, from the
    recorded benchmark (for its --help)."""
    try:
        figures = read_json(results or RESULTS_FILE).get("benchmarks", {}).get("cluster", {})
    except ArtifactError:
        figures = {}
    measured = []
    for key, value in figures.items():
        if key.endswith(": hmlib cluster %"):
            where = key.split(":")[0]
            kmeans = figures.get(f"{where}: k-means on the embedding %")
            measured.append(f"{where} {value:.1f}%" + ("" if kmeans is None else f" (k-means on the embedding {kmeans:.1f}%)"))
    if not measured:
        return "no measurement recorded yet (benchmarks/bench_cluster.py)"
    return "measured on 1,000-image folders (benchmarks/bench_cluster.py, docs/results.json): " + ", ".join(measured)


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``hmlib results``."""
    parser = subparsers.add_parser("results", help="write docs/results.json from the last run, regenerate the README "
                                                   "tables, or check that they agree")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="gather from the artifact folder, write both files")
    group.add_argument("--check", action="store_true", help="fail if README and docs/results.json disagree")
    parser.add_argument("--home", type=Path, help="artifact folder of the run (default: $HMLIB_HOME or the repository)")
    parser.add_argument("--allow-other-profile", action="store_true",
                        help="write figures of a run that is not the default profile (the README will say which)")
    parser.set_defaults(func=run_results_command)
    return parser


def run_results_command(args: argparse.Namespace) -> int:
    """Handler of ``hmlib results``."""
    if args.write:
        record = gather(args.home, allow_other_profile=args.allow_other_profile)
        kept = keep_missing(record, read_json(RESULTS_FILE) if RESULTS_FILE.is_file() else {})
        write_json(RESULTS_FILE, record)
        with atomic_path(README) as tmp:
            tmp.write_text(render_readme(README.read_text(), record))
        print(f"wrote {RESULTS_FILE} and regenerated the results sections of {README}")
        if kept:
            print(f"kept from the previous {RESULTS_FILE.name} (no such run in the artifact folder): {'; '.join(kept)}")
        return 0
    if args.home is not None:  # --check compares the committed files; it reads no artifact folder
        raise ResultsError("--home applies to --write (the run to gather from); --check compares README.md with "
                           "docs/results.json only")
    try:
        stale = check_readme()
    except ArtifactError as err:
        raise ResultsError(str(err)) from None
    if stale:
        raise ResultsError(f"README sections {', '.join(stale)} disagree with {RESULTS_FILE.name}; run "
                           "`hmlib results --write` after `make run` and `make bench`")
    print("README agrees with docs/results.json")
    return 0


__all__ = ["RESULTS_FILE", "check_readme", "cluster_accuracy_note", "gather", "keep_missing", "render_readme"]
