"""``medsight data check DIR``: a data-quality report for a prepared dataset (JSON + HTML page).

Reads what ``medsight data prepare`` wrote (the BiomedParse index line by line, the PubMedVision
sets, the prepare reports) and gives counts per split and modality, per-modality class balance,
mask-area and masks-per-image histograms (areas as the index gives them; masks without one are
measured on a seeded sample of ``area_sample``), and the list of bad and skipped files.
``ok`` is false when a release's bad share (bad entries / entries seen, plus files gone missing
since prepare when ``verify_files``) is over ``max_bad_fraction``: the pipeline's first step
stops there. Memory holds counters only, whatever the dataset's size.
"""

from __future__ import annotations

import heapq
import html
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from medsight.data.prepare.report import REPORTS_DIR
from medsight.data.prepare.sampling import stable_rank
from medsight.data.prepared_index import INDEX_DIR, SPLITS, index_path, iter_index
from medsight.io_utils import atomic_write_json, atomic_write_text

QUALITY_JSON = "quality.json"
QUALITY_HTML = "quality.html"
# Mask area as a fraction of the image, in log10 bins: lesions of a few pixels to whole organs.
AREA_EDGES = tuple(10.0 ** e for e in (-5, -4, -3, -2.5, -2, -1.5, -1, -0.5, 0))
RELEASES = ("biomedparse", "pubmedvision")


def _area_bin(area: float) -> int:
    for index, edge in enumerate(AREA_EDGES[1:]):
        if area <= edge:
            return index
    return len(AREA_EDGES) - 2


def _bin_label(index: int) -> str:
    return f"≤{AREA_EDGES[index + 1]:.0e}"


def _measure(root: Path, masks: list[tuple[str, str]]) -> dict[str, list[int]]:
    """Area histograms of masks whose area the index does not give (decoded here)."""
    from PIL import Image

    from medsight.data.prepare.verify import _mask_area

    areas: dict[str, list[int]] = defaultdict(lambda: [0] * (len(AREA_EDGES) - 1))
    for modality, path in masks:
        try:
            with Image.open(root / path) as mask:
                area = _mask_area(mask)
        except (OSError, ValueError):
            continue  # a file gone bad since prepare: verify_files reports those
        if area is not None:
            areas[modality][_area_bin(area)] += 1
    return areas


def _biomedparse(root: Path, verify_files: bool, area_sample: int) -> dict[str, Any]:
    per_split: Counter = Counter()
    per_modality: dict[str, Counter] = defaultdict(Counter)  # split -> modality -> images
    classes: dict[str, Counter] = defaultdict(Counter)  # modality -> class -> regions
    areas: dict[str, list[int]] = defaultdict(lambda: [0] * (len(AREA_EDGES) - 1))
    masks_per_image: Counter = Counter()
    missing: list[str] = []
    unmeasured: list[tuple[int, str, str]] = []  # max-heap (negated rank) of masks without an area
    for split in SPLITS:
        if not index_path(root, split).is_file():
            continue
        for _, entry in iter_index(root, split):
            per_split[split] += 1
            per_modality[split][entry["modality"]] += 1
            masks_per_image[len(entry["regions"])] += 1
            paths = [entry["image"]]
            for region in entry["regions"]:
                classes[entry["modality"]][region["class"]] += 1
                if region.get("area") is not None:
                    areas[entry["modality"]][_area_bin(region["area"])] += 1
                elif area_sample > 0:  # a seeded uniform sample of the rest is measured below
                    rank = stable_rank(0, "area", region["mask"])
                    if len(unmeasured) < area_sample:
                        heapq.heappush(unmeasured, (-rank, entry["modality"], region["mask"]))
                    elif rank < -unmeasured[0][0]:
                        heapq.heapreplace(unmeasured, (-rank, entry["modality"], region["mask"]))
                paths.append(region["mask"])
            if verify_files:
                missing += [p for p in paths if not (root / p).is_file()]
    for modality, counts in _measure(root, [(m, p) for _, m, p in unmeasured]).items():
        areas[modality] = [a + b for a, b in zip(areas[modality], counts)]
    return {"images": dict(per_split), "per_modality": {s: dict(c) for s, c in per_modality.items()},
            "areas_measured_on_sample": len(unmeasured),
            "class_balance": {m: dict(sorted(c.items())) for m, c in sorted(classes.items())},
            "mask_area_histogram": {"bins": [_bin_label(i) for i in range(len(AREA_EDGES) - 1)],
                                    "per_modality": dict(sorted(areas.items()))},
            "masks_per_image": dict(sorted(masks_per_image.items())), "missing_now": missing}


