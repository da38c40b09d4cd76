"""The pipeline's first step after the data: the quality report of the prepared dataset.

It writes ``quality.json`` and ``quality.html`` (counts, class balance, mask-area histograms, the
bad and skipped files) into its own output, so the data artifact stays read-only, and fails the
run, naming the report, when a release's bad fraction is over ``data.max_bad_fraction``: no GPU
starts on a broken dataset.
"""

from __future__ import annotations

from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.data.errors import DataError
from medsight.data.quality_check import QUALITY_HTML, check_dataset
from medsight.train.tracker import Tracker


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    limit = config.data.max_bad_fraction
    report = check_dataset(Path(inputs["data"]), max_bad_fraction=limit, out=output)
    releases = report.get("releases", {})
    if not report["ok"]:
        worst = max(releases.items(), key=lambda item: item[1].get("bad_fraction", 0.0))
        raise DataError(
            f"{inputs['data']}: {worst[0]} has {worst[1]['bad']} bad of {worst[1]['seen']} entries "
            f"({worst[1]['bad_fraction']:.2%} > data.max_bad_fraction {limit:.2%}); see {output / QUALITY_HTML}"
        )
    metrics = {f"{name}_bad_fraction": float(entry.get("bad_fraction", 0.0)) for name, entry in releases.items()}
    metrics.update({f"{name}_seen": float(entry.get("seen", 0)) for name, entry in releases.items()})
    return metrics
