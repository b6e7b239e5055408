"""Notebook -> self-contained HTML.

Exported reports work offline: images are embedded, nothing is fetched from a CDN (no require.js,
MathJax, Mermaid or widget-manager scripts), inputs of cells tagged ``hide-input`` are hidden and
live widgets degrade to static HTML (their control values, their captured figures and text).
"""
from __future__ import annotations

import base64
import copy
import html
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from hmlib.errors import HmlibError
from hmlib.artifacts import atomic_path

if TYPE_CHECKING:  # imported where used: nbformat (via jsonschema) costs 1.7 s, and a kernel that only records
    import nbformat  # a headline never exports

HIDE_INPUT_TAG = "hide-input"
HIDE_OUTPUT_TAG = "hide-output"
REMOVE_CELL_TAG = "remove-cell"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

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
    from nbformat.v4 import new_output

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
                outputs.append(new_output("display_data", data={"text/html": static}))
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


def utc_now() -> str:
    """Current UTC time as 'YYYY-MM-DD HH:MM:SS'."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
