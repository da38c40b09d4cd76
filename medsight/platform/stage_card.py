"""A stage's card for the KFP run page: what it produced, its metrics, how to get its output."""

from __future__ import annotations

import html
from typing import Any


def render_stage_card(stage: str, result: dict[str, Any], store_uri: str) -> str:
    """Self-contained HTML (no external assets): KFP shows it in the task's Visualizations tab."""
    md5 = result["ref"]["md5"]
    status = "restored from the run-cache" if result["cached"] else f"computed in {result['seconds']:.1f} s"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{value:.4g}</td></tr>" for name, value in sorted(result["metrics"].items())
    )
    inputs = "".join(
        f"<tr><td>{html.escape(name)}</td><td><code>{html.escape(value)}</code></td></tr>"
        for name, value in sorted(result.get("inputs", {}).items())
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(stage)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.2em;color:#1b1f24}}table{{border-collapse:collapse}}
td{{border-bottom:1px solid #ddd;padding:.25em .8em .25em 0}}code{{font-size:12px}}h2{{margin:.2em 0}}</style></head>
<body><h2>{html.escape(stage)}</h2><p>{html.escape(status)}.</p>
<p>Output <code>{html.escape(md5)}</code> in <code>{html.escape(store_uri)}</code><br>
Pull it: <code>medsight platform pull --md5 {html.escape(md5)} --dest {html.escape(stage)}</code></p>
<h3>Metrics</h3><table>{rows or '<tr><td>none</td></tr>'}</table>
<h3>Inputs (DVC hashes)</h3><table>{inputs or '<tr><td>none</td></tr>'}</table>
<p>Cache key <code>{html.escape(result.get('cache_key', ''))}</code></p></body></html>
"""
