"""Self-contained HTML reports: notebook export, headline tables and ``reports/index.html``.

Exported reports work offline: images are embedded, nothing is fetched from a CDN (no require.js,
MathJax, Mermaid or widget-manager scripts), inputs of cells tagged ``hide-input`` are hidden and
live widgets degrade to static HTML (their control values, their captured figures and text).
Notebooks publish headline tables with :func:`record_headline`; :func:`write_index` renders them
next to the list of reports and each notebook's wall time.
"""
from __future__ import annotations

import base64
import copy
import html
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat

from hmlib import paths
from hmlib.errors import HmlibError
from hmlib.artifacts import ArtifactError, atomic_path, read_json, write_json

HIDE_INPUT_TAG = "hide-input"
HIDE_OUTPUT_TAG = "hide-output"
REMOVE_CELL_TAG = "remove-cell"
RUN_LOG_NAME = "runs.json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The lab template with every block that loads a script from a CDN emptied (this machine is offline
# and the browser test requires a console without errors).
_OFFLINE_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block data_widget_view scoped -%}{%- endblock data_widget_view -%}
{%- block extra_css -%}
<style type="text/css">
.hmlib-widget { border-left: 3px solid #0173b2; padding: 4px 10px; margin: 4px 0; font-size: 13px; }
.hmlib-widget .hmlib-widget-note { color: #666; font-style: italic; }
.hmlib-widget table { border-collapse: collapse; margin: 4px 0; }
.hmlib-widget td { padding: 1px 10px 1px 0; }
.hmlib-widget img { max-width: 100%; }
</style>
{%- endblock extra_css -%}
"""


class ReportError(HmlibError, ValueError):
    """Bad input to a report function (headline key, rows, notebook)."""


# --------------------------------------------------------------------------------------------- export

def export_html(nb: nbformat.NotebookNode, path: str | Path, title: str | None = None) -> Path:
    """Write ``nb`` as one self-contained offline HTML file (atomic); return its path."""
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from jinja2 import DictLoader

    nb = copy.deepcopy(nb)
    _render_widgets_static(nb)
    nb.metadata.pop("widgets", None)
    nb.metadata["title"] = title or notebook_title(nb) or Path(path).stem
    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"hmlib_offline.html.j2": _OFFLINE_TEMPLATE})],
                            template_file="hmlib_offline.html.j2", embed_images=True, theme="light")
    tags = TagRemovePreprocessor(remove_input_tags={HIDE_INPUT_TAG}, remove_all_outputs_tags={HIDE_OUTPUT_TAG},
                                 remove_cell_tags={REMOVE_CELL_TAG}, enabled=True)
    exporter.register_preprocessor(tags, enabled=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(path).stem}})
    return write_text_file(path, body)


def write_text_file(path: str | Path, text: str) -> Path:
    """Write a report file atomically, readable by others (umask applies), unlike a bare temp file's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o666 & ~umask)
    return Path(path)


def notebook_title(nb: nbformat.NotebookNode) -> str | None:
    """Text of the notebook's first markdown heading, if any."""
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        for line in cell.source.splitlines():
            match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
            if match:
                return match.group(1).strip()
    return None


def _render_widgets_static(nb: nbformat.NotebookNode) -> None:
    """Replace every widget view output by static HTML built from the stored widget state (in place)."""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW not in data:
                outputs.append(output)
                continue
            static = _widget_html(data[WIDGET_VIEW].get("model_id", ""), state)
            if static:  # a view whose state was not stored (or holds nothing) is dropped
                outputs.append(nbformat.v4.new_output("display_data", data={"text/html": static}))
        cell.outputs = outputs


def _widget_html(model_id: str, state: Mapping[str, Any]) -> str:
    """Static HTML for one widget tree: control values, progress text, captured outputs."""
    controls: list[tuple[str, str]] = []
    texts: list[str] = []
    blocks: list[str] = []
    _walk_widget(model_id, state, controls, texts, blocks, seen=set())
    if not (controls or texts or blocks):
        return ""
    parts = ['<div class="hmlib-widget">']
    if controls:
        parts.append('<div class="hmlib-widget-note">Interactive controls (live in JupyterLab; values at export):</div>')
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>" for k, v in controls)
        parts.append(f"<table>{rows}</table>")
    if texts:
        parts.append(f"<div>{' '.join(texts)}</div>")
    parts.extend(blocks)
    parts.append("</div>")
    return "".join(parts)


def _walk_widget(model_id: str, state: Mapping[str, Any], controls: list, texts: list, blocks: list,
                 seen: set) -> None:
    if model_id in seen or model_id not in state:
        return
    seen.add(model_id)
    model = state[model_id]
    name = model.get("model_name", "")
    values = model.get("state", {})
    if _hidden(values, state):  # e.g. a finished tqdm bar with leave=False: JupyterLab no longer shows it
        return
    for child in values.get("children", []) or []:
        if isinstance(child, str) and child.startswith("IPY_MODEL_"):
            _walk_widget(child[len("IPY_MODEL_"):], state, controls, texts, blocks, seen)
    label = str(values.get("description") or "").strip()
    if name in ("HTMLModel", "HTMLMathModel", "LabelModel"):
        value = str(values.get("value") or "")
        if value.strip():
            texts.append(value if name != "LabelModel" else html.escape(value))
    elif name in ("FloatProgressModel", "IntProgressModel"):
        low, high, value = values.get("min", 0), values.get("max", 100), values.get("value", 0)
        share = 0.0 if high == low else (value - low) / (high - low)
        texts.append(f"<progress value='{share:.3f}' max='1'></progress>")
    elif name == "OutputModel":
        blocks.extend(_output_html(out) for out in values.get("outputs", []))
    elif name == "ImageModel":  # bytes travel as a base64 buffer beside the state
        image_format = re.sub(r"[^a-z0-9+.-]", "", str(values.get("format") or "png").lower())
        mime = "svg+xml" if image_format == "svg" else image_format
        blocks.extend(f'<img src="data:image/{mime};base64,{buffer["data"]}" alt="widget image"/>'
                      for buffer in model.get("buffers", [])
                      if buffer.get("path") == ["value"] and buffer.get("encoding") == "base64" and buffer.get("data"))
    elif "_options_labels" in values:  # Dropdown, RadioButtons, ToggleButtons, Select...
        options, index = values["_options_labels"], values.get("index")
        if isinstance(index, (list, tuple)):
            chosen = ", ".join(str(options[i]) for i in index if 0 <= i < len(options))
        else:
            chosen = str(options[index]) if isinstance(index, int) and 0 <= index < len(options) else "-"
        controls.append((label or name.replace("Model", ""), chosen))
    elif "value" in values and name not in ("ButtonModel",):
        controls.append((label or name.replace("Model", ""), _format_value(values["value"])))


def _hidden(values: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
    """Whether a widget is hidden by its layout (visibility hidden, display none) or ``visible=False``."""
    if values.get("visible") is False:
        return True
    layout_ref = values.get("layout")
    if isinstance(layout_ref, str) and layout_ref.startswith("IPY_MODEL_"):
        layout = state.get(layout_ref[len("IPY_MODEL_"):], {}).get("state", {})
        return layout.get("visibility") == "hidden" or layout.get("display") == "none"
    return False


def _format_value(value: Any) -> str:
    """Readable text of a widget value (numbers to 4 significant digits, ranges as 'a – b')."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " – ".join(_format_value(v) for v in value)
    return str(value)


def _output_html(output: Mapping[str, Any]) -> str:
    """Static HTML of one captured output (image, html, text, stream or error)."""
    data = output.get("data", {})
    if "image/png" in data:
        return f'<img src="data:image/png;base64,{"".join(data["image/png"]).strip()}" alt="figure"/>'
    if "image/svg+xml" in data:
        svg = "".join(data["image/svg+xml"]).encode()
        return f'<img src="data:image/svg+xml;base64,{base64.b64encode(svg).decode()}" alt="figure"/>'
    if "text/html" in data:
        return "".join(data["text/html"])
    if "text/plain" in data:
        return f"<pre>{html.escape(''.join(data['text/plain']))}</pre>"
    if output.get("output_type") == "stream":
        return f"<pre>{html.escape(''.join(output.get('text', '')))}</pre>"
    if output.get("output_type") == "error":
        return f"<pre>{html.escape(output.get('ename', ''))}: {html.escape(output.get('evalue', ''))}</pre>"
    return ""


# ------------------------------------------------------------------------------------------ headlines

def headlines_dir() -> Path:
    """Folder of headline tables (``results/headlines``)."""
    return paths.results_dir() / "headlines"


def record_headline(key: str, rows: list[dict], title: str, *, note: str | None = None) -> Path:
    """Write a headline table (flat dict rows) to ``results/headlines/<key>.json`` for index.html."""
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
               "recorded_at": utc_now()}
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
                    f"<td class='muted'>{html.escape(str(rec.get('profile', '')))} · "
                    f"{html.escape(str(rec.get('finished_at', '')))}</td></tr>")
    notebook_table = ("<table><thead><tr><th>notebook</th><th>title</th><th>status</th><th>wall time (s)</th>"
                      "<th>profile · finished (UTC)</th></tr></thead><tbody>" + "".join(rows) +
                      f"</tbody><tfoot><tr><td colspan='3'>total</td><td class='num'>{total:.1f}</td><td></td></tr>"
                      "</tfoot></table>") if rows else "<p class='muted'>No notebook has run yet.</p>"
    tables = "".join(_headline_html(t) for t in read_headlines()) or \
        "<p class='muted'>No headline numbers recorded yet (notebooks call hmlib.reports.record_headline).</p>"
    page = _INDEX_PAGE.format(generated=utc_now(), notebooks=notebook_table, headlines=tables)
    return write_text_file(paths.reports_dir() / "index.html", page)


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
    return (f"<h3>{title}</h3>{note}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
            f"<p class='muted small'>{html.escape(str(table.get('key')))} · recorded {recorded} UTC</p>")


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


def utc_now() -> str:
    """Current UTC time as 'YYYY-MM-DD HH:MM:SS'."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


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


__all__ = [
    "ReportError", "NotebookRecord", "export_html", "write_text_file", "notebook_title", "record_headline", "read_headlines",
    "headlines_dir", "read_run_log", "update_run_log", "write_index", "run_log_path", "utc_now",
]
