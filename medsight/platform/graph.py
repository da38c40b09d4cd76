"""One stage graph, three views: the registry, ``dvc.yaml`` and the compiled KFP DAG.

``dvc.yaml``/``params.yaml`` are rendered from the registry (``medsight platform dvc-files``):
each stage's ``params`` are its config view, its ``deps`` its inputs plus every ``medsight/``
file its code imports, so ``dvc repro`` recomputes a stage exactly when its cache key would
change. The functions here also extract (nodes, edges) from each view so a test can assert they
are identical. Edges are (upstream stage, downstream stage).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

Edge = tuple[str, str]
OUTPUTS_DIR = "outputs"
PARAMS_FILE = "params.yaml"


def registry_graph(variant: str = "full") -> tuple[set[str], set[Edge]]:
    from medsight.stages.registry import active_stages, get_variant, graph_edges

    drops = get_variant(variant).drops
    return {spec.name for spec in active_stages(drops)}, graph_edges(drops)


def render_dvc_yaml(variant: str = "full") -> str:
    """``dvc.yaml``: every stage the variant runs, as ``medsight stage run`` with deps/params/outs."""
    from medsight.stages.cache_key import code_files
    from medsight.stages.registry import active_stages, get_variant, input_sources

    drops = get_variant(variant).drops
    stages: dict[str, Any] = {}
    for spec in active_stages(drops):
        sources = {name: f"{OUTPUTS_DIR}/{source}" for name, source in input_sources(spec, drops).items()}
        command = [f"medsight stage run {spec.name} --out {OUTPUTS_DIR}/{spec.name} --config {PARAMS_FILE}"]
        command += [f"--input {name}={path}" for name, path in sources.items()]
        # A gate is a dep too: DVC orders stages by their deps alone.
        gates = [f"{OUTPUTS_DIR}/{gate}" for gate in spec.after if f"{OUTPUTS_DIR}/{gate}" not in sources.values()]
        stages[spec.name] = {
            "cmd": " ".join(command),
            "deps": [*code_files(spec), *sources.values(), *gates],
            "params": list(spec.reads),
            "outs": [f"{OUTPUTS_DIR}/{spec.name}"],
        }
    header = (
        f"# Generated from medsight/stages/registry.py (variant {variant}) by `medsight platform dvc-files`;\n"
        "# do not edit by hand. `dvc repro` runs the same stages as the KFP pipeline (pipelines/), without\n"
        "# Kubeflow: params = each stage's config view, deps = its inputs and every medsight/ file it runs.\n"
        "# tests/test_platform_graph.py keeps this graph, the registry and the compiled DAG identical.\n"
    )
    return header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=200)


def render_params_yaml(preset: str = "tiny", overrides: list[str] | None = None, variant: str = "full") -> str:
    from medsight.config import apply_overrides, get_preset, to_dict
    from medsight.stages.registry import get_variant

    config = apply_overrides(get_preset(preset), [*get_variant(variant).overrides, *(overrides or [])])
    header = (
        f"# The full resolved config (preset {preset}, variant {variant}); `dvc repro` reruns exactly the\n"
        "# stages whose view changed. Regenerate: medsight platform dvc-files --preset NAME [--variant V] [--set k=v]\n"
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
    for name in stage_names:
        python = name.replace("-", "_").replace("_", "-")
        if base == python or (base.startswith(python + "-") and base[len(python) + 1:].isdigit()):
            return name
    return None


def kfp_graph(compiled: Mapping[str, Any]) -> tuple[set[str], set[Edge]]:
    """Stages and data edges of a compiled pipeline, traced through If/Else, OneOf and sub-DAGs.

    A stand-in for a dropped stage forwards its source's artifact (a fallback) or none.
    """
    from medsight.stages.registry import STAGES

    stage_names = {spec.name for spec in STAGES}
    components = compiled["components"]
    nodes: set[str] = set()
    edges: set[Edge] = set()

    def resolve(binding: Mapping[str, Any], dag: Mapping[str, Any], ctx: Any) -> set[str]:
        if "componentInputArtifact" in binding:
            return ctx(binding["componentInputArtifact"]) if ctx else set()
        if "taskOutputArtifact" not in binding:
            return set()
        producer = binding["taskOutputArtifact"]["producerTask"]
        key = binding["taskOutputArtifact"]["outputArtifactKey"]
        task = dag["tasks"][producer]
        component = task["componentRef"]["name"]
        artifacts = task.get("inputs", {}).get("artifacts", {})
        spec = components[component]
        if "dag" in spec:
            child_ctx = _context(artifacts, dag, ctx)
            found: set[str] = set()
            for selector in spec["dag"]["outputs"]["artifacts"][key]["artifactSelectors"]:
                inner = {"taskOutputArtifact": {"producerTask": selector["producerSubtask"],
                                                "outputArtifactKey": selector["outputArtifactKey"]}}
                found |= resolve(inner, spec["dag"], child_ctx)
            return found
        stage = _stage_of(component, stage_names)
        if stage is not None:
            return {stage}
        # A forwarding stand-in passes its source on; an "absent" one passes nothing.
        return resolve(artifacts["source"], dag, ctx) if "source" in artifacts else set()

    def _context(artifacts: Mapping[str, Any], dag: Mapping[str, Any], ctx: Any) -> Any:
        return lambda name: resolve(artifacts[name], dag, ctx) if name in artifacts else set()

    def walk(dag: Mapping[str, Any], ctx: Any) -> None:
        for task in dag["tasks"].values():
            component = task["componentRef"]["name"]
            artifacts = task.get("inputs", {}).get("artifacts", {})
            spec = components[component]
            if "dag" in spec:
                walk(spec["dag"], _context(artifacts, dag, ctx))
                continue
            stage = _stage_of(component, stage_names)
            if stage is None:
                continue
            nodes.add(stage)
            for name, binding in artifacts.items():
                edges.update((upstream, stage) for upstream in resolve(binding, dag, ctx))
            for dependency in task.get("dependentTasks", []):  # gates (.after), besides the data edges
                upstream = _stage_of(dag["tasks"][dependency]["componentRef"]["name"], stage_names)
                if upstream is not None:
                    edges.add((upstream, stage))

    walk(compiled["root"]["dag"], None)
    return nodes, edges
