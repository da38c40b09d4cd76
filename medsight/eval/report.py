"""A self-contained HTML evaluation report (one file: images inlined, charts as inline SVG).

Sections: provenance (run id, variant, code version, the DVC hash of every input, from the
evaluation's ``lineage.json``), run summary, paper-shaped tables, per-modality tables, skipped entries, training
curves, and example cases (image, ground-truth overlay, predicted overlay with boxes, the
question, the answer with its region tokens highlighted in the colour of their masks).
Built from an evaluation folder (``results.json``, ``examples.json``, ``overlays/``), so it
can be rebuilt without the model.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from medsight.eval.protocols import LABELS, LLAVA_MED_SUFFIX, ordered
from medsight.data.region_tokens import highlight_spans
from medsight.eval.charts import training_charts
from medsight.eval.coverage import untrained_benchmarks
from medsight.eval.examples import EXAMPLES_FILE
from medsight.eval.results_io import read_results, summaries_from
from medsight.eval.tables import BENCHMARK_TITLES, Table, all_tables, ordered_benchmarks
from medsight.io_utils import atomic_write_text
from medsight.stages.lineage import read_lineage

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
.prov td,.prov th{text-align:left}
"""
# results.json run keys that are not worth a header cell (the provenance table says where from).
_HIDDEN_RUN_KEYS = {"model", "settings", "trained_formats"}


def _table_html(table: Table) -> str:
    header = ([table.first_column] if table.first_column else []) + table.columns
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table.rows)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    note = f'<div class="note">{html.escape(table.note)}</div>' if table.note else ""
    return f"<h3>{html.escape(table.title)}</h3><table><tr>{head}</tr>{rows}</table>{note}"


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


def _shown_source(source: str, eval_dir: Path) -> str:
    """A benchmark written into the evaluation folder is shown relative to it (the absolute path
    is the stage's temporary work folder); a release elsewhere keeps its own path."""
    try:
        return Path(source).relative_to(eval_dir.resolve()).as_posix()
    except ValueError:
        try:
            return Path(source).relative_to(eval_dir).as_posix()
        except ValueError:
            return source


def run_label(lineage: dict[str, Any]) -> str:
    """The table row's name: the variant and the run that produced the evaluation."""
    run = lineage.get("run", {})
    variant, run_id = run.get("variant") or "model", run.get("run_id") or ""
    return f"{variant} ({run_id})" if run_id else variant


def _provenance_html(lineage: dict[str, Any], run: dict[str, Any]) -> str:
    """Versions, not paths: run id, variant, git commit, MLflow run, and each input's DVC hash."""
    info = lineage.get("run", {})
    cells = [("pipeline run", info.get("run_id") or "-"), ("variant", info.get("variant") or "-"),
             ("git commit", info.get("git_commit") or "-"), ("MLflow run", info.get("mlflow_run_id") or "-")]
    # A local model path is shown only for a manual `medsight eval run` (no lineage to say more).
    hidden = _HIDDEN_RUN_KEYS if lineage else _HIDDEN_RUN_KEYS - {"model"}
    cells += [(str(k), str(v)) for k, v in sorted(run.items()) if k not in hidden]
    meta = " | ".join(f"{html.escape(k)}: <code>{html.escape(v)}</code>" for k, v in cells)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(entry.get('stage', ''))}</td>"
        f"<td><code>{html.escape(entry.get('md5', ''))}</code></td><td>{html.escape(entry.get('store_uri', ''))}</td></tr>"
        for name, entry in sorted(lineage.get("inputs", {}).items())
    )
    table = ("<table class='prov'><tr><th>input</th><th>stage</th><th>DVC md5</th><th>store</th></tr>" + rows + "</table>"
             "<div class='note'>Any input: <code>dvc pull STAGE</code> in a clone of the run repository "
             "(docs/deploy.md, section Pull a checkpoint), or <code>medsight platform pull --md5 MD5 --dest DIR</code>.</div>"
             if rows else "")
    return f"<div class='meta'>{meta}</div>{table}"


