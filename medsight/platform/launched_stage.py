"""Compute one stage for the store path: in this process, or as one rank per GPU through torchrun.

``medsight stage run NAME --store --nproc-per-node N`` pulls the inputs once per node, then runs
the same stage as N ranks with the local form of the command (``--out DIR --input NAME=DIR``),
and pushes what rank 0 wrote. In a multi-node TrainJob every node does this and torchrun joins
the nodes' ranks from the operator's ``PET_*`` env; only the first node pushes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medsight.platform.artifacts import ArtifactRef


class StageFailed(RuntimeError):
    """A rank of a multi-process stage failed; the message names it and how to resume."""


def compute_stage(stage: str, config: Any, inputs: dict[str, Path], output: Path, tracker: Any, nproc: str,
                  refs: Mapping[str, ArtifactRef],
                  store_uris: dict[str, str] | None = None) -> tuple[dict | None, str | None]:
    """Run the stage into ``output`` in this process, or as ranks through torchrun when the pod
    has several GPUs (``nproc``) or the job several nodes. Returns its ``stage.json`` record
    (None on a node other than the first: rank 0's node writes the output) and, for ranks, the
    key they must have computed."""
    from medsight.config.io import load_config, save_config
    from medsight.stages.cache_key import stage_key
    from medsight.stages.registry import get_stage
    from medsight.stages.runner import read_stage_file, run_stage
    from medsight.train.launch import LaunchError, needs_launcher, node_rank, resolve_nproc, run_ranks

    ranks = resolve_nproc(nproc)
    if not needs_launcher(ranks):
        run_stage(stage, config, inputs, output, tracker, store_uris=store_uris)
        return read_stage_file(output), None
    config_file = output.parent / f".{output.name}.config.yaml"
    save_config(config, config_file)
    # The ranks read the config back from YAML, where a preset's int in a float field comes back
    # a float: their key is the round-tripped config's.
    expected = stage_key(get_stage(stage), load_config(config_file), {n: r.md5 for n, r in refs.items()}).key
    args = ["stage", "run", stage, "--out", str(output), "--config", str(config_file)]
    for name, path in inputs.items():
        args += ["--input", f"{name}={path}"]
    # The ranks do not track: this process holds the stage's MLflow run and replays rank 0's
    # curves and metrics into it afterwards (one run per stage, whatever the world size).
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    try:
        run_ranks(ranks, args, env)
    except LaunchError as error:
        raise StageFailed(f"stage {stage}: {error}; rerun the same command to resume from its last checkpoint") from None
    config_file.unlink(missing_ok=True)
    if node_rank() != 0:
        return None, None
    history = output / "history.jsonl"
    if history.is_file():
        for line in history.read_text().splitlines():
            point = json.loads(line)
            step = int(point.pop("step"))
            tracker.log_metrics(point, step=step)
    tracker.log_metrics(json.loads((output / "metrics.json").read_text()))
    return read_stage_file(output), expected
