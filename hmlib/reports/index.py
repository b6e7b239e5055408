"""Headline tables (``results/headlines``), the run log (``reports/runs.json``) and ``reports/index.html``.

Notebooks publish headline tables with :func:`record_headline`; :func:`write_index` renders them next to
the list of reports and each notebook's wall time.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hmlib import paths
from hmlib.artifacts import ArtifactError, read_json, write_json
from hmlib.reports.export import ReportError, utc_now, write_text_file

RUN_LOG_NAME = "runs.json"
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ------------------------------------------------------------------------------------------ headlines

def headlines_dir() -> Path:
    """Folder of headline tables (``results/headlines``)."""
    return paths.results_dir() / "headlines"


def record_headline(key: str, rows: list[dict], title: str, *, note: str | None = None,
                    figures: Sequence[Any] = ()) -> Path:
    """Write a headline table (flat dict rows), and any matplotlib figures (as PNG), to
    ``results/headlines/<key>.json`` for index.html."""
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise ReportError(f"headline key {key!r} must be letters, digits, '_', '-' or '.' (it names a file)")
    if not isinstance(title, str) or not title.strip():
        raise ReportError(f"headline '{key}': title must be a non-empty string")
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ReportError(f"headline '{key}': rows must be a non-empty list of dicts")
    clean_rows = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ReportError(f"headline '{key}': row {i} is {type(row).__name__}, expected a dict")
        clean_rows.append({str(k): _scalar(v, f"headline '{key}' row {i} column '{k}'") for k, v in row.items()})
    columns = list(dict.fromkeys(k for row in clean_rows for k in row))
    payload = {"key": key, "title": title.strip(), "columns": columns, "rows": clean_rows, "note": note,
               "recorded_at": utc_now(), "figures": [_png_data_uri(f) for f in figures]}
    return write_json(headlines_dir() / f"{key}.json", payload)


def read_headlines() -> list[dict]:
    """Every readable headline table, sorted by key (corrupt files are reported as such, not skipped)."""
    tables = []
    for path in sorted(headlines_dir().glob("*.json")):
        try:
            data = read_json(path)
            if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
                raise ArtifactError(f"{path} is not a headline table (no rows)")
            tables.append(data)
        except ArtifactError as err:
            tables.append({"key": path.stem, "title": path.stem, "rows": [], "columns": [], "error": str(err)})
    return tables


def _scalar(value: Any, where: str) -> Any:
    """A JSON scalar for a table cell (numpy scalars unwrapped, non-finite floats to None)."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, TypeError) as err:
            raise ReportError(f"{where}: expected a scalar, got an array") from err
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ReportError(f"{where}: expected str, int, float, bool or None, got {type(value).__name__} "
                      "(headline rows must be flat)")


# ------------------------------------------------------------------------------------- run log, index

@dataclass
class NotebookRecord:
    """One notebook's latest run, as the index shows it."""

    name: str  # file stem, e.g. "01_data"
    title: str
    status: str  # "ok" or "failed"
    wall_s: float
    profile: str
    finished_at: str
    html: str | None  # file name inside reports/, or None if export failed
    error: str | None = None
    settings: str | None = None  # fingerprint of what the run computed with (config.settings_of); None: not recorded


def run_log_path() -> Path:
    return paths.reports_dir() / RUN_LOG_NAME


def read_run_log() -> dict[str, dict]:
    """Latest record per notebook (empty when no run happened or the log is unreadable)."""
    path = run_log_path()
    if not path.is_file():
        return {}
    try:
        data = read_json(path)
    except ArtifactError:
        return {}
    return data.get("notebooks", {}) if isinstance(data, dict) else {}


def update_run_log(records: Iterable[NotebookRecord]) -> Path:
    """Merge notebook records into ``reports/runs.json`` (atomic)."""
    log = read_run_log()
    for record in records:
        log[record.name] = asdict(record)
    text = json.dumps({"notebooks": dict(sorted(log.items()))}, indent=2, sort_keys=True)
    return write_text_file(run_log_path(), text)


def write_index(notebook_names: Iterable[str] | None = None) -> Path:
    """Render ``reports/index.html``: every report with status and wall time, then the headline tables."""
    log = read_run_log()
    names = sorted(set(log) | set(notebook_names or []))
    rows = []
    total = 0.0
    for name in names:
        rec = log.get(name)
        if rec is None:
            rows.append(f"<tr><td>{html.escape(name)}</td><td></td><td class='muted'>not run</td><td></td><td></td></tr>")
            continue
        total += float(rec.get("wall_s") or 0.0)
        link = (f"<a href='{html.escape(rec['html'])}'>{html.escape(name)}</a>"
                if rec.get("html") and (paths.reports_dir() / rec["html"]).is_file() else html.escape(name))
        status_class = "ok" if rec.get("status") == "ok" else "failed"
        status = html.escape(str(rec.get("status")))
        if rec.get("error"):
            status += f"<div class='err'>{html.escape(str(rec['error']))}</div>"
        rows.append(f"<tr><td>{link}</td><td>{html.escape(str(rec.get('title') or ''))}</td>"
                    f"<td class='{status_class}'>{status}</td><td class='num'>{float(rec.get('wall_s') or 0):.1f}</td>"
                    f"<td class='muted'>{html.escape(_run_label(rec))} · "
                    f"{html.escape(str(rec.get('finished_at', '')))}</td></tr>")
    mixed = _mixed_settings(log, names)
    notebook_table = mixed + ("<table><thead><tr><th>notebook</th><th>title</th><th>status</th><th>wall time (s)</th>"
                      "<th>profile · settings · finished (UTC)</th></tr></thead><tbody>" + "".join(rows) +
                      f"</tbody><tfoot><tr><td colspan='3'>total</td><td class='num'>{total:.1f}</td><td></td></tr>"
                      "</tfoot></table>") if rows else "<p class='muted'>No notebook has run yet.</p>"
    tables = "".join(_headline_html(t) for t in read_headlines()) or \
        "<p class='muted'>No headline numbers recorded yet (notebooks call hmlib.reports.record_headline).</p>"
    page = _INDEX_PAGE.format(generated=utc_now(), notebooks=notebook_table, headlines=tables)
    return write_text_file(paths.reports_dir() / "index.html", page)


