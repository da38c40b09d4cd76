"""The MedSIGHT DAG(s) for Kubeflow Pipelines.

- ``medsight-pipeline``: all stages, with ablation switches. Stage 3 (v2t-align) depends only
  on the perceiver, so it runs in parallel with stage 2 (codebook-pretrain) and the grounding
  data. Skipped stages are ``dsl.If``/``Else`` branches whose Else yields "" (input absent) or,
  for "without stage 5", the stage-4 model, merged with ``dsl.OneOf``.
- ``medsight-ablation``: several variants (overrides + switches) of that DAG side by side. The
  shared upstream stages have identical run-cache keys across variants, so they are computed
  once and restored everywhere else; a table compares the evaluations.
- ``medsight-single-stage``: one stage, inputs given as DVC references (md5 or run:<id>/<stage>).

Stages pass DVC references (JSON strings) rather than KFP artifacts between them: DVC is the
artifact store, and content-hash references make KFP's cache content-addressed. Each stage still
emits its ``.dvc`` pointer as an output artifact and its metrics as a Metrics artifact.
"""

# No `from __future__ import annotations`: KFP reads the parameter annotations as types.
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from kfp import dsl

from components import STAGE_COMPONENTS, compare_variants, merge_overrides, stage_from_refs, stand_in, tag_variant
from pipelines.deployment import DeploymentSettings, configure_helper, configure_reader, configure_stage

PIPELINE_NAME = "medsight-pipeline"
ABLATION_DESCRIPTION = "MedSIGHT ablations sharing their unchanged upstream stages."
SINGLE_DESCRIPTION = "Run one stage from DVC references to its inputs."
ABLATION_NAME = "medsight-ablation"
SINGLE_STAGE_NAME = "medsight-single-stage"

# Paper ablations on top of the chosen preset (App. F). Every variant lists every field because
# loop items are accessed field by field.
VARIANT_FIELDS = {
    "overrides": [],
    "codebook_size": 0,
    "two_way": True,
    "region_embeddings": True,
    "grounding_mode": "codebook",
    "skip_v2t_align": False,
    "skip_t2v_align": False,
    "skip_instruct_tune": False,
}


def variant(name: str, **changes: Any) -> dict[str, Any]:
    unknown = sorted(set(changes) - set(VARIANT_FIELDS))
    if unknown:
        raise ValueError(f"ablation variant {name!r}: unknown field {unknown[0]!r}; fields: {', '.join(VARIANT_FIELDS)}")
    # "label", not "name": a loop item's ``.name`` is the KFP channel's own name attribute.
    return {"label": name, **VARIANT_FIELDS, **changes}


DEFAULT_VARIANTS = [
    variant("full"),
    variant("codebook-8", codebook_size=8),
    variant("one-way-decoder", two_way=False),
    variant("no-region-embeddings", region_embeddings=False),
    variant("seg-token", grounding_mode="seg_token"),
    variant("without-stage-3", skip_v2t_align=True),
    variant("without-stage-4", skip_t2v_align=True),
    variant("without-stage-5", skip_instruct_tune=True),
]


@contextlib.contextmanager
def _fast_container_checks() -> Iterator[None]:
    """Skip KFP's ``inspect.stack()`` in task setters while building (same check, no stack walk).

    ``PipelineTask._ensure_container_spec_exists`` walks the whole stack (~0.1 s per call on a
    loaded 2-core machine) only to name the caller in an error message; with ~10 setters per
    task that made building the DAG take 10+ s. The check itself is kept.
    """
    original = getattr(dsl.PipelineTask, "_ensure_container_spec_exists", None)
    if original is None:  # a newer KFP without the private helper: nothing to speed up
        yield
        return

    def check(self: dsl.PipelineTask) -> None:
        if self.container_spec is None:
            raise ValueError("resource/image settings can only be used on single-step components")

    dsl.PipelineTask._ensure_container_spec_exists = check  # type: ignore[method-assign]
    try:
        yield
    finally:
        dsl.PipelineTask._ensure_container_spec_exists = original  # type: ignore[method-assign]


def build_pipelines(
    settings: DeploymentSettings | None = None, names: tuple[str, ...] | None = None
) -> dict[str, Callable[..., Any]]:
    """The pipelines (all, or ``names``) with ``settings`` baked in (compile-time by KFP's design)."""
    with _fast_container_checks():
        return _build(settings or DeploymentSettings(), names or (PIPELINE_NAME, ABLATION_NAME, SINGLE_STAGE_NAME))


