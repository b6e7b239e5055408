"""``clusters.html``: a self-contained contact sheet of a clustering (inline CSS, base64 PNG thumbnails, no script).

One section per cluster: its size and share, its most and its least confident members (file names as tooltips).
Thumbnails are the 28x28 images the model saw (after preprocessing: ink bright on dark), enlarged with
nearest-neighbour so strokes stay crisp. A header shows the run's summary (checkpoint, K, steps, counts, skipped).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from hmlib.reports import utc_now, write_text_file

SPECIAL_KEYS = ("skipped", "ignored", "clusters", "files", "command")  # not in the header table (shown apart / noise)
MAX_LISTED = 200  # skipped / ignored files named in the page (all of them are in summary.json)

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { margin: 0 0 0.2em 0; font-size: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { padding: 3px 10px; border-bottom: 1px solid #e4e4e4; text-align: left; vertical-align: top; }
th { background: #f4f6f8; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; word-break: break-all; }
section.cluster { border-top: 2px solid #ddd; padding: 0.8em 0; }
.muted { color: #777; } .small { font-size: 12px; }
.row-label { font-size: 12px; color: #555; margin: 0.4em 0 0.1em 0; }
.thumbs { display: flex; flex-wrap: wrap; gap: 4px; }
.thumbs img { image-rendering: pixelated; background: #000; border: 1px solid #ccc; }
details { margin: 0.4em 0; } li { font-size: 12px; }
"""


def thumbnail_uri(image: np.ndarray, size: int = 56) -> str:
    """A ``data:image/png;base64,`` URI of one uint8 (h, w) image enlarged to ``size`` px with nearest-neighbour."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def member_rows(confidence: np.ndarray, members: np.ndarray, per_cluster: int) -> list[tuple[str, np.ndarray]]:
    """``[(label, indices)]`` to show for one cluster: all of it if small, else its most and least confident."""
    order = members[np.argsort(-confidence[members], kind="stable")]  # most confident first; ties by input order
    if len(order) == 0:
        return []
    if len(order) <= 2 * per_cluster:
        return [(f"all {len(order)} members, most confident first", order)]
    return [(f"the {per_cluster} most confident", order[:per_cluster]),
            (f"the {per_cluster} least confident, least confident first", order[::-1][:per_cluster])]


def _value_html(value: Any) -> str:
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(str(v) for v in value))
    return f"<code>{html.escape(str(value))}</code>" if isinstance(value, str) and len(value) > 40 else \
        html.escape(str(value))


def _flatten(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in summary.items():
        if not prefix and key in SPECIAL_KEYS:
            continue
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{prefix}{key}."))
        elif value is not None:  # unset settings (no split, no hub id) would only be noise
            rows.append((f"{prefix}{key}", value))
    return rows


def _file_list(title: str, entries: Sequence[str]) -> str:
    if not entries:
        return ""
    items = "".join(f"<li>{html.escape(e)}</li>" for e in entries[:MAX_LISTED])
    more = f"<li class='muted'>... and {len(entries) - MAX_LISTED} more (see summary.json)</li>" \
        if len(entries) > MAX_LISTED else ""
    return f"<details><summary>{html.escape(title)} ({len(entries)})</summary><ul>{items}{more}</ul></details>"


def _header_html(summary: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_value_html(v)}</td></tr>" for k, v in _flatten(summary))
    skipped = [f"{s['file']}: {s['reason']}" if isinstance(s, Mapping) else str(s) for s in summary.get("skipped", [])]
    ignored = [str(name) for name in summary.get("ignored", [])]
    return (f"<table>{rows}</table>" + _file_list("Skipped (unreadable images)", skipped)
            + _file_list("Ignored (not image files)", ignored))


def _section_html(cluster: int, members: np.ndarray, images: np.ndarray, confidence: np.ndarray,
                  names: Sequence[str], total: int, per_cluster: int, thumb_px: int) -> str:
    share = len(members) / total if total else 0.0
    stats = f"{len(members)} images ({share:.1%})"
    if len(members):
        stats += f", confidence mean {confidence[members].mean():.2f}, min {confidence[members].min():.2f}"
    parts = [f"<section class='cluster' id='cluster-{cluster}'><h2>Cluster {cluster}</h2>",
             f"<p class='small'>{stats}</p>"]
    rows = member_rows(confidence, members, per_cluster)
    if not rows:
        parts.append("<p class='muted'>No image was assigned to this cluster.</p>")
    for label, indices in rows:
        thumbs = "".join(
            f"<img src='{thumbnail_uri(images[i], thumb_px)}' width='{thumb_px}' height='{thumb_px}' "
            f"alt='{html.escape(names[i], quote=True)}' "
            f"title='{html.escape(f'{names[i]} (confidence {confidence[i]:.3f})', quote=True)}'/>" for i in indices)
        parts.append(f"<div class='row-label'>{html.escape(label)}</div><div class='thumbs'>{thumbs}</div>")
    parts.append("</section>")
    return "".join(parts)


def write_contact_sheet(path: str | Path, images: np.ndarray, assignments: np.ndarray, confidence: np.ndarray, *,
                        title: str, summary: Mapping[str, Any], per_cluster: int = 12,
                        names: Sequence[str] | None = None, n_clusters: int | None = None,
                        thumb_px: int = 56) -> Path:
    """Write the self-contained HTML contact sheet of a clustering (atomically); return its path."""
    images = np.asarray(images)
    assignments = np.asarray(assignments, dtype=np.int64)
    confidence = np.asarray(confidence, dtype=np.float64)
    count = images.shape[0]
    if images.ndim != 3 or assignments.shape != (count,) or confidence.shape != (count,):
        raise ValueError(f"images (n, h, w), assignments (n,) and confidence (n,) must agree; got {images.shape}, "
                         f"{assignments.shape}, {confidence.shape}")
    names = [str(i) for i in range(count)] if names is None else [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"{len(names)} names for {count} images")
    if per_cluster < 1:
        raise ValueError(f"per_cluster must be at least 1, got {per_cluster}")
    k = int(n_clusters if n_clusters is not None else (assignments.max() + 1 if count else 0))
    if count and (assignments.min() < 0 or assignments.max() >= k):
        raise ValueError(f"assignments must lie in 0..{k - 1}; got {assignments.min()}..{assignments.max()}")
    sizes = np.bincount(assignments, minlength=k)
    overview = "".join(f"<tr><td><a href='#cluster-{c}'>cluster {c}</a></td><td class='num'>{sizes[c]}</td>"
                       f"<td class='num'>{sizes[c] / max(count, 1):.1%}</td></tr>" for c in range(k))
    sections = "".join(_section_html(c, np.flatnonzero(assignments == c), images, confidence, names, count,
                                     per_cluster, thumb_px) for c in range(k))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1.0"/>
<link rel="icon" href="data:,"/>
<title>{html.escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted small">Written {utc_now()} UTC by <code>hmlib cluster</code>. Thumbnails are the
{images.shape[1]}&times;{images.shape[2]} images the model saw (after preprocessing: ink bright on dark); hover one
for its file name and confidence.</p>
{_header_html(summary)}
<h2>Cluster sizes</h2>
<table><tr><th>cluster</th><th>images</th><th>share</th></tr>{overview}</table>
{sections}
</body></html>
"""
    return write_text_file(path, page)
