"""Components generated from the stage registry: one template, one component per stage.

KFP builds a lightweight component from a Python function and embeds that function's source in
the compiled YAML. The functions here are rendered from one template per kind, with each stage's
inputs and output types taken from ``medsight.stages.registry``, so adding a stage there adds its
component. They are lightweight (Python) components rather than container components because
``kfp.local``'s SubprocessRunner, which runs the pipeline on one machine without Docker (``make
pipeline``), only runs lightweight ones; the body is a call into the image's ``medsight``
package, which runs ``medsight stage run`` as a child process.
"""

from __future__ import annotations

import linecache
from typing import Any, NamedTuple

from kfp import dsl

# Placeholders: the pipeline builder sets the real images per task from DeploymentSettings.
GPU_IMAGE = "registry.example.com/medsight/medsight:0.1.0"
CPU_IMAGE = "registry.example.com/medsight/medsight-cpu:0.1.0"
ARTIFACT_TYPES = {"dataset": "dsl.Dataset", "model": "dsl.Model", "evaluation": "dsl.Artifact", "report": "dsl.Artifact"}

STAGE_TEMPLATE = '''
def {function}(
    preset: str,
    overrides: list,
{required}    output: dsl.Output[{output_type}],
    metrics: dsl.Output[dsl.Metrics],
    card: dsl.Output[dsl.HTML],
{optional}):
    """{description}"""
    from medsight.platform.kfp_component import run_component

    run_component({stage!r}, preset=preset, overrides=overrides, inputs={inputs}, output=output,
                  metrics=metrics, card=card{extra})
'''

PLAN_TEMPLATE = '''
def plan_variant(variant: str, preset: str, overrides: list, thresholds: dict) -> NamedTuple("VariantPlan", [{fields}]):
    """The overrides each stage reads: the variant's, then the run's (validated up front)."""
    from medsight.stages.cache_key import variant_plan

    plan = variant_plan(variant, preset, [str(o) for o in overrides], thresholds)
    return ({values})
'''


def python_name(stage: str) -> str:
    return stage.replace("-", "_")


def define(source: str, function: str) -> Any:
    """Execute generated source so that ``inspect.getsource`` (which KFP calls) can read it back."""
    filename = f"<medsight generated component {function}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"dsl": dsl, "NamedTuple": NamedTuple}
    # dont_inherit: this module's `from __future__ import annotations` would turn the generated
    # annotations into strings, which KFP cannot read as types.
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)  # noqa: S102 - our own template, rendered from the registry
    return namespace[function]


def stage_source(stage: str) -> str:
    from medsight.stages.registry import get_stage

    spec = get_stage(stage)
    kind = {name: get_stage(wanted.source).output for name, wanted in spec.inputs.items()}
    required = "".join(f"    {n}: dsl.Input[{ARTIFACT_TYPES[kind[n]]}],\n" for n in spec.required_inputs)
    optional = "".join(f"    {n}: dsl.Input[{ARTIFACT_TYPES[kind[n]]}] = None,\n" for n in spec.optional_inputs)
    if not spec.inputs:
        # A source stage can stand in a registered version (e.g. a dataset revision) for its output.
        optional += '    use_existing: str = "",\n'
    return STAGE_TEMPLATE.format(
        function=python_name(stage), stage=stage, required=required, optional=optional,
        output_type=ARTIFACT_TYPES[spec.output], description=spec.description,
        inputs="{" + ", ".join(f"{n!r}: {n}" for n in spec.input_names) + "}",
        extra="" if spec.inputs else ", use_existing=use_existing",
    )


def stage_component(stage: str) -> Any:
    """The KFP component of one registry stage."""
    function = define(stage_source(stage), python_name(stage))
    return dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)(function)


def plan_source() -> str:
    from medsight.stages.registry import STAGES

    fields = [f"(\"{python_name(s.name)}_overrides\", list)" for s in STAGES]
    values = [f"plan[{s.name!r}][\"overrides\"]" for s in STAGES]
    return PLAN_TEMPLATE.format(fields=", ".join(fields), values=", ".join(values))


def plan_component() -> Any:
    return dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)(define(plan_source(), "plan_variant"))


COMPARE_TEMPLATE = '''
def compare_variants(
    table: dsl.Output[dsl.Markdown],
{inputs}) -> str:
    """One row per ablation variant with its evaluation's headline metrics (shown in the KFP UI)."""
    from medsight.platform.kfp_component import compare_evaluations

    return compare_evaluations([{pairs}], table.path)
'''


def compare_component(variants: list[str]) -> Any:
    """The ablation table's component, one evaluation input per variant compiled in."""
    inputs = "".join(f"    {python_name(name)}: dsl.Input[dsl.Artifact],\n" for name in variants)
    pairs = ", ".join(f"({name!r}, {python_name(name)})" for name in variants)
    function = define(COMPARE_TEMPLATE.format(inputs=inputs, pairs=pairs), "compare_variants")
    return dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)(function)
