"""Small non-stage components: ablation stand-ins, single-stage runs, ablation comparison."""


from typing import NamedTuple

from kfp import dsl

from components.stages import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def stand_in(stage: str, ref: str = "") -> str:
    """Output of a stage an ablation switched off: nothing, or another stage's output instead."""
    from medsight.platform.component_runtime import stand_in as run

    return run(stage, ref)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def stage_from_refs(
    stage: str,
    inputs: dict,
    preset: str,
    overrides: list,
    output: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Any one stage, its inputs given as DVC references: {"data": "<md5>.dir" | "run:<id>/<stage>" | JSON ref}."""
    from medsight.platform.component_runtime import run_component

    return run_component(stage, {k: str(v) for k, v in inputs.items()}, preset=preset, overrides=overrides,
                         output=output, metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def merge_overrides(base: list, extra: list) -> list:
    """Pipeline-wide overrides followed by a variant's own (later ones win)."""
    return [*base, *extra]


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tag_variant(name: str, evaluation: str) -> str:
    """Pair a variant's name with its evaluation output, so collected results stay labelled."""
    import json

    return json.dumps({"name": name, "evaluation": evaluation})


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def compare_variants(results: list, table: dsl.Output[dsl.Markdown]) -> str:
    """One row per ablation variant with its evaluation metrics (Markdown shown in the KFP UI)."""
    from medsight.platform.component_runtime import compare_evaluations

    return compare_evaluations(results, table.path)
