"""The MedSIGHT DAGs for Kubeflow Pipelines, wired from the stage registry.

- ``medsight-pipeline``: every stage of one variant (``full`` unless compiled with another), its
  DAG exactly the registry's graph for that variant. Its first task plans the run: the overrides
  each stage reads (the variant's, then the run's). Each stage gets only those, so a setting a
  stage does not read leaves its KFP cache key alone.
- ``medsight-ablation``: registry variants side by side (all of them, or those named in the
  deployment settings at compile time). A stage that several variants run identically is one
  task, computed once; a table compares the evaluations.
- ``medsight-single-stage``: one stage, its inputs given as DVC references.

Stages pass typed artifacts (Dataset/Model) whose metadata holds the output's DVC hash and
store URI, so the KFP UI's lineage graph connects; the bytes live in the DVC remote. A variant
is a static DAG, not a runtime branch (``medsight platform compile --variant NAME``): a dropped
stage's consumers read its registry fallback or run without the input.
"""

# No `from __future__ import annotations`: KFP reads the parameter annotations as types.
import threading
from collections.abc import Callable
from typing import Any

from kfp import dsl

from components import compare_component, plan_component, stage_component, stage_from_refs
from components.generate import python_name
from medsight.stages.lineage import VARIANT_ENV
from pipelines.deployment import DeploymentSettings, configure_helper, configure_reader, configure_stage

PIPELINE_NAME = "medsight-pipeline"
ABLATION_NAME = "medsight-ablation"
SINGLE_STAGE_NAME = "medsight-single-stage"
ALL_PIPELINES = (PIPELINE_NAME, ABLATION_NAME, SINGLE_STAGE_NAME)


def build_pipelines(
    settings: DeploymentSettings | None = None, names: tuple[str, ...] | None = None, variant: str = "full"
) -> dict[str, Callable[..., Any]]:
    """The pipelines (all, or ``names``) with ``settings`` baked in (compile-time by KFP's design);
    ``medsight-pipeline`` is built for ``variant``.

    Built in a fresh thread: KFP's task setters call ``inspect.stack()`` only to name their
    caller in an error message, and that reads the source of every frame on the stack; under a
    test runner or a CLI the stack is deep enough to make building take many seconds.
    """
    settings = settings or DeploymentSettings()
    settings.validate()
    built: dict[str, Any] = {}
    failure: list[BaseException] = []

    def build() -> None:
        try:
            built.update(_build(settings, names or ALL_PIPELINES, variant))
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)

    worker = threading.Thread(target=build, name="build-pipelines")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return built


def wire_variants(
    settings: DeploymentSettings, variants: list[str], preset: Any, overrides: Any, data_revision: Any,
    thresholds: Any = None,
) -> dict[str, Any]:
    """Every stage of every variant as a task, each input from its registry source; returns each
    variant's evaluation output.

    A stage that two variants would run identically (same stage, same overrides of the variant
    within its view, same upstream tasks) is one task shared by both, so it is computed once.
    """
    from medsight.stages.cache_key import relevant_overrides
    from medsight.stages.registry import active_stages, evaluation_stage, get_variant, input_sources

    tasks: dict[tuple, Any] = {}  # node identity -> the stage's task
    evaluations: dict[str, Any] = {}
    for name in variants:
        variant = get_variant(name)
        plan = configure_helper(plan_component()(variant=name, preset=preset, overrides=overrides,
                                                 thresholds=thresholds if thresholds is not None else {}),
                                settings, f"plan {name}")
        outputs: dict[str, tuple] = {}  # stage -> node identity, within this variant
        for spec in active_stages(variant.drops):
            sources = input_sources(spec, variant.drops)
            identity = (spec.name, tuple(relevant_overrides(spec, variant.overrides)),
                        tuple(sorted((input_name, outputs[source]) for input_name, source in sources.items())),
                        tuple(outputs[gate] for gate in spec.after if gate in outputs))
            if identity not in tasks:
                arguments: dict[str, Any] = {"preset": preset,
                                             "overrides": plan.outputs[f"{python_name(spec.name)}_overrides"]}
                arguments.update({input_name: tasks[outputs[source]].outputs["output"]
                                  for input_name, source in sources.items()})
                if not spec.inputs:
                    arguments["use_existing"] = data_revision
                task = configure_stage(stage_component(spec.name)(**arguments), spec, settings)
                for gate in spec.after:
                    if gate in outputs:
                        task.after(tasks[outputs[gate]])
                if spec.name == evaluation_stage().name:
                    # Names the report's table row; an environment variable, not a parameter,
                    # so it never changes a cache key.
                    task.set_env_variable(VARIANT_ENV, name)
                tasks[identity] = task
            outputs[spec.name] = identity
        evaluations[name] = tasks[outputs[evaluation_stage().name]].outputs["output"]
    return evaluations


