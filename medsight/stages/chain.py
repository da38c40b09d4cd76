"""Run the stage graph in-process (no orchestrator): the quick path for the CLI and ablations.

Each stage output lives at ``workdir/<stage>/<cache key[:12]>``, so variants that share upstream
stages share their outputs instead of recomputing them. Which stages run and which output feeds
which input comes from the registry (``input_sources``), as in the KFP pipeline and dvc.yaml.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from medsight.config.io import apply_overrides
from medsight.config.schema import ExperimentConfig
from medsight.stages.registry import Variant, active_stages, get_variant, input_sources
from medsight.stages.runner import plan_stage, run_stage
from medsight.train.tracker import NullTracker, Tracker


@dataclass
class StageRecord:
    name: str
    output: Path
    metrics: dict[str, float]
    reused: bool
    seconds: float = 0.0
    key: str = ""


@dataclass
class ChainResult:
    variant: str = "full"
    stages: dict[str, StageRecord] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: record.metrics for name, record in self.stages.items()}


def variant_config(config: ExperimentConfig, variant: Variant, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The variant's overrides on ``config``, then the user's (which win)."""
    return apply_overrides(config, [*variant.overrides, *overrides])


def run_chain(
    config: ExperimentConfig,
    workdir: Path,
    variant: str | Variant = "full",
    tracker_factory: Callable[[str], Tracker] | None = None,
    until: str | None = None,
    on_stage: Callable[[StageRecord], None] | None = None,
    on_start: Callable[[str], None] | None = None,
) -> ChainResult:
    """Run every stage the variant keeps; ``config`` is the base config (variant overrides added here)."""
    variant = get_variant(variant) if isinstance(variant, str) else variant
    config = variant_config(config, variant)
    stages = active_stages(variant.drops)
    if until is not None and until not in {spec.name for spec in stages}:
        raise ValueError(f"--until {until}: not a stage of variant {variant.name}")
    result = ChainResult(variant=variant.name)
    for spec in stages:
        if on_start:
            on_start(spec.name)
        inputs = {name: result.stages[source].output for name, source in input_sources(spec, variant.drops).items()}
        plan = plan_stage(spec.name, config, inputs)
        output = Path(workdir) / spec.name / plan.key.short
        tracker = tracker_factory(spec.name) if tracker_factory else NullTracker()
        started = time.perf_counter()
        run = run_stage(spec.name, config, inputs, output, tracker, plan=plan)
        record = StageRecord(spec.name, output, run.metrics, run.reused, time.perf_counter() - started, run.key.key)
        result.stages[spec.name] = record
        if on_stage:
            on_stage(record)
        if until == spec.name:
            break
    return result
