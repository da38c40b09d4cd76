"""A self-contained HTML evaluation report (one file: images inlined, charts as inline SVG).

Sections: run summary, paper-shaped tables, per-modality tables, skipped entries, training
curves, and example cases (image, ground-truth overlay, predicted overlay with boxes, the
question, the answer with its region tokens highlighted in the colour of their masks).
Built from an evaluation folder (``results.json``, ``examples.json``, ``overlays/``), so it
can be rebuilt without the model.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from medsight.eval.examples import EXAMPLES_FILE
from medsight.eval.protocols import LABELS, LLAVA_MED_SUFFIX, ordered
from medsight.data.region_tokens import highlight_spans
from medsight.eval.results_io import read_results, summaries_from
from medsight.eval.tables import BENCHMARK_TITLES, Table, all_tables, ordered_benchmarks
from medsight.io_utils import atomic_write_text

Curves = dict[str, list[tuple[float, float]]]  # series name -> (step, value) points

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 4px;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right} th:first-child,td:first-child{text-align:left}
th{background:#f2f2f2} .note{color:#666;font-size:12px;margin-bottom:14px}
.cases{display:flex;flex-wrap:wrap;gap:14px} .case{border:1px solid #ddd;border-radius:6px;padding:8px;width:640px}
.case img{width:200px;height:200px;object-fit:contain;image-rendering:pixelated;background:#000;margin-right:4px}
.tok{font-weight:700;padding:0 3px;border-radius:3px;color:#000} .meta{color:#555;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:12px} .chart{border:1px solid #ddd;padding:4px}
.qa{font-size:13px;margin:4px 0} code{background:#f5f5f5;padding:0 3px}
"""


def _table_html(table: Table) -> str:
    header = ([table.first_column] if table.first_column else []) + table.columns
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table.rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    note = f'<div class="note">{html.escape(table.note)}</div>' if table.note else ""
    return f"<h3>{html.escape(table.title)}</h3><table><tr>{head}</tr>{rows}</table>{note}"


def _svg_chart(name: str, points: list[tuple[float, float]], width: int = 320, height: int = 180) -> str:
    """A line chart as inline SVG (no plotting library, no external file)."""
    points = [(float(x), float(y)) for x, y in points if math.isfinite(float(y))]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    left, bottom, top, right = 48, 22, 20, 8
    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)
    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
    path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f'<svg class="chart" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f'<text x="{left}" y="13" font-size="12">{html.escape(name)}</text>'
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#999"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#999"/>'
        f'<text x="2" y="{top + 8}" font-size="10">{y1:.3g}</text><text x="2" y="{height - bottom}" font-size="10">{y0:.3g}</text>'
        f'<text x="{left}" y="{height - 6}" font-size="10">{x0:g}</text>'
        f'<text x="{width - right}" y="{height - 6}" font-size="10" text-anchor="end">step {x1:g}</text>'
        f'<polyline fill="none" stroke="#0072b2" stroke-width="1.5" points="{path}"/></svg>'
    )


def _image_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def highlighted_answer(text: str, tokens: list[str], colors: list[str]) -> str:
    """Answer HTML with each region token shown in the colour of its mask overlay."""
    queue = list(zip(tokens, colors))
    parts = []
    for piece, is_token in highlight_spans(text):
        if not is_token:
            parts.append(html.escape(piece))
            continue
        color = "#bbbbbb"  # a token with no mask (not in the vocabulary) stays grey
        if queue and queue[0][0] == piece:
            color = queue.pop(0)[1]
        parts.append(f'<span class="tok" style="background:{color}">{html.escape(piece)}</span>')
    return "".join(parts)


