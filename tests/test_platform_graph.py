"""The stage graph is the same in the registry, dvc.yaml and the compiled KFP DAG; golden YAML is current."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest
import yaml

from medsight.platform.graph import (
    ABLATION_EDGES,
    dvc_graph,
    kfp_graph,
    registry_graph,
    render_dvc_yaml,
    render_params_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipelines" / "compiled"
if str(ROOT) not in sys.path:  # pipelines/ and components/ are top-level folders, not installed
    sys.path.insert(0, str(ROOT))


def _compiled(name: str) -> dict:
    return next(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))


def _platform(name: str) -> dict:
    return list(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))[1]["platforms"]["kubernetes"]


def test_dvc_yaml_graph_equals_registry() -> None:
    nodes, edges = registry_graph()
    dvc_nodes, dvc_edges = dvc_graph(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert dvc_nodes == nodes
    assert dvc_edges == edges


@pytest.mark.parametrize("pipeline", ["medsight-pipeline", "medsight-ablation"])
def test_compiled_kfp_dag_equals_registry(pipeline: str) -> None:
    nodes, edges = registry_graph()
    kfp_nodes, kfp_edges = kfp_graph(_compiled(pipeline))
    assert kfp_nodes == nodes
    # The only extra edge is "without stage 5": evaluate takes the stage-4 model instead.
    assert kfp_edges == edges | ABLATION_EDGES


def test_stage_3_runs_parallel_to_stage_2() -> None:
    _, edges = kfp_graph(_compiled("medsight-pipeline"))
    assert ("perceiver-pretrain", "v2t-align") in edges
    assert ("codebook-pretrain", "v2t-align") not in edges and ("v2t-align", "codebook-pretrain") not in edges


def test_dvc_files_are_generated_from_registry() -> None:
    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml(), "run: medsight platform dvc-files"
    assert (ROOT / "params.yaml").read_text() == render_params_yaml("tiny"), "run: medsight platform dvc-files"


def test_dvc_yaml_calls_the_stage_cli_with_params() -> None:
    from medsight.config import load_config
    from medsight.stages.registry import get_stage

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"medsight stage run {name} --out outputs/{name} --config params.yaml")
        assert stage["params"] == list(get_stage(name).config_sections)
    load_config(ROOT / "params.yaml")  # params.yaml is a complete, valid config


def test_golden_yaml_is_current_and_deterministic() -> None:
    from pipelines.compile import stale_files

    assert stale_files() == [], "run: python -m pipelines.compile"


def test_components_cover_registry_and_take_only_relevant_hparams() -> None:
    from components import STAGE_COMPONENTS
    from medsight.platform.component_runtime import HPARAM_KEYS, relevant_hparams
    from medsight.stages.registry import STAGES

    assert list(STAGE_COMPONENTS) == [s.name for s in STAGES]
    for spec in STAGES:
        component = STAGE_COMPONENTS[spec.name]
        params = set(inspect.signature(component.python_func).parameters)
        assert set(spec.inputs) <= params, spec.name
        assert params & set(HPARAM_KEYS) == set(relevant_hparams(spec.name)), spec.name


def test_gpu_and_cpu_scheduling() -> None:
    from pipelines.deployment import DeploymentSettings

    settings = DeploymentSettings()
    spec = _compiled("medsight-pipeline")
    executors = _platform("medsight-pipeline")["deploymentSpec"]["executors"]
    for stage, gpus in settings.gpus.items():
        resources = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == str(gpus)
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        k8s = executors[f"exec-{stage}"]
        assert k8s["nodeSelector"]["labels"] == {settings.gpu_node_label_key: settings.gpu_node_label_value}
        assert {"key": settings.gpu_taint_key, "operator": "Exists", "effect": "NoSchedule"}.items() <= k8s["tolerations"][0].items()
        assert k8s["emptyDirMounts"][0]["mountPath"] == "/dev/shm" and k8s["emptyDirMounts"][0]["medium"] == "Memory"
    for stage in ("synth-data", "base-models", "grounding-data"):
        assert "accelerator" not in spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"].get("resources", {})
        k8s = executors[f"exec-{stage}"]
        assert "tolerations" not in k8s and "nodeSelector" not in k8s
        assert k8s["nodeAffinity"][0]["matchExpressions"][0]["operator"] == "NotIn"
    for name, k8s in executors.items():
        secrets = {s["secretName"] for s in k8s.get("secretAsEnv", [])}
        if name.startswith("exec-stand-in") or name.startswith("exec-tag-variant"):
            continue
        assert "medsight-s3-credentials" in secrets, name
        assert k8s["fieldPathAsEnv"][0]["name"] == "KFP_RUN_ID", name


def test_deployment_settings_from_file(tmp_path: Path) -> None:
    from pipelines.deployment import DeploymentSettings
    from pipelines.medsight_pipeline import PIPELINE_NAME, build_pipelines

    path = tmp_path / "cluster.yaml"
    path.write_text("gpu_node_label_key: cloud.google.com/gke-accelerator\ngpu_node_label_value: nvidia-h100-80gb\n")
    settings = DeploymentSettings.from_file(path)
    assert settings.gpu_node_label_key == "cloud.google.com/gke-accelerator"
    path.write_text("gpus: {v2t-align: 3}\n")
    with pytest.raises(ValueError, match="gpus.v2t-align=3"):
        DeploymentSettings.from_file(path)
    path.write_text("gpu_label: x\n")
    with pytest.raises(ValueError, match="unknown key 'gpu_label'"):
        DeploymentSettings.from_file(path)
    assert PIPELINE_NAME in build_pipelines(DeploymentSettings(gpu_image="example.org/m:1"), names=(PIPELINE_NAME,))


def test_compiled_yaml_holds_no_secrets() -> None:
    from medsight.platform.secret_scan import scan_text

    for path in COMPILED.glob("*.yaml"):
        text = path.read_text()
        assert scan_text(text, str(path)) == []
        # Credentials reach pods only as Secret references, never as values or parameters.
        assert not re.search(r"AWS_SECRET_ACCESS_KEY\s*[:=]\s*\S", text.replace("envVar: AWS_SECRET_ACCESS_KEY", "")
                             .replace("secretKey: AWS_SECRET_ACCESS_KEY", ""))
        assert "accessKey" not in text and "secret_key" not in text


@pytest.mark.parametrize("pipeline", ["medsight-pipeline", "medsight-ablation", "medsight-single-stage"])
def test_components_run_from_the_image_without_installing_packages(pipeline: str) -> None:
    # GPU node pools are often air-gapped: a pod that pip-installs kfp at start-up fails there,
    # and everywhere else it pays a pip run per task. The images already pin kfp.
    for name, executor in _compiled(pipeline)["deploymentSpec"]["executors"].items():
        script = " ".join(executor["container"].get("command", []) + executor["container"].get("args", []))
        assert "pip install" not in script and "ensurepip" not in script, name