def _run_label(record: Mapping[str, Any]) -> str:
    """``profile · settings`` of a run record (settings: a short fingerprint, or "?" where the record has none)."""
    return f"{record.get('profile', '')} · {str(record.get('settings') or '?')[:8]}"


def _mixed_settings(log: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """A warning where the notebooks' latest runs used different settings (their reports and headline numbers are
    then not one run's); empty otherwise."""
    records = {name: log[name] for name in names if name in log}
    profiles = {str(r.get("profile", "")) for r in records.values()}
    fingerprints = {r["settings"] for r in records.values() if r.get("settings")}  # older records have none
    if len(profiles) < 2 and len(fingerprints) < 2:
        return ""
    runs = {name: _run_label(record) for name, record in records.items()}
    listed = "; ".join(f"{name}: {label}" for name, label in runs.items())
    return ("<p class='failed'>These reports come from runs with different settings (" + html.escape(listed) +
            "), so their numbers are not one run's. Run the series again with one profile and config "
            "(<code>hmlib run</code>) to make them agree.</p>")


def _headline_html(table: Mapping[str, Any]) -> str:
    title = html.escape(str(table.get("title") or table.get("key")))
    if table.get("error"):
        return f"<h3>{title}</h3><p class='failed'>{html.escape(table['error'])}</p>"
    columns = table.get("columns") or list(dict.fromkeys(k for row in table["rows"] for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    decimals = {c: _column_decimals([row.get(c) for row in table["rows"]]) for c in columns}
    body = "".join("<tr>" + "".join(_cell_html(row.get(c), decimals[c]) for c in columns) + "</tr>"
                   for row in table["rows"])
    note = f"<p class='muted'>{html.escape(str(table['note']))}</p>" if table.get("note") else ""
    recorded = html.escape(str(table.get("recorded_at", "")))
    images = "".join(f"<p><img alt='{title}' style='max-width: 100%' src='{html.escape(uri)}'></p>"
                     for uri in table.get("figures") or [] if str(uri).startswith("data:image/png;base64,"))
    return (f"<h3>{title}</h3>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{images}"
            f"<p class='muted small'>{html.escape(str(table.get('key')))} · recorded {recorded} UTC</p>")


def _png_data_uri(figure: Any) -> str:
    """A matplotlib figure as an inline PNG (data URI), so index.html stays one self-contained file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _column_decimals(values: list[Any]) -> int | None:
    """Decimals that show every float of a column to 4 significant digits alike (None: use 4 significant digits)."""
    decimals = 0
    for value in values:
        if isinstance(value, float) and not isinstance(value, bool):
            text = f"{value:.4g}"
            if "e" in text:
                return None
            decimals = max(decimals, len(text.partition(".")[2]))
    return decimals


def _cell_html(value: Any, decimals: int | None = None) -> str:
    if value is None:
        return "<td class='muted'>–</td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, float):
        text = f"{value:.4g}" if decimals is None else f"{value:.{decimals}f}"
        return f"<td class='num'>{text}</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value}</td>"
    return f"<td>{html.escape(str(value))}</td>"


_INDEX_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1.0"/>
<title>hmlib reports</title>
<style>
body {{ font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 2em auto;
       max-width: 1000px; padding: 0 1em; color: #222; line-height: 1.45; }}
h1 {{ margin-bottom: 0.1em; }} h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.6em 0; font-size: 14px; }}
th, td {{ padding: 4px 10px; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }}
th {{ background: #f4f6f8; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tfoot td {{ font-weight: bold; border-top: 2px solid #ccc; }}
.ok {{ color: #027a48; font-weight: bold; }} .failed {{ color: #b42318; font-weight: bold; }}
.err {{ font-weight: normal; font-family: monospace; font-size: 12px; white-space: pre-wrap; max-width: 420px; }}
.muted {{ color: #777; }} .small {{ font-size: 12px; }}
a {{ color: #0173b2; }}
</style></head>
<body>
<h1>hmlib reports</h1>
<p class="muted">Generated {generated} UTC by <code>hmlib run</code>. Each report is a self-contained HTML export
of an executed notebook.</p>
<h2>Notebooks</h2>
{notebooks}
<h2>Headline numbers</h2>
{headlines}
</body></html>
"""
