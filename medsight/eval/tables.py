"""Result tables shaped like the paper's (Tables 2-5, 10), as markdown or plain text.

Inputs are the JSON-able summaries of ``results.json`` (benchmark -> metric -> MetricSummary
dict), so tables can be rebuilt from a finished run without the model. Scores print x100 with
one decimal, as in the paper; a benchmark that was not run prints "-".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from medsight.eval.benchmarks.common import modality_sort_key
from medsight.eval.protocols import LABELS, ordered, protocol_metric

Summaries = dict[str, dict[str, dict[str, Any]]]  # benchmark -> metric -> MetricSummary.to_dict()

# Table 2 columns: (header, benchmark, metric, which average). VQA sets report the pooled mean
# over questions; DiagSeg reports the macro average over modalities, as in Table 3.
COMPREHENSION_COLUMNS = (
    ("VQA-RAD close", "vqa_rad", "closed_accuracy", "micro"),
    ("VQA-RAD all", "vqa_rad", "all_score", "micro"),
    ("SLAKE close", "slake", "closed_accuracy", "micro"),
    ("SLAKE all", "slake", "all_score", "micro"),
    ("PathVQA close", "pathvqa", "closed_accuracy", "micro"),
    ("PathVQA all", "pathvqa", "all_score", "micro"),
    ("MMMU-Med", "mmmu_med", "mc_accuracy", "micro"),
    ("OMVQA", "omnimedvqa", "mc_accuracy", "micro"),
    ("DiagSeg-Diagnosis", "diagseg", "diagnosis_recall", "macro"),
)
ABLATION_EXTRA_COLUMNS = (
    ("DiagSeg-Seg", "diagseg", "dice", "macro"),
    ("MeCo", "mecovqa_g", "dice", "macro"),
)
BENCHMARK_TITLES = {
    "vqa_rad": "VQA-RAD", "slake": "SLAKE", "pathvqa": "PathVQA", "mmmu_med": "MMMU-Med",
    "omnimedvqa": "OmniMedVQA", "diagseg": "DiagSeg", "mecovqa_g": "MeCoVQA-G",
    "schain": "S-Chain", "medtrinity": "MedTrinity",
}


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    first_column: str = field(default="")

    def to_markdown(self) -> str:
        header = [self.first_column] + self.columns if self.first_column else self.columns
        lines = [f"**{self.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", f"_{self.note}_"]
        return "\n".join(lines) + "\n"

    def to_text(self) -> str:
        header = [self.first_column] + self.columns if self.first_column else self.columns
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *self.rows)]
        def line(cells: list[str]) -> str:
            return "  ".join(str(cell).rjust(width) if i else str(cell).ljust(width) for i, (cell, width) in enumerate(zip(cells, widths)))
        out = [self.title, line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in self.rows]
        if self.note:
            out.append(self.note)
        return "\n".join(out) + "\n"


def fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _value(summaries: Summaries, benchmark: str, metric: str, average: str) -> float | None:
    summary = summaries.get(benchmark, {}).get(metric)
    return None if summary is None or summary.get("n", 0) == 0 else summary[average]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def comprehension_table(summaries: Summaries, label: str = "model", untrained: tuple[str, ...] | list[str] = (),
                        include_untrained: bool = False, protocol: str = "strict") -> Table:
    """Table 2: close/all accuracy per VQA set, MC accuracy, DiagSeg diagnosis recall, average.

    ``untrained``: benchmarks asking in a format the model was never trained on (``coverage.py``);
    their columns are marked with a dagger and left out of Avg. unless ``include_untrained``.
    ``protocol`` picks the text metrics' scoring (``protocols.py``); MC accuracy is shared.
    """
    untrained = set(untrained)
    values = [_value(summaries, b, protocol_metric(m, protocol), a) for _, b, m, a in COMPREHENSION_COLUMNS]
    averaged = [v for v, (_, b, _, _) in zip(values, COMPREHENSION_COLUMNS) if include_untrained or b not in untrained]
    marked = [c for c in COMPREHENSION_COLUMNS if c[1] in untrained and c[1] in summaries]
    close = "closed accuracy (a miss counts 0)" if protocol == "strict" else "LLaVA-Med's closed rule (yes/no substring test)"
    note = f"close = {close}; all = closed hits and open recall over all questions; Avg. over the columns present"
    if marked:
        names = ", ".join(c[0] for c in marked)
        note += (f". \u2020 {names}: a question format the model was not trained to answer (no such questions in its "
                 f"instruction data); {'included in' if include_untrained else 'left out of'} Avg")
    return Table(
        title=f"Table 2 - Medical visual comprehension [{LABELS[protocol]}]",
        first_column="Model",
        columns=[c[0] + (" \u2020" if c in marked else "") for c in COMPREHENSION_COLUMNS] + ["Avg."],
        rows=[[label] + [fmt(v) for v in values] + [fmt(_mean(averaged))]],
        note=note + ".",
    )


def _modalities(summaries: Summaries, benchmark: str, metrics_: tuple[str, ...]) -> list[str]:
    names = set()
    for metric in metrics_:
        names |= set(summaries.get(benchmark, {}).get(metric, {}).get("per_modality", {}))
    return sorted(names, key=modality_sort_key)


def per_modality_table(summaries: Summaries, benchmark: str, metric: str, title: str, label: str = "model") -> Table:
    summary = summaries.get(benchmark, {}).get(metric)
    modalities = _modalities(summaries, benchmark, (metric,))
    row = [label] + [fmt(summary["per_modality"].get(m)) if summary else "-" for m in modalities]
    row.append(fmt(summary["macro"]) if summary else "-")
    counts = ", ".join(f"{m}: {summary['counts'][m]}" for m in modalities) if summary else "not run"
    return Table(title=title, first_column="Model", columns=modalities + ["Avg."], rows=[row], note=f"n per modality - {counts}")


def diagseg_table(summaries: Summaries, label: str = "model", protocol: str = "strict") -> Table:
    """Table 3: DiagSeg diagnosis recall and segmentation Dice per modality, with macro averages."""
    recall = protocol_metric("diagnosis_recall", protocol)
    modalities = _modalities(summaries, "diagseg", (recall, "dice"))
    row = [label]
    for metric in (recall, "dice"):
        summary = summaries.get("diagseg", {}).get(metric, {})
        row += [fmt(summary.get("per_modality", {}).get(m)) for m in modalities]
        row.append(fmt(summary.get("macro")) if summary else "-")
    columns = [f"Diag {m}" for m in modalities] + ["Diag Avg."] + [f"Seg {m}" for m in modalities] + ["Seg Avg."]
    title = f"Table 3 - Grounded diagnostic segmentation (DiagSeg) [{LABELS[protocol]}]"
    return Table(title, columns, [row], "Diag = diagnosis recall; Seg = Dice of masks decoded from generated region tokens.", "Model")


def box_table(summaries: Summaries, label: str = "model") -> Table:
    """Table 10: bounding-box mIoU (boxes = extents of the decoded masks)."""
    names = [b for b in ("schain", "medtrinity", "diagseg", "mecovqa_g") if "box_miou" in summaries.get(b, {})]
    names += sorted(b for b in summaries if b not in names and "box_miou" in summaries[b])
    row = [label] + [fmt(summaries[b]["box_miou"]["micro"]) for b in names]
    return Table("Table 10 - Bounding-box grounding (mIoU)", [f"mIoU ({BENCHMARK_TITLES.get(b, b)})" for b in names], [row], "Pooled over samples; boxes are the extents of the decoded masks.", "Model")


def ordered_benchmarks(names) -> list[str]:
    """Benchmarks in the paper's order (results.json stores them sorted by name)."""
    from medsight.eval.benchmarks.manifest import BENCHMARK_ORDER

    rank = {name: i for i, name in enumerate(BENCHMARK_ORDER)}
    return sorted(names, key=lambda name: (rank.get(name, len(rank)), name))


