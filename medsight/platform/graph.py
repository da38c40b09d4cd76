"""One stage graph, three views: the registry, ``dvc.yaml`` and the compiled KFP DAG.

``dvc.yaml``/``params.yaml`` are generated from the registry (``medsight platform dvc-files``)
and the KFP pipeline wires the same inputs; the functions here extract (nodes, edges) from each
so a test can assert they are identical. Edges are (upstream stage, downstream stage).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml

Edge = tuple[str, str]
# "Without stage 5" evaluates the stage-4 model; only the KFP DAG (an If/Else branch) and the
# in-process chain express that alternative, so it is the one edge allowed beyond the registry.
ABLATION_EDGES: frozenset[Edge] = frozenset({("t2v-align", "evaluate")})
OUTPUTS_DIR = "outputs"
PARAMS_FILE = "params.yaml"


def registry_graph() -> tuple[set[str], set[Edge]]:
    from medsight.stages.chain import INPUT_SOURCES
    from medsight.stages.registry import STAGES

    nodes = {spec.name for spec in STAGES}
    edges = {(INPUT_SOURCES[name], spec.name) for spec in STAGES for name in spec.inputs}
    return nodes, edges


# -- DVC ---------------------------------------------------------------------------------
def _module_file(entrypoint: str) -> str:
    return entrypoint.split(":")[0].replace(".", "/") + ".py"


def render_dvc_yaml() -> str:
    """``dvc.yaml``: every registry stage as ``medsight stage run`` with deps/params/outs."""
    from medsight.stages.chain import INPUT_SOURCES
    from medsight.stages.registry import STAGES

    stages: dict[str, Any] = {}
    for spec in STAGES:
        sources = {name: f"{OUTPUTS_DIR}/{INPUT_SOURCES[name]}" for name in spec.inputs}
        command = [f"medsight stage run {spec.name} --out {OUTPUTS_DIR}/{spec.name} --config {PARAMS_FILE}"]
        command += [f"--input {name}={path}" for name, path in sources.items()]
        stages[spec.name] = {
            "cmd": " ".join(command),
            "deps": [_module_file(spec.entrypoint), *sources.values()],
            "params": list(spec.config_sections),
            "outs": [f"{OUTPUTS_DIR}/{spec.name}"],
        }
    header = (
        "# Generated from medsight/stages/registry.py by `medsight platform dvc-files`; do not edit by hand.\n"
        "# `dvc repro` runs the same stages as the KFP pipeline (pipelines/), without Kubeflow;\n"
        "# tests/test_platform_graph.py keeps this graph, the registry and the compiled DAG identical.\n"
    )
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=200)


def render_params_yaml(preset: str = "tiny", overrides: list[str] | None = None) -> str:
    from medsight.config import apply_overrides, get_preset, to_dict

    config = apply_overrides(get_preset(preset), overrides or [])
    header = (
        f"# The full resolved config (preset {preset}); `dvc repro` reruns exactly the stages whose\n"
        "# sections changed. Regenerate: medsight platform dvc-files --preset NAME [--set k=v ...]\n"
    )
    return header + yaml.safe_dump(to_dict(config), sort_keys=False)


def dvc_graph(dvc_yaml: Mapping[str, Any]) -> tuple[set[str], set[Edge]]:
    stages = dvc_yaml["stages"]
    producers = {out: name for name, stage in stages.items() for out in stage.get("outs", [])}
    edges = {(producers[dep], name) for name, stage in stages.items() for dep in stage.get("deps", []) if dep in producers}
    return set(stages), edges


# -- KFP ---------------------------------------------------------------------------------
def _stage_of(component: str, stage_names: set[str]) -> str | None:
    base = component.removeprefix("comp-")
    if base in stage_names:
        return base
    trimmed = re.sub(r"-\d+$", "", base)
    return trimmed if trimmed in stage_names else None


def kfp_graph(compiled: Mapping[str, Any]) -> tuple[set[str], set[Edge]]:
    """Stages and data edges of a compiled pipeline, traced through If/Else, OneOf and sub-DAGs."""
    stage_names, _ = registry_graph()
    components = compiled["components"]
    nodes: set[str] = set()
    edges: set[Edge] = set()

    def resolve(binding: Mapping[str, Any], dag: Mapping[str, Any], ctx: Any) -> set[str]:
        if "componentInputParameter" in binding:
            return ctx(binding["componentInputParameter"]) if ctx else set()
        if "taskOutputParameter" not in binding:
            return set()
        producer = binding["taskOutputParameter"]["producerTask"]
        key = binding["taskOutputParameter"]["outputParameterKey"]
        task = dag["tasks"][producer]
        component = task["componentRef"]["name"]
        params = task.get("inputs", {}).get("parameters", {})
        spec = components[component]
        if "dag" in spec:
            child_ctx = _context(params, dag, ctx)
            selector = spec["dag"]["outputs"]["parameters"][key]
            if "valueFromParameter" in selector:
                sources = [selector["valueFromParameter"]]
            else:
                sources = selector["valueFromOneof"]["parameterSelectors"]
            found: set[str] = set()
            for source in sources:
                inner = {"taskOutputParameter": {"producerTask": source["producerSubtask"],
                                                 "outputParameterKey": source["outputParameterKey"]}}
                found |= resolve(inner, spec["dag"], child_ctx)
            return found
        stage = _stage_of(component, stage_names)
        if stage is not None:
            return {stage}
        # A stand-in forwards the reference it was given (or none).
        return resolve(params["ref"], dag, ctx) if "ref" in params else set()

    def _context(params: Mapping[str, Any], dag: Mapping[str, Any], ctx: Any) -> Any:
        return lambda name: resolve(params[name], dag, ctx) if name in params else set()

    def walk(dag: Mapping[str, Any], ctx: Any) -> None:
        for task in dag["tasks"].values():
            component = task["componentRef"]["name"]
            params = task.get("inputs", {}).get("parameters", {})
            spec = components[component]
            if "dag" in spec:
                walk(spec["dag"], _context(params, dag, ctx))
                continue
            stage = _stage_of(component, stage_names)
            if stage is None:
                continue
            nodes.add(stage)
            from medsight.stages.registry import get_stage

            for name in get_stage(stage).inputs:
                if name in params:
                    edges.update((upstream, stage) for upstream in resolve(params[name], dag, ctx))

    walk(compiled["root"]["dag"], None)
    return nodes, edges
