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
    generate_dataset(output, config.data)
    data = config.data
    return {"train_images": float(data.train_images), "val_images": float(data.val_images),
            "test_images": float(data.test_images)}