def _pubmedvision(root: Path) -> dict[str, Any]:
    counts, multi = {}, 0
    for path in sorted((root / "pubmedvision").glob("*.jsonl")):
        rows = 0
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                rows += 1
                multi += len(json.loads(line).get("image", [])) > 1
        counts[path.stem] = rows
    return {"rows": counts, "multi_image_rows": multi}


def check_dataset(root: Path, max_bad_fraction: float = 0.01, verify_files: bool = False,
                  out: Path | None = None, area_sample: int = 2000) -> dict[str, Any]:
    """The quality report of a prepared dataset, also written to ``out/quality.{json,html}``
    (default ``ROOT/reports``; a pipeline passes its own output folder and keeps ROOT read-only)."""
    root = Path(root)
    out = Path(out) if out is not None else root / REPORTS_DIR
    if not (root / INDEX_DIR).is_dir() and not (root / "pubmedvision").is_dir():
        raise FileNotFoundError(f"{root}: not a prepared dataset (no biomedparse/ or pubmedvision/); run `medsight data prepare`")
    releases: dict[str, Any] = {}
    for release in RELEASES:
        path = root / REPORTS_DIR / f"{release}.json"
        if path.is_file():
            releases[release] = json.loads(path.read_text())
    report: dict[str, Any] = {"root": str(root), "max_bad_fraction": max_bad_fraction, "releases": {}}
    if (root / INDEX_DIR).is_dir():
        report["biomedparse"] = _biomedparse(root, verify_files, area_sample)
    if (root / "pubmedvision").is_dir():
        report["pubmedvision"] = _pubmedvision(root)
    ok = True
    for release, prepared in releases.items():
        missing = len(report.get(release, {}).get("missing_now", []))
        seen, bad = prepared.get("seen", 0), prepared.get("bad", 0) + missing
        fraction = bad / seen if seen else 0.0
        ok &= fraction <= max_bad_fraction
        report["releases"][release] = {
            "seen": seen, "bad": bad, "bad_fraction": fraction, "missing_since_prepare": missing,
            "skipped": sum(prepared.get("skipped_by_kind", {}).values()),
            "problems_by_kind": prepared.get("problems_by_kind", {}), "skipped_by_kind": prepared.get("skipped_by_kind", {}),
            "problems": prepared.get("problems", []), "skipped_files": prepared.get("skipped_files", []),
            "all_problems": f"{REPORTS_DIR}/{release}.problems.jsonl", "prepare_status": prepared.get("status", "?"),
        }
    report["ok"] = bool(ok)
    atomic_write_json(out / QUALITY_JSON, report)
    atomic_write_text(out / QUALITY_HTML, render_html(report))
    return report


