"""Stage 0 (tiny preset): write the synthetic dataset in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.train.tracker import Tracker


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    from medsight.data.synthetic import generate_dataset

    if config.data.source != "synthetic":
        raise ValueError(
            f"data.source={config.data.source!r}: real datasets are imported with `dvc import`/`dvc pull`, "
            "not generated; pass them to the next stage with --input data=DIR"
        )
    summary = generate_dataset(output, config.data)
    counts = summary.get("counts", {}) if isinstance(summary, dict) else {}
    return {f"{split}_images": float(sum(v.values()) if isinstance(v, dict) else v) for split, v in counts.items()}
