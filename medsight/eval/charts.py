"""Training-curve charts for the HTML report, as inline SVG (no plotting library, no files).

One chart per training stage: its loss terms as lines against the training step (left axis), its
validation values as markers at the step they were measured. A validation value that matches a
training series (``val_lm_loss`` and ``lm``) is drawn on that series' axis in its colour; the
others (Dice scores, accuracies, losses without a training counterpart) get a right-hand axis.
"""

from __future__ import annotations

import html
import math

Points = list[tuple[float, float]]
COLORS = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000")
VALIDATION_PREFIX = "val_"


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks or [low]


def _matching_series(metric: str, train: dict[str, Points]) -> str | None:
    """``val_lm_loss`` -> ``lm_loss`` or ``lm`` when the stage logged such a training series."""
    bare = metric.removeprefix(VALIDATION_PREFIX)
    for candidate in (bare, bare.removesuffix("_loss")):
        if candidate in train:
            return candidate
    return None


def _range(values: list[float], pad_zero: bool = False) -> tuple[float, float]:
    low, high = min(values), max(values)
    if pad_zero:
        low = min(low, 0.0)
    if high - low < 1e-12:
        high = low + (abs(low) * 0.1 or 1.0)
    return low, high


def stage_chart(stage: str, series: dict[str, Points], width: int = 440, height: int = 240) -> str:
    """``series``: metric (without the stage prefix) -> points; ``val_*`` entries are markers."""
    train = {k: [(x, y) for x, y in v if math.isfinite(y)] for k, v in series.items() if not k.startswith(VALIDATION_PREFIX)}
    train = {k: v for k, v in train.items() if v}
    validation = {k: v for k, v in series.items() if k.startswith(VALIDATION_PREFIX) and v}
    if not train:
        return ""
    matched = {k: _matching_series(k, train) for k in validation}
    own_axis = {k: v for k, v in validation.items() if matched[k] is None}
    left, right, top, bottom = 56, (58 if own_axis else 14), 34, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for points in [*train.values(), *validation.values()] for x, _ in points]
    x0, x1 = _range(xs, pad_zero=True)
    y0, y1 = _range([y for points in train.values() for _, y in points]
                    + [y for k, points in validation.items() if matched[k] for _, y in points])
    r0, r1 = _range([y for points in own_axis.values() for _, y in points], pad_zero=True) if own_axis else (0.0, 1.0)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float, low: float = y0, high: float = y1) -> float:
        return top + plot_h - (y - low) / (high - low) * plot_h

    colors = {name: COLORS[i % len(COLORS)] for i, name in enumerate(sorted(train))}
    parts = [f'<svg class="chart" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" role="img" '
             f'aria-label="{html.escape(stage)} training curves">',
             f'<text x="{left}" y="14" font-size="13" font-weight="bold">{html.escape(stage)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for tick in nice_ticks(x0, x1):
        parts.append(f'<line x1="{sx(tick):.1f}" y1="{top + plot_h}" x2="{sx(tick):.1f}" y2="{top + plot_h + 4}" stroke="#999"/>'
                     f'<text x="{sx(tick):.1f}" y="{top + plot_h + 15}" font-size="10" text-anchor="middle">{tick:g}</text>')
    for tick in nice_ticks(y0, y1):
        parts.append(f'<line x1="{left - 4}" y1="{sy(tick):.1f}" x2="{left}" y2="{sy(tick):.1f}" stroke="#999"/>'
                     f'<text x="{left - 6}" y="{sy(tick) + 3:.1f}" font-size="10" text-anchor="end">{tick:.3g}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle">training step</text>'
                 f'<text x="14" y="{top + plot_h / 2:.0f}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.0f})">training loss</text>')
    if own_axis:
        axis_x = left + plot_w
        for tick in nice_ticks(r0, r1):
            parts.append(f'<line x1="{axis_x}" y1="{sy(tick, r0, r1):.1f}" x2="{axis_x + 4}" y2="{sy(tick, r0, r1):.1f}" stroke="#999"/>'
                         f'<text x="{axis_x + 6}" y="{sy(tick, r0, r1) + 3:.1f}" font-size="10">{tick:.3g}</text>')
        mid = top + plot_h / 2
        parts.append(f'<text x="{width - 8}" y="{mid:.0f}" font-size="11" text-anchor="middle" '
                     f'transform="rotate(90 {width - 8} {mid:.0f})">validation value</text>')
    for name, points in sorted(train.items()):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{colors[name]}" stroke-width="1.5" points="{path}">'
                     f'<title>{html.escape(name)}</title></polyline>')
        if len(points) == 1:  # a one-step run: a line of one point would not show
            x, y = points[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colors[name]}"/>')
    legend = [(name, colors[name], "line") for name in sorted(train)]
    for index, (name, points) in enumerate(sorted(validation.items())):
        series = matched[name]
        color = colors[series] if series else COLORS[(len(train) + index) % len(COLORS)]
        for x, y in points:
            cy = sy(y) if series else sy(y, r0, r1)
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{cy:.1f}" r="4.5" fill="white" stroke="{color}" stroke-width="2">'
                         f'<title>{html.escape(name)} = {y:.4g} at step {x:g}</title></circle>')
        legend.append((f"{name} {points[-1][1]:.3g}", color, "marker"))
    x = left
    for label, color, kind in legend:
        mark = (f'<line x1="{x}" y1="25" x2="{x + 14}" y2="25" stroke="{color}" stroke-width="2"/>' if kind == "line"
                else f'<circle cx="{x + 7}" cy="25" r="4" fill="white" stroke="{color}" stroke-width="2"/>')
        parts.append(mark + f'<text x="{x + 17}" y="29" font-size="10">{html.escape(label)}</text>')
        x += 24 + 6 * len(label)
    parts.append("</svg>")
    return "".join(parts)


def grouped_by_stage(curves: dict[str, Points]) -> dict[str, dict[str, Points]]:
    """``{"perceiver-pretrain/loss": pts}`` -> ``{"perceiver-pretrain": {"loss": pts}}``."""
    stages: dict[str, dict[str, Points]] = {}
    for name, points in curves.items():
        stage, _, metric = name.partition("/")
        stages.setdefault(stage if metric else "", {})[metric or stage] = points
    return stages


def training_charts(curves: dict[str, Points], order: list[str]) -> str:
    """Every stage's chart, in ``order`` (the registry's), unknown stages after."""
    stages = grouped_by_stage(curves)
    rank = {name: i for i, name in enumerate(order)}
    return "".join(stage_chart(stage or "other", series)
                   for stage, series in sorted(stages.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