def variant_pipeline(settings: DeploymentSettings, variant: str) -> Callable[..., Any]:
    """One variant's DAG as a pipeline."""

    def medsight_variant(
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006 - KFP parameter default, never mutated
        data_revision: str = "",
        register_thresholds: dict = {},  # noqa: B006
    ) -> dsl.Artifact:
        """Train and evaluate MedSIGHT, then register the model if it clears the thresholds.

        Args:
            preset: Config preset: tiny (CPU, minutes), full (H100, paper scale) or full-qwen2.5.
            overrides: Config overrides as key.path=value strings, e.g. model.codebook.codes_per_modality=16.
            data_revision: A registered dataset version (DVC md5 or run:<id>/synth-data) used instead of generating one.
            register_thresholds: Minimum evaluation metrics for registering the model in the MLflow registry, e.g. {"seg_dice": 0.5, "closed_accuracy": 0.75}; empty = register whatever it scores.
        """
        return wire_variants(settings, [variant], preset, overrides, data_revision, register_thresholds)[variant]

    name = PIPELINE_NAME if variant == "full" else f"{PIPELINE_NAME}-{variant}"
    description = f"MedSIGHT, variant {variant}: every stage from data to evaluation, DVC-versioned."
    return dsl.pipeline(name=name, description=description)(medsight_variant)


def _build(settings: DeploymentSettings, names: tuple[str, ...], variant: str = "full") -> dict[str, Callable[..., Any]]:
    from medsight.stages.registry import STAGES

    built: dict[str, Callable[..., Any]] = {}
    if PIPELINE_NAME in names:
        built[PIPELINE_NAME] = variant_pipeline(settings, variant)
    variants = settings.ablation_variant_names()
    compare = compare_component(variants)

    def medsight_ablation(
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006
        data_revision: str = "",
    ) -> str:
        """Ablation variants side by side (those compiled in), sharing the stages they have in common.

        Args:
            preset: Config preset: tiny (CPU, minutes), full (H100, paper scale) or full-qwen2.5.
            overrides: Config overrides applied to every variant, as key.path=value strings.
            data_revision: A registered dataset version (DVC md5 or run:<id>/synth-data) shared by all variants.
        """
        evaluations = wire_variants(settings, variants, preset, overrides, data_revision)
        table = compare(**{python_name(name): evaluation for name, evaluation in evaluations.items()})
        return configure_reader(table, settings, "compare variants").outputs["Output"]

    def medsight_single_stage(
        stage_name: str = STAGES[0].name,
        inputs: dict = {},  # noqa: B006
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006
    ) -> None:
        """Run one stage from DVC references to its inputs (restored from the run-cache when unchanged).

        Args:
            stage_name: The stage to run (`medsight stage list`).
            inputs: Input name to DVC reference, e.g. {"data": "run:<id>/synth-data", "base": "<md5>.dir"}.
            preset: Config preset: tiny, full or full-qwen2.5.
            overrides: Config overrides as key.path=value strings.
        """
        # One branch per stage, so each stage keeps its own pool, GPU count and timeout.
        for index, spec in enumerate(STAGES):
            branch = dsl.If if index == 0 else dsl.Elif
            with branch(stage_name == spec.name, name=spec.name):
                task = stage_from_refs(stage=spec.name, inputs=inputs, preset=preset, overrides=overrides)
                configure_stage(task, spec, settings)
        with dsl.Else(name="unknown-stage"):
            # Fails fast with the list of valid stage names.
            unknown = stage_from_refs(stage=stage_name, inputs=inputs, preset=preset, overrides=overrides)
            configure_reader(unknown, settings, "unknown stage")

    # Decorating builds the graph, so only what was asked for is decorated.
    if ABLATION_NAME in names:
        built[ABLATION_NAME] = dsl.pipeline(name=ABLATION_NAME)(medsight_ablation)
    if SINGLE_STAGE_NAME in names:
        built[SINGLE_STAGE_NAME] = dsl.pipeline(name=SINGLE_STAGE_NAME)(medsight_single_stage)
    return {name: built[name] for name in names}
