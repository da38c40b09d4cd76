"""The stage graph is the same in the registry, dvc.yaml, the chain and the compiled KFP DAGs; golden YAML is current."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

from medsight.platform.graph import dvc_graph, kfp_graph, registry_graph, render_dvc_yaml, render_params_yaml
from medsight.stages.registry import STAGES, VARIANTS, get_variant

ROOT = Path(__file__).resolve().parents[1]
COMPILED = ROOT / "pipelines" / "compiled"


def _compiled(name: str) -> dict:
    return next(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))


def _platform(name: str) -> dict:
    return list(yaml.safe_load_all((COMPILED / f"{name}.yaml").read_text()))[1]["platforms"]["kubernetes"]


def test_dvc_yaml_graph_equals_registry() -> None:
    nodes, edges = registry_graph()
    dvc_nodes, dvc_edges = dvc_graph(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    assert dvc_nodes == nodes
    assert dvc_edges == edges


@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_every_variant_has_the_same_graph_in_kfp_dvc_and_the_chain(variant: str, tmp_path: Path) -> None:
    from medsight.stages.registry import active_stages, input_sources
    from pipelines.medsight_pipeline import PIPELINE_NAME, build_pipelines

    nodes, edges = registry_graph(variant)
    drops = get_variant(variant).drops
    # The chain walks exactly these stages, in an order that respects every edge (data and gates).
    chain = [spec.name for spec in active_stages(drops)]
    chain_edges = {(src, spec.name) for spec in active_stages(drops) for src in input_sources(spec, drops).values()}
    assert set(chain) == nodes and chain_edges <= edges
    assert all(chain.index(upstream) < chain.index(downstream) for upstream, downstream in edges)
    assert dvc_graph(yaml.safe_load(render_dvc_yaml(variant))) == (nodes, edges)
    from kfp import compiler

    pipeline = build_pipelines(names=(PIPELINE_NAME,), variant=variant)[PIPELINE_NAME]
    compiler.Compiler().compile(pipeline, str(tmp_path / "p.yaml"))
    assert kfp_graph(next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))) == (nodes, edges)
    if variant == "without-stage-5":
        assert ("t2v-align", "evaluate") in edges  # the registry's fallback: evaluate the stage-4 model


def test_compiled_kfp_dags_equal_registry() -> None:
    assert kfp_graph(_compiled("medsight-pipeline")) == registry_graph()
    # The ablation pipeline holds every variant's DAG.
    ablation_nodes, ablation_edges = kfp_graph(_compiled("medsight-ablation"))
    assert ablation_nodes == {spec.name for spec in STAGES}
    assert ablation_edges == set().union(*(registry_graph(v.name)[1] for v in VARIANTS))
    # One evaluation per variant, but a stage that variants run identically is one shared task.
    tasks = [t["componentRef"]["name"] for t in _compiled("medsight-ablation")["root"]["dag"]["tasks"].values()]
    assert sum(name.startswith("comp-evaluate") for name in tasks) == len(VARIANTS)
    assert sum(name.startswith("comp-synth-data") for name in tasks) == 1
    # two_way changes the perceiver, qwen2 its base models; every other variant shares one perceiver.
    assert sum(name.startswith("comp-perceiver-pretrain") for name in tasks) == 3


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
        assert stage["params"] == list(get_stage(name).reads)
    load_config(ROOT / "params.yaml")  # params.yaml is a complete, valid config


def test_dvc_yaml_deps_cover_each_stage_code() -> None:
    """Every medsight/ file a stage's module imports (at any depth, lazily or not) is a dep."""
    import ast

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for spec in STAGES:
        deps = set(stages[spec.name]["deps"])
        module = spec.entrypoint.split(":")[0]
        assert module.replace(".", "/") + ".py" in deps, spec.name
        # Independently of cache_key.code_files: every medsight import in every dep file is a dep.
        for dep in (d for d in deps if d.endswith(".py")):
            for node in ast.walk(ast.parse((ROOT / dep).read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    if name.startswith("medsight"):
                        path = name.replace(".", "/")
                        assert f"{path}.py" in deps or f"{path}/__init__.py" in deps, (spec.name, dep, name)
    assert "medsight/model/llm.py" not in set(stages["perceiver-pretrain"]["deps"])  # precise, not "all of medsight"


def test_golden_yaml_is_current_and_deterministic() -> None:
    from pipelines.compile import stale_files

    assert stale_files() == [], "run: python -m pipelines.compile"


def test_components_are_generated_from_the_registry() -> None:
    from components import stage_component

    for spec in STAGES:
        component = stage_component(spec.name)
        params = inspect.signature(component.python_func).parameters
        assert set(spec.input_names) <= set(params), spec.name
        for name in spec.optional_inputs:
            assert params[name].default is None, (spec.name, name)
        for name in spec.required_inputs:
            assert params[name].default is inspect.Parameter.empty, (spec.name, name)
        assert {"preset", "overrides", "output", "metrics", "card"} <= set(params)


def test_each_stage_gets_only_the_overrides_it_reads() -> None:
    from medsight.stages.cache_key import variant_plan

    plan = variant_plan("codebook-8", "tiny", ["model.patch_merge=2", "perceiver_pretrain.epochs=1"])
    assert plan["perceiver-pretrain"]["overrides"] == ["perceiver_pretrain.epochs=1"]
    # Stage 3 has no region tokens yet, so the codebook size is not among its settings.
    assert plan["v2t-align"]["overrides"] == ["model.patch_merge=2"]
    assert plan["t2v-align"]["overrides"] == ["model.codebook.codes_per_modality=8", "model.patch_merge=2"]
    assert plan["synth-data"]["overrides"] == [] and plan["evaluate"]["overrides"] == []
    with pytest.raises(Exception, match="unknown config key model.nope"):
        variant_plan("full", "tiny", ["model.nope=1"])


def test_gpu_and_cpu_scheduling() -> None:
    from pipelines.deployment import DeploymentSettings

    settings = DeploymentSettings()
    spec = _compiled("medsight-pipeline")
    executors = _platform("medsight-pipeline")["deploymentSpec"]["executors"]
    gpu_stages = {s.name: settings.gpus_for(s) for s in STAGES if settings.gpus_for(s)}
    assert gpu_stages == {"perceiver-pretrain": 1, "codebook-pretrain": 1, "v2t-align": 8, "t2v-align": 8,
                          "instruct-tune": 8, "evaluate": 1}
    for stage, gpus in gpu_stages.items():
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
        if name.startswith("exec-plan-variant") or name.startswith("exec-tag-variant"):
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
    path.write_text("gpus: {synth-data: 1}\n")
    with pytest.raises(ValueError, match="CPU stage"):
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


def test_no_stage_wiring_outside_the_registry() -> None:
    """components/, pipelines/ and medsight/platform/ name no stage in code: they derive it all."""
    import ast

    names = {spec.name for spec in STAGES} | {spec.name.replace("-", "_") for spec in STAGES}
    for folder in ("components", "pipelines", "medsight/platform"):
        for path in (ROOT / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                          if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                          and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and id(node) not in docstrings and node.value in names:
                    raise AssertionError(f"{path.relative_to(ROOT)}:{node.lineno} names stage {node.value!r}")