def build_report(eval_dir: Path, curves: Curves | None = None, title: str = "MedSIGHT evaluation", output: Path | None = None,
                 include_untrained: bool = False) -> Path:
    """Write ``report.html`` for an evaluation folder and return its path.

    ``include_untrained``: average in benchmarks whose question format the model was never
    trained on (marked either way; see ``coverage.py``).
    """
    from medsight.stages.registry import STAGES

    eval_dir = Path(eval_dir)
    document = read_results(eval_dir / "results.json")
    examples_path = eval_dir / EXAMPLES_FILE
    examples = json.loads(examples_path.read_text()) if examples_path.is_file() else []
    run = document.get("run", {})
    lineage = read_lineage(eval_dir)
    label = run_label(lineage)
    summaries = summaries_from(document)
    untrained = untrained_benchmarks(summaries, run.get("trained_formats"))
    heading = f"{title}: {label}"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(heading)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{html.escape(heading)}</h1>")
    parts.append(_provenance_html(lineage, run))
    parts.append("<h2>Benchmarks</h2><table><tr><th>Benchmark</th><th>evaluated</th><th>skipped</th><th>samples/s</th><th>source</th></tr>")
    benchmarks = document.get("benchmarks", {})
    for name in ordered_benchmarks(benchmarks):
        entry = benchmarks[name]
        marker = " \u2020" if name in untrained else ""
        parts.append(
            f"<tr><td>{html.escape(BENCHMARK_TITLES.get(name, name) + marker)}</td><td>{entry['n']}</td><td>{len(entry['skipped'])}</td>"
            f"<td>{entry['samples_per_second']:.2f}</td><td>{html.escape(_shown_source(entry['source'], eval_dir))}</td></tr>"
        )
    parts.append("</table>")
    if untrained:
        names = ", ".join(BENCHMARK_TITLES.get(n, n) for n in untrained)
        parts.append(f"<div class='note'>\u2020 {html.escape(names)}: multiple-choice questions, a format absent from the "
                     "model's instruction data; the score shows the format, not the model, and is "
                     f"{'included in' if include_untrained else 'left out of'} the averages.</div>")
    protocol = run.get("protocol", "strict")
    scoring = "".join(
        f"<li><b>{html.escape(name)}</b>{' (leads the tables)' if name == protocol else ''}: {html.escape(LABELS[name])}</li>"
        for name in ordered(protocol)
    )
    parts.append(
        f"<h2>Results</h2><div class='note'>Text answers are scored under two protocols, both shown and labelled:"
        f"<ul>{scoring}</ul>Per-benchmark tables list llava-med metrics with the suffix <code>{LLAVA_MED_SUFFIX}</code>.</div>"
    )
    tables = all_tables(summaries, label, untrained, include_untrained, protocol=protocol)
    parts.append("".join(_table_html(table) for table in tables))
    skipped = [(n, s) for n, e in document.get("benchmarks", {}).items() for s in e["skipped"]]
    if skipped:
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(s['id'])}</td><td>{html.escape(s['reason'])}</td></tr>" for n, s in skipped[:200])
        parts.append(f"<h2>Skipped entries ({len(skipped)})</h2><table><tr><th>Benchmark</th><th>id</th><th>reason</th></tr>{rows}</table>")
    if curves:
        charts = training_charts(curves, [spec.name for spec in STAGES])
        parts.append("<h2>Training curves</h2><div class='note'>Lines: training losses every logged step; "
                     f"circles: validation values at the step they were measured.</div><div class='charts'>{charts}</div>")
    if examples:
        parts.append("<h2>Example cases</h2><div class='cases'>" + "".join(_case_html(e, eval_dir) for e in examples) + "</div>")
    parts.append("</body></html>")
    target = Path(output) if output else eval_dir / "report.html"
    atomic_write_text(target, "".join(parts))
    return target