def benchmark_table(summaries: Summaries, benchmark: str) -> Table:
    """Every metric of one benchmark per modality, with the macro average and the pooled mean."""
    metrics_ = {k: v for k, v in summaries.get(benchmark, {}).items() if k != "extra_region_tokens"}
    modalities = _modalities(summaries, benchmark, tuple(metrics_))
    rows = []
    for metric, summary in sorted(metrics_.items()):
        rows.append([metric] + [fmt(summary["per_modality"].get(m)) for m in modalities] + [fmt(summary["macro"]), fmt(summary["micro"]), str(summary["n"])])
    return Table(
        title=f"{BENCHMARK_TITLES.get(benchmark, benchmark)} - per modality",
        first_column="Metric",
        columns=modalities + ["Avg. (macro)", "All (pooled)", "n"],
        rows=rows,
    )


def all_tables(summaries: Summaries, label: str = "model", untrained: tuple[str, ...] | list[str] = (),
               include_untrained: bool = False, protocol: str = "strict") -> list[Table]:
    """Every paper-shaped table plus one per-modality table for each benchmark; the text-scored
    tables once per scoring protocol, ``protocol`` first, each labelled with its protocol."""
    protocols = ordered(protocol)
    tables = [comprehension_table(summaries, label, untrained, include_untrained, p) for p in protocols]
    if "diagseg" in summaries:
        tables += [diagseg_table(summaries, label, p) for p in protocols]
    if "mecovqa_g" in summaries:
        tables.append(per_modality_table(summaries, "mecovqa_g", "dice", "Table 4 - Text-prompted segmentation (MeCoVQA-G Dice)", label))
    if any("box_miou" in metrics_ for metrics_ in summaries.values()):
        tables.append(box_table(summaries, label))
    tables += [benchmark_table(summaries, benchmark) for benchmark in ordered_benchmarks(summaries)]
    return tables


def ablation_table(variants: dict[str, Summaries]) -> Table:
    """Table 5 shape: one row per variant, comprehension and segmentation columns side by side."""
    columns = COMPREHENSION_COLUMNS + ABLATION_EXTRA_COLUMNS
    rows = [[name] + [fmt(_value(s, b, m, a)) for _, b, m, a in columns] for name, s in variants.items()]
    headers = [c[0].replace("DiagSeg-Diagnosis", "DiagSeg-VQA") for c in columns]
    return Table("Ablations (tiny preset)", headers, rows, "Same evaluation code for every variant; '-' = benchmark not run.", "Variant")


def render_markdown(tables: list[Table]) -> str:
    return "\n".join(table.to_markdown() for table in tables)
