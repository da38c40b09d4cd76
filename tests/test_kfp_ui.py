"""What a KFP UI user sees in the compiled pipelines: described parameters, typed artifacts that
connect every stage, and the evaluation task told which variant it evaluates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medsight.stages.registry import STAGES, evaluation_stage, input_sources

COMPILED = Path(__file__).resolve().parents[1] / "pipelines" / "compiled"
PIPELINES = sorted(p.name for p in COMPILED.glob("*.yaml"))


def _spec(name: str) -> dict:
    return next(d for d in yaml.safe_load_all((COMPILED / name).read_text()) if d)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_pipeline_parameter_has_a_description(name: str) -> None:
    parameters = _spec(name)["root"]["inputDefinitions"]["parameters"]
    assert parameters
    for key, parameter in parameters.items():
        assert len(parameter.get("description", "")) > 15, f"{name}: parameter {key} has no description"


def test_stages_pass_typed_artifacts_along_every_registry_edge() -> None:
    spec = _spec("medsight-pipeline.yaml")
    tasks = spec["root"]["dag"]["tasks"]
    for stage in STAGES:
        task = tasks[stage.name]
        artifacts = task.get("inputs", {}).get("artifacts", {})
        wanted = input_sources(stage, frozenset())
        assert {k: v["taskOutputArtifact"]["producerTask"] for k, v in artifacts.items()} == wanted, stage.name
        component = spec["components"][task["componentRef"]["name"]]
        output = component["outputDefinitions"]["artifacts"]["output"]["artifactType"]["schemaTitle"]
        assert output == {"dataset": "system.Dataset", "model": "system.Model", "evaluation": "system.Artifact",
                          "report": "system.Artifact"}[stage.output]
        assert component["outputDefinitions"]["artifacts"]["card"]["artifactType"]["schemaTitle"] == "system.HTML"
        assert component["outputDefinitions"]["artifacts"]["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"


@pytest.mark.parametrize("name", ["medsight-pipeline.yaml", "medsight-ablation.yaml"])
def test_the_evaluation_task_knows_its_variant(name: str) -> None:
    spec = _spec(name)
    executors = spec["deploymentSpec"]["executors"]
    evaluations = [key for key in executors if key.startswith(f"exec-{evaluation_stage().name}")]
    assert evaluations
    variants = set()
    for key in evaluations:
        env = {e["name"]: e["value"] for e in executors[key]["container"].get("env", []) if "value" in e}
        variants.add(env["MEDSIGHT_VARIANT"])
    assert len(variants) == len(evaluations)  # one per variant evaluated
    others = [key for key in executors if key.startswith("exec-perceiver-pretrain")]
    for key in others:  # shared stages carry no variant name
        assert "MEDSIGHT_VARIANT" not in {e["name"] for e in executors[key]["container"].get("env", [])}
