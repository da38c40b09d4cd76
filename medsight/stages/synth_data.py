"""Stage 0 (tiny preset): write the synthetic BiomedParse and PubMedVision releases in their
published layouts, then prepare them with the same code as ``medsight data prepare`` (so the
stage's output is a prepared dataset root, exactly what a real release gives)."""

from __future__ import annotations

from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.train.tracker import Tracker


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    from medsight.data.synthetic import generate_dataset

    if config.data.source != "synthetic":
        raise ValueError(
            f"data.source={config.data.source!r}: real releases are prepared with `medsight data prepare "
            "biomedparse|pubmedvision SRC DEST`, not generated; pass DEST to the next stage with --input data=DEST"
        )
    manifest = generate_dataset(output, config.data)
    prepared = manifest["prepared"]
    metrics = {f"{split}_images": float(n) for split, n in prepared["biomedparse"].items()}
    metrics.update({f"{name}_rows": float(n) for name, n in prepared["pubmedvision"].items()})
    return metrics
