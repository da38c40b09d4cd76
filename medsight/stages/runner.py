"""Run one stage: validate inputs, save the resolved config, call it, record metrics and lineage.

``stage.json`` is written last, so its presence means the output is complete. Its fingerprint
(config sections the stage reads + fingerprints of its inputs + code version) lets the local
chain and the pipeline components skip a stage whose inputs did not change.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import medsight
from medsight.config.io import save_config, to_dict
from medsight.config.schema import ExperimentConfig
from medsight.io_utils import atomic_write_json
from medsight.stages.registry import StageSpec, get_stage
from medsight.train.tracker import HistoryRecorder, NullTracker, Tracker

STAGE_FILE = "stage.json"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


def config_sections(config: ExperimentConfig, sections: tuple[str, ...]) -> dict[str, Any]:
    data = to_dict(config)
    picked: dict[str, Any] = {}
    for dotted in sections:
        node: Any = data
        for part in dotted.split("."):
            node = node[part]
        picked[dotted] = node
    return picked


def directory_fingerprint(path: Path) -> str:
    """A completed stage's recorded fingerprint, else a content hash (imported datasets)."""
    path = Path(path)
    stage_file = path / STAGE_FILE
    if stage_file.is_file():
        return json.loads(stage_file.read_text())["fingerprint"]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the installed medsight sources: a code change invalidates reuse, as it should."""
    root = Path(medsight.__file__).parent
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def stage_fingerprint(spec: StageSpec, config: ExperimentConfig, input_fingerprints: dict[str, str]) -> str:
    payload = {
        "stage": spec.name,
        "config": config_sections(config, spec.config_sections),
        "inputs": dict(sorted(input_fingerprints.items())),
        "code": code_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def validate_inputs(spec: StageSpec, inputs: dict[str, Path]) -> None:
    unknown = sorted(set(inputs) - set(spec.inputs))
    if unknown:
        raise ValueError(f"stage {spec.name}: unknown input {unknown[0]!r}; it takes {', '.join(spec.inputs) or 'no inputs'}")
    missing = [name for name in spec.required_inputs if name not in inputs]
    if missing:
        raise ValueError(f"stage {spec.name}: missing input {missing[0]!r} (pass --input {missing[0]}=DIR)")
    for name, path in inputs.items():
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"stage {spec.name}: input {name}={path} is not a directory")
        if (path / CONFIG_FILE).is_file() and not (path / STAGE_FILE).is_file():
            # A stage output without stage.json is one that crashed or is still running.
            raise ValueError(
                f"stage {spec.name}: input {name}={path} is an unfinished stage output (no {STAGE_FILE}); "
                "rerun that stage first (it resumes from its last checkpoint)"
            )


def completed_fingerprint(output: Path) -> str | None:
    stage_file = Path(output) / STAGE_FILE
    if not stage_file.is_file():
        return None
    return json.loads(stage_file.read_text()).get("fingerprint")


def run_stage(
    name: str,
    config: ExperimentConfig,
    inputs: dict[str, Path],
    output: Path,
    tracker: Tracker | None = None,
    reuse: bool = True,
) -> tuple[dict[str, float], bool]:
    """Returns (metrics, reused). ``reuse`` skips a stage whose output has the same fingerprint."""
    spec = get_stage(name)
    inputs = {key: Path(value) for key, value in inputs.items()}
    validate_inputs(spec, inputs)
    tracker = tracker or NullTracker()
    output = Path(output)
    fingerprint = stage_fingerprint(spec, config, {k: directory_fingerprint(v) for k, v in inputs.items()})
    if reuse and completed_fingerprint(output) == fingerprint:
        return json.loads((output / METRICS_FILE).read_text()), True
    if completed_fingerprint(output) is not None:
        # A finished output of another configuration: start clean rather than mix the two.
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    save_config(config, output / CONFIG_FILE)
    # Curves land beside the checkpoint too, so the report works without an MLflow server.
    tracker = HistoryRecorder(tracker, output)
    tracker.set_tags({"medsight.stage": name, "medsight.fingerprint": fingerprint})
    started = time.perf_counter()
    metrics = spec.load()(config, inputs, output, tracker)
    elapsed = time.perf_counter() - started
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    save_config(config, output / CONFIG_FILE)  # again: a stage may have swapped its directory in
    metrics = {key: float(value) for key, value in metrics.items()}
    tracker.log_metrics(metrics)
    atomic_write_json(output / METRICS_FILE, metrics)
    atomic_write_json(
        output / STAGE_FILE,
        {
            "stage": name,
            "fingerprint": fingerprint,
            "inputs": {key: str(value) for key, value in inputs.items()},
            "medsight_version": medsight.__version__,
            "seconds": round(elapsed, 3),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return metrics, False