def _build(settings: DeploymentSettings, names: tuple[str, ...]) -> dict[str, Callable[..., Any]]:
    settings.validate()
    c = STAGE_COMPONENTS

    def stage(name: str, **kwargs: Any) -> dsl.PipelineTask:
        return configure_stage(c[name](**kwargs), name, settings)

    @dsl.pipeline(name=PIPELINE_NAME, description="MedSIGHT: every stage from data to evaluation, DVC-versioned.")
    def medsight_pipeline(
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006 - KFP parameter default, never mutated
        data_revision: str = "",
        codebook_size: int = 0,
        two_way: bool = True,
        region_embeddings: bool = True,
        grounding_mode: str = "codebook",
        skip_v2t_align: bool = False,
        skip_t2v_align: bool = False,
        skip_instruct_tune: bool = False,
    ) -> str:
        common = {"preset": preset, "overrides": overrides}
        data = stage("synth-data", data_revision=data_revision, **common)
        d = data.outputs["ref"]
        base = stage("base-models", data=d, **common)
        b = base.outputs["ref"]
        perceiver = stage("perceiver-pretrain", data=d, base=b, two_way=two_way, **common)
        p = perceiver.outputs["ref"]
        codebook = stage("codebook-pretrain", data=d, base=b, perceiver=p, two_way=two_way,
                         codebook_size=codebook_size, **common)
        cb = codebook.outputs["ref"]
        with dsl.If(skip_v2t_align == False, name="with-stage-3"):  # noqa: E712 - KFP condition
            v2t = stage("v2t-align", data=d, base=b, perceiver=p, two_way=two_way,
                        region_embeddings=region_embeddings, **common)
        with dsl.Else(name="without-stage-3"):
            no_v2t = configure_helper(stand_in(stage="v2t-align"), settings, "skip v2t-align")
        v2t_ref = dsl.OneOf(v2t.outputs["ref"], no_v2t.output)
        grounding = stage("grounding-data", data=d, base=b, codebook=cb, two_way=two_way,
                          codebook_size=codebook_size, grounding_mode=grounding_mode, **common)
        g = grounding.outputs["ref"]
        model_params = {"two_way": two_way, "codebook_size": codebook_size,
                        "region_embeddings": region_embeddings, "grounding_mode": grounding_mode, **common}
        with dsl.If(skip_t2v_align == False, name="with-stage-4"):  # noqa: E712
            t2v = stage("t2v-align", data=d, base=b, codebook=cb, grounding=g, v2t=v2t_ref, **model_params)
        with dsl.Else(name="without-stage-4"):
            no_t2v = configure_helper(stand_in(stage="t2v-align"), settings, "skip t2v-align")
        t2v_ref = dsl.OneOf(t2v.outputs["ref"], no_t2v.output)
        with dsl.If(skip_instruct_tune == False, name="with-stage-5"):  # noqa: E712
            instruct = stage("instruct-tune", data=d, base=b, codebook=cb, grounding=g, v2t=v2t_ref, t2v=t2v_ref,
                             **model_params)
        with dsl.Else(name="without-stage-5"):
            # "Without stage 5" evaluates the stage-4 model as it is.
            use_t2v = configure_helper(stand_in(stage="instruct-tune", ref=t2v_ref), settings, "skip instruct-tune")
        model_ref = dsl.OneOf(instruct.outputs["ref"], use_t2v.output)
        evaluation = stage("evaluate", data=d, base=b, model=model_ref, grounding=g, **common)
        return evaluation.outputs["ref"]

    built: dict[str, Callable[..., Any]] = {PIPELINE_NAME: medsight_pipeline}

    def medsight_ablation(
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006
        data_revision: str = "",
        variants: list = DEFAULT_VARIANTS,  # noqa: B006
    ) -> str:
        with dsl.ParallelFor(variants, parallelism=settings.ablation_parallelism) as item:
            merged = configure_helper(merge_overrides(base=overrides, extra=item.overrides), settings, "overrides")
            chain = medsight_pipeline(
                preset=preset,
                overrides=merged.output,
                data_revision=data_revision,
                codebook_size=item.codebook_size,
                two_way=item.two_way,
                region_embeddings=item.region_embeddings,
                grounding_mode=item.grounding_mode,
                skip_v2t_align=item.skip_v2t_align,
                skip_t2v_align=item.skip_t2v_align,
                skip_instruct_tune=item.skip_instruct_tune,
            )
            labelled = configure_helper(tag_variant(name=item.label, evaluation=chain.output), settings, "label")
        table = configure_reader(compare_variants(results=dsl.Collected(labelled.output)), settings, "compare variants")
        return table.outputs["Output"]

    def medsight_single_stage(
        stage_name: str = "perceiver-pretrain",
        inputs: dict = {},  # noqa: B006 - e.g. {"data": "run:<id>/synth-data", "base": "<md5>.dir"}
        preset: str = "tiny",
        overrides: list = [],  # noqa: B006
    ) -> None:
        # One branch per stage, so each stage keeps its own pool, GPU count and timeout.
        for index, name in enumerate(STAGE_COMPONENTS):
            branch = dsl.If if index == 0 else dsl.Elif
            with branch(stage_name == name, name=name):
                task = stage_from_refs(stage=name, inputs=inputs, preset=preset, overrides=overrides)
                configure_stage(task, name, settings)
        with dsl.Else(name="unknown-stage"):
            # Fails fast with the list of valid stage names.
            unknown = stage_from_refs(stage=stage_name, inputs=inputs, preset=preset, overrides=overrides)
            configure_reader(unknown, settings, "unknown stage")

    # Decorating builds the graph (seconds), so only what was asked for is decorated.
    if ABLATION_NAME in names:
        built[ABLATION_NAME] = dsl.pipeline(name=ABLATION_NAME, description=ABLATION_DESCRIPTION)(medsight_ablation)
    if SINGLE_STAGE_NAME in names:
        built[SINGLE_STAGE_NAME] = dsl.pipeline(name=SINGLE_STAGE_NAME, description=SINGLE_DESCRIPTION)(
            medsight_single_stage
        )
    return {name: built[name] for name in names}


_BUILT: dict[str, Callable[..., Any]] = {}
_ATTRIBUTES = {"medsight_pipeline": PIPELINE_NAME, "medsight_ablation": ABLATION_NAME,
               "medsight_single_stage": SINGLE_STAGE_NAME}


def __getattr__(attribute: str) -> Callable[..., Any]:
    """``medsight_pipeline`` etc. with default settings, built on first use (building takes seconds)."""
    if attribute not in _ATTRIBUTES:
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
    name = _ATTRIBUTES[attribute]
    if name not in _BUILT:
        _BUILT.update(build_pipelines(names=(name,)))
    return _BUILT[name]