# ---------------------------------------------------------------------------- HTML


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _bars(title: str, labels: list[str], values: list[int], width: int = 360, height: int = 150) -> str:
    """An inline SVG bar chart (one file, no plotting library needed to view it)."""
    peak = max(values) if values and max(values) > 0 else 1
    step = width / max(1, len(values))
    bars = "".join(
        f'<rect x="{i * step + 2:.1f}" y="{height - 20 - (v / peak) * (height - 40):.1f}" width="{step - 4:.1f}" '
        f'height="{(v / peak) * (height - 40):.1f}" fill="#0072b2"><title>{html.escape(l)}: {v}</title></rect>'
        f'<text x="{i * step + step / 2:.1f}" y="{height - 6}" font-size="9" text-anchor="middle">{html.escape(l)}</text>'
        for i, (l, v) in enumerate(zip(labels, values))
    )
    return (f'<svg class="chart" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
            f'<text x="4" y="12" font-size="11">{html.escape(title)} (max {peak})</text>{bars}</svg>')


def render_html(report: dict[str, Any]) -> str:
    parts = [f"<h1>Data quality: {html.escape(report['root'])}</h1>",
             f"<p class='{'ok' if report['ok'] else 'bad'}'>{'OK' if report['ok'] else 'OVER THE LIMIT'}: "
             f"max bad fraction {report['max_bad_fraction']:.2%}</p>"]
    rows = [[name, r["seen"], r["bad"], f"{r['bad_fraction']:.3%}", r["skipped"],
             ", ".join(f"{k}: {v}" for k, v in r["problems_by_kind"].items()) or "-"] for name, r in report["releases"].items()]
    parts.append("<h2>Releases</h2>" + _table(["release", "seen", "bad", "bad fraction", "skipped", "problems"], rows))
    bmp = report.get("biomedparse")
    if bmp:
        modalities = sorted({m for counts in bmp["per_modality"].values() for m in counts})
        parts.append("<h2>Images per split and modality</h2>" + _table(
            ["modality", *SPLITS], [[m, *(bmp["per_modality"].get(s, {}).get(m, 0) for s in SPLITS)] for m in modalities]
            + [["total", *(bmp["images"].get(s, 0) for s in SPLITS)]]))
        parts.append("<h2>Class balance per modality (regions, all splits)</h2><div class='charts'>" + "".join(
            _bars(m, list(c), list(c.values())) for m, c in bmp["class_balance"].items()) + "</div>")
        labels = bmp["mask_area_histogram"]["bins"]
        parts.append("<h2>Mask area (fraction of the image)</h2><div class='charts'>" + "".join(
            _bars(m, labels, counts) for m, counts in bmp["mask_area_histogram"]["per_modality"].items()) + "</div>")
        per_image = bmp["masks_per_image"]
        parts.append("<h2>Masks per image</h2>" + _bars("images", [str(k) for k in per_image], list(per_image.values())))
        if bmp["missing_now"]:
            parts.append("<h2>Files gone since prepare</h2>" + _table(["file"], [[f] for f in bmp["missing_now"][:500]]))
    pmv = report.get("pubmedvision")
    if pmv:
        parts.append("<h2>PubMedVision sets</h2>" + _table(["set", "rows"], list(pmv["rows"].items()))
                     + f"<p>multi-image rows: {pmv['multi_image_rows']}</p>")
    for name, r in report["releases"].items():
        parts.append(f"<h2>{name}: bad files (first {len(r['problems'])}; all in {r['all_problems']})</h2>" + _table(
            ["file", "reason", "action"], [[p["file"], p["reason"], p["action"]] for p in r["problems"]]))
        parts.append(f"<h2>{name}: skipped files</h2>" + _table(
            ["file", "reason"], [[p["file"], p["reason"]] for p in r["skipped_files"]]))
    style = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px} .charts{display:flex;flex-wrap:wrap;gap:10px}"
             ".ok{color:#080;font-weight:700} .bad{color:#c00;font-weight:700} .chart{border:1px solid #ddd}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Data quality</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"


def summary_line(report: dict[str, Any]) -> str:
    parts = [f"{name}: {r['bad']}/{r['seen']} bad ({r['bad_fraction']:.2%}), {r['skipped']} skipped"
             for name, r in report["releases"].items()]
    return ("OK" if report["ok"] else "OVER THE LIMIT") + " - " + ("; ".join(parts) or "no prepare report found")

