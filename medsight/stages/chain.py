"""Run the stage graph in-process (no orchestrator): the quick path for the CLI and ablations.

Each stage output lives at ``workdir/<stage>/<fingerprint[:12]>``, so variants that share
upstream stages share their outputs instead of recomputing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.stages.registry import STAGES, get_stage
from medsight.stages.runner import directory_fingerprint, run_stage, stage_fingerprint
from medsight.train.tracker import NullTracker, Tracker

# Which upstream stage feeds each input name.
INPUT_SOURCES: dict[str, str] = {
    "data": "synth-data",
    "base": "base-models",
    "perceiver": "perceiver-pretrain",
    "codebook": "codebook-pretrain",
    "v2t": "v2t-align",
    "grounding": "grounding-data",
    "t2v": "t2v-align",
    "model": "instruct-tune",
}
SKIPPABLE = frozenset({"v2t-align", "t2v-align", "instruct-tune"})


@dataclass
class StageRecord:
    name: str
    output: Path
    metrics: dict[str, float]
    reused: bool
    seconds: float = 0.0


@dataclass
class ChainResult:
    stages: dict[str, StageRecord] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: record.metrics for name, record in self.stages.items()}


def _source_for(input_name: str, skip: frozenset[str]) -> str | None:
    source = INPUT_SOURCES[input_name]
    if input_name == "model" and source in skip:
        # "Without stage 5": evaluate the stage-4 model as it is.
        source = "t2v-align"
    if source in skip:
        return None
    return source


def run_chain(
    config: ExperimentConfig,
    workdir: Path,
    skip: frozenset[str] = frozenset(),
    tracker_factory: Callable[[str], Tracker] | None = None,
    until: str | None = None,
    on_stage: Callable[[StageRecord], None] | None = None,
) -> ChainResult:
    bad = set(skip) - SKIPPABLE
    if bad:
        raise ValueError(f"cannot skip {sorted(bad)}; only {sorted(SKIPPABLE)} are ablation-skippable")
    if {"t2v-align", "instruct-tune"} <= set(skip):
        raise ValueError("skipping both t2v-align and instruct-tune leaves no model to evaluate")
    import time

    result = ChainResult()
    for spec in STAGES:
        if spec.name in skip:
            continue
        inputs: dict[str, Path] = {}
        for input_name in spec.inputs:
            source = _source_for(input_name, frozenset(skip))
            if source is None:
                if input_name in spec.required_inputs:
                    raise ValueError(f"stage {spec.name} needs {input_name} but {INPUT_SOURCES[input_name]} is skipped")
                continue
            if input_name in spec.optional_inputs and source not in result.stages:
                continue
            inputs[input_name] = result.stages[source].output
        fingerprint = stage_fingerprint(get_stage(spec.name), config, {k: directory_fingerprint(v) for k, v in inputs.items()})
        output = Path(workdir) / spec.name / fingerprint[:12]
        tracker = tracker_factory(spec.name) if tracker_factory else NullTracker()
        started = time.perf_counter()
        metrics, reused = run_stage(spec.name, config, inputs, output, tracker)
        record = StageRecord(spec.name, output, metrics, reused, time.perf_counter() - started)
        result.stages[spec.name] = record
        if on_stage:
            on_stage(record)
        if until == spec.name:
            break
    return result
