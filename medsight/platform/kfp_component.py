"""Inside the KFP executor: the body of every generated stage component, and the ablation table.

``run_component`` turns the component's input artifacts into DVC references, restores the stage
from the run-cache right here (no torch, no stage imports) or runs ``medsight stage run --store``
in a child process (``component_runtime.py``), then fills the KFP outputs: a DVC pointer with its
metadata, a Metrics artifact and a stage card.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsight.platform.artifacts import ArtifactRef, ArtifactStore
from medsight.platform.component_runtime import NPROC_ENV, execute_stage, outcome, resolve_config
from medsight.platform.stage_server import run_stage_command


def artifact_ref(artifact: Any) -> str:
    """The DVC reference an input artifact carries ("" for an absent optional input)."""
    if artifact is None:
        return ""
    if isinstance(artifact, str):
        return artifact  # already a reference (the single-stage pipeline passes them as text)
    metadata = dict(getattr(artifact, "metadata", {}) or {})
    if metadata.get("dvc_md5"):
        # KFP hands numbers in metadata back as floats; DVC's pointer schema wants integers.
        counts = {key: int(metadata[key]) for key in ("size", "nfiles") if metadata.get(key)}
        return json.dumps({"md5": metadata["dvc_md5"], **counts, "stage": metadata.get("stage", "")})
    # Artifacts from elsewhere (an importer): the pointer file the artifact holds.
    import yaml

    pointer = yaml.safe_load(Path(artifact.path).read_text())
    return json.dumps({"md5": pointer["outs"][0]["md5"]})


def stage_command(stage: str, preset: str, overrides: Sequence[str], inputs: Mapping[str, str], result: Path,
                  use_existing: str = "", nproc: str = "1") -> list[str]:
    """``medsight stage run`` for a component: inputs as DVC references, output to the store,
    ``nproc`` ranks through torchrun (the GPUs the stage's pod requests)."""
    command = [sys.executable, "-m", "medsight.cli", "stage", "run", stage, "--store", "--preset", preset,
               "--result", str(result)]
    if nproc != "1":
        command += ["--nproc-per-node", nproc]
    if use_existing:
        command += ["--use-existing", use_existing]
    for override in overrides:
        command += ["--set", override]
    for name, ref in inputs.items():
        if ref:
            command += ["--input", f"{name}={ref}"]
    return command


def run_component(
    stage: str,
    *,
    preset: str,
    overrides: Sequence[str],
    inputs: Mapping[str, Any],
    output: Any,
    metrics: Any,
    card: Any,
    use_existing: str = "",
) -> None:
    """Body of every generated stage component: run the stage CLI, then fill the KFP outputs."""
    from medsight.platform.stage_card import render_stage_card

    refs = {name: artifact_ref(artifact) for name, artifact in inputs.items()}
    # A run-cache hit needs no stage process (no torch, no stage imports, not even the Kubernetes
    # client the multi-node path needs): restore it right here.
    hit = execute_stage(stage, refs, resolve_config(preset, overrides), use_existing=use_existing, restore_only=True)
    settings = None
    if hit is None and not use_existing:
        from medsight.platform.multinode import MultiNodeSettings

        settings = MultiNodeSettings.from_env()
    if hit is not None:
        result = outcome(hit)
    elif settings is not None:
        from medsight.platform.multinode import multinode_outcome

        result = multinode_outcome(stage, preset, overrides, refs, settings, looked_up=True)
    else:
        with tempfile.TemporaryDirectory(prefix="medsight-result-") as tmp:
            result_file = Path(tmp) / "result.json"
            from medsight.train.launch import pod_ranks

            # One rank per GPU the stage's pod was given (pipelines/deployment.py sets the count).
            command = stage_command(stage, preset, overrides, refs, result_file, use_existing,
                                    nproc=pod_ranks(os.environ.get(NPROC_ENV, "1")))
            # Forked from the local runner's warm stage server when there is one (stage_server.py).
            returncode = run_stage_command(command)
            if returncode != 0 or not result_file.is_file():
                raise RuntimeError(f"stage {stage} failed (exit {returncode}); its error is printed above")
            result = json.loads(result_file.read_text())
    ref = ArtifactRef.parse(json.dumps(result["ref"]))
    assert ref is not None
    store = ArtifactStore()
    Path(output.path).parent.mkdir(parents=True, exist_ok=True)
    # A pointer, not the bytes: KFP's launcher uploads this file to the artifact's URI, so pointing
    # the URI at the DVC object itself would overwrite it (docs/deploy.md, section 9).
    Path(output.path).write_text(ref.described_pointer(stage, store.object_uri(ref.md5), store.config.dvc_url))
    output.metadata.update({
        "dvc_md5": ref.md5, **{k: v for k, v in (("size", ref.size), ("nfiles", ref.nfiles)) if v is not None}, "stage": stage,
        "cached": result["cached"], "cache_key": result["cache_key"], "store_uri": store.object_uri(ref.md5),
        "pull": f"medsight platform pull --md5 {ref.md5} --dest {stage}",
    })
    for name, value in result["metrics"].items():
        metrics.log_metric(name, value)
    metrics.log_metric("cached", 1.0 if result["cached"] else 0.0)
    metrics.log_metric("stage_seconds", round(result["seconds"], 3))
    from medsight.stages.registry import get_stage

    # A stage with a page of its own (the evaluation's report, the data check's) shows it as its
    # card; every other stage gets a summary card.
    page = get_stage(stage).card
    html = store.read_file(ref, page) if page else None
    Path(card.path).parent.mkdir(parents=True, exist_ok=True)
    Path(card.path).write_bytes(html or render_stage_card(stage, result, store.object_uri(ref.md5)).encode())


def compare_evaluations(results: Sequence[tuple[str, Any]], table_path: str | None = None) -> str:
    """Markdown table: one row per (variant name, evaluation artifact or reference), headline metrics."""
    from medsight.stages.registry import evaluation_stage

    store = ArtifactStore()
    rows: list[tuple[str, dict[str, float], str]] = []
    for name, evaluation in results:
        ref = ArtifactRef.parse(artifact_ref(evaluation))
        if ref is None:
            rows.append((name, {}, "-"))
            continue
        found = store.read_file(ref, "metrics.json")
        metrics = json.loads(found) if found is not None else {}
        rows.append((name, metrics, ref.short))
    # Headline numbers only; every metric stays in each evaluation's metrics.json and MLflow run.
    headline = (*evaluation_stage().metrics, "comprehension_avg", "diagnosis_recall", "mecovqa_dice")
    keys = [k for k in dict.fromkeys(headline) if any(k in metrics for _, metrics, _ in rows)]
    lines = ["| variant | " + " | ".join(keys) + " | evaluation md5 |", "|---" * (len(keys) + 2) + "|"]
    for name, metrics, md5 in rows:
        cells = [f"{metrics[k]:.4f}" if k in metrics else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {md5} |")
    table = "\n".join(lines) + "\n"
    if os.environ.get("KFP_RUN_ID"):
        ArtifactStore().put_run_file(os.environ["KFP_RUN_ID"], "ablation.md", table)
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(table)
    print(table, flush=True)
    return table