def _case_html(example: dict[str, Any], folder: Path) -> str:
    # Text-only questions have no ground-truth masks: show the image, plus the prediction if the
    # model still generated region tokens (a sign of it over-grounding).
    if example["task"] in ("diagseg", "grounding", "box"):
        kinds = ("image", "gt", "pred")
    else:
        kinds = ("image", "pred") if example["region_tokens"] else ("image",)
    images = "".join(
        f'<img alt="{kind}" title="{kind}" src="{_image_uri(folder / example["files"][kind])}">'
        for kind in kinds if kind in example["files"]
    )
    scores = ", ".join(f"{k}={v:.3f}" for k, v in sorted(example["scores"].items()))
    legend = " | ".join({"image": "image", "gt": "ground truth (green)", "pred": "prediction (one colour per region token)"}[k] for k in kinds)
    answer = highlighted_answer(example["prediction"], example["region_tokens"], example["token_colors"])
    boxes = ""
    if example["pred_boxes"] or example["gt_boxes"]:
        def fmt(boxes: list) -> str:
            shown = "; ".join("(" + ", ".join(f"{v:.2f}" for v in b) + ")" for b in boxes[:4]) or "none"
            return shown + (f" ... ({len(boxes) - 4} more)" if len(boxes) > 4 else "")

        boxes = f'<div class="meta">boxes (x1, y1, x2, y2, normalised) - GT: {fmt(example["gt_boxes"])} | predicted: {fmt(example["pred_boxes"])}</div>'
    return (
        f'<div class="case"><div class="meta">{html.escape(example["benchmark"])} / {html.escape(example["id"])} '
        f'- {html.escape(example["modality"])} - {html.escape(example["task"])}</div>'
        f'<div>{images}</div><div class="meta">{legend}</div>'
        f'<div class="qa"><b>Q:</b> {html.escape(example["question"]).replace(chr(10), "<br>")}</div>'
        f'<div class="qa"><b>A:</b> {answer or "<i>(empty answer)</i>"}</div>'
        f'<div class="qa"><b>GT:</b> {html.escape(example["ground_truth"]) or "<i>(boxes only)</i>"}</div>'
        f'{boxes}<div class="meta">{html.escape(scores)}</div></div>'
    )


def build_report(eval_dir: Path, curves: Curves | None = None, title: str = "MedSIGHT evaluation", output: Path | None = None) -> Path:
    """Write ``report.html`` for an evaluation folder and return its path."""
    eval_dir = Path(eval_dir)
    document = read_results(eval_dir / "results.json")
    examples_path = eval_dir / EXAMPLES_FILE
    examples = json.loads(examples_path.read_text()) if examples_path.is_file() else []
    run = document.get("run", {})
    summaries = summaries_from(document)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{html.escape(title)}</h1>")
    parts.append("<div class='meta'>" + " | ".join(f"{html.escape(str(k))}: <code>{html.escape(str(v))}</code>" for k, v in sorted(run.items())) + "</div>")
    parts.append("<h2>Benchmarks</h2><table><tr><th>Benchmark</th><th>evaluated</th><th>skipped</th><th>samples/s</th><th>source</th></tr>")
    benchmarks = document.get("benchmarks", {})
    for name in ordered_benchmarks(benchmarks):
        entry = benchmarks[name]
        parts.append(
            f"<tr><td>{html.escape(BENCHMARK_TITLES.get(name, name))}</td><td>{entry['n']}</td><td>{len(entry['skipped'])}</td>"
            f"<td>{entry['samples_per_second']:.2f}</td><td>{html.escape(entry['source'])}</td></tr>"
        )
    parts.append("</table>")
    protocol = run.get("protocol", "strict")
    scoring = "".join(
        f"<li><b>{html.escape(name)}</b>{' (leads the tables)' if name == protocol else ''}: {html.escape(LABELS[name])}</li>"
        for name in ordered(protocol)
    )
    parts.append(
        f"<h2>Results</h2><div class='note'>Text answers are scored under two protocols, both shown and labelled:"
        f"<ul>{scoring}</ul>Per-benchmark tables list llava-med metrics with the suffix <code>{LLAVA_MED_SUFFIX}</code>.</div>"
    )
    parts.append("".join(_table_html(table) for table in all_tables(summaries, protocol=protocol)))
    skipped = [(n, s) for n, e in document.get("benchmarks", {}).items() for s in e["skipped"]]
    if skipped:
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(s['id'])}</td><td>{html.escape(s['reason'])}</td></tr>" for n, s in skipped[:200])
        parts.append(f"<h2>Skipped entries ({len(skipped)})</h2><table><tr><th>Benchmark</th><th>id</th><th>reason</th></tr>{rows}</table>")
    if curves:
        charts = "".join(_svg_chart(name, points) for name, points in sorted(curves.items()))
        parts.append(f"<h2>Training curves</h2><div class='charts'>{charts}</div>")
    if examples:
        parts.append("<h2>Example cases</h2><div class='cases'>" + "".join(_case_html(e, eval_dir) for e in examples) + "</div>")
    parts.append("</body></html>")
    target = Path(output) if output else eval_dir / "report.html"
    atomic_write_text(target, "".join(parts))
    return target
