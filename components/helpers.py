"""Bookkeeping components written by hand: a stage run from DVC references."""

from kfp import dsl

from components.generate import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def stage_from_refs(
    stage: str,
    inputs: dict,
    preset: str,
    overrides: list,
    output: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    card: dsl.Output[dsl.HTML],
):
    """Any one stage, its inputs given as DVC references: {"data": "<md5>.dir" | "run:<id>/<stage>"}."""
    from medsight.platform.kfp_component import run_component

    run_component(stage, preset=preset, overrides=overrides, inputs={k: str(v) for k, v in inputs.items()},
                  output=output, metrics=metrics, card=card)
