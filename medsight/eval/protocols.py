"""Scoring protocols of the text metrics, and how their metrics are named in results.json.

``strict``: this project's scoring (``metrics.py``: whole words, a closed miss counts 0).
``llava-med``: LLaVA-Med's run_eval.py (``llava_med_scoring.py``), as the paper's Tables 2-4.
Every evaluation computes both; a protocol only decides which one leads tables and summaries.
"""

from __future__ import annotations

PROTOCOLS = ("strict", "llava-med")
LLAVA_MED_SUFFIX = "_llava_med"  # metric name suffix of the llava-med protocol's text scores
TEXT_METRICS = ("closed_accuracy", "open_recall", "all_score", "diagnosis_recall")
LABELS = {
    "strict": "strict scoring (whole words; a closed miss counts 0)",
    "llava-med": "LLaVA-Med run_eval.py scoring (as the paper's tables)",
}


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"evaluate.protocol / --protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return protocol


def protocol_metric(metric: str, protocol: str) -> str:
    """The results.json name of ``metric`` under ``protocol`` (non-text metrics are shared)."""
    check_protocol(protocol)
    if protocol == "llava-med" and metric in TEXT_METRICS:
        return metric + LLAVA_MED_SUFFIX
    return metric


def ordered(primary: str) -> tuple[str, ...]:
    """Both protocols, ``primary`` first."""
    check_protocol(primary)
    return (primary,) + tuple(p for p in PROTOCOLS if p != primary)
