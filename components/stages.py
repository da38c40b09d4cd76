"""One KFP v2 lightweight component per MedSIGHT stage.

Each is a thin mapping from KFP parameters to ``medsight.platform.component_runtime``: inputs are
DVC references (JSON strings; "" = left out by an ablation), the output artifact is the stage's
``.dvc`` pointer, and ``ref``/``cached`` go downstream. KFP embeds only the function source in the
pipeline YAML, so imports happen inside the body and the code itself comes from the image.

A component takes only the pipeline hyperparameters its stage's config sections contain (see
``component_runtime.relevant_hparams``), so changing one leaves the others' KFP cache keys alone.
"""

from typing import NamedTuple

from kfp import dsl

# Placeholders: the pipeline builder sets the real images per task from DeploymentSettings.
GPU_IMAGE = "registry.example.com/medsight/medsight:0.1.0"
CPU_IMAGE = "registry.example.com/medsight/medsight-cpu:0.1.0"


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def synth_data(
    preset: str,
    overrides: list,
    data_revision: str,
    output: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Synthetic dataset (tiny) - or, with data_revision, a registered DVC dataset version."""
    from medsight.platform.component_runtime import run_component

    return run_component("synth-data", {}, preset=preset, overrides=overrides, use_existing=data_revision,
                         output=output, metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def base_models(
    data: str,
    preset: str,
    overrides: list,
    output: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Tokenizer, encoder and LLM weights."""
    from medsight.platform.component_runtime import run_component

    return run_component("base-models", {"data": data}, preset=preset, overrides=overrides,
                         output=output, metrics=metrics)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def perceiver_pretrain(
    data: str,
    base: str,
    preset: str,
    overrides: list,
    two_way: bool,
    output: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Stage 1: Region Perceiver pre-training."""
    from medsight.platform.component_runtime import run_component

    return run_component("perceiver-pretrain", {"data": data, "base": base}, preset=preset, overrides=overrides,
                         hparams={"two_way": two_way}, output=output, metrics=metrics)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def codebook_pretrain(
    data: str,
    base: str,
    perceiver: str,
    preset: str,
    overrides: list,
    two_way: bool,
    codebook_size: int,
    output: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Stage 2: modality-aware VQ codebook."""
    from medsight.platform.component_runtime import run_component

    return run_component("codebook-pretrain", {"data": data, "base": base, "perceiver": perceiver}, preset=preset,
                         overrides=overrides, hparams={"two_way": two_way, "codebook_size": codebook_size},
                         output=output, metrics=metrics)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def v2t_align(
    data: str,
    base: str,
    perceiver: str,
    preset: str,
    overrides: list,
    two_way: bool,
    region_embeddings: bool,
    output: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Stage 3: vision-to-text projector alignment."""
    from medsight.platform.component_runtime import run_component

    return run_component("v2t-align", {"data": data, "base": base, "perceiver": perceiver}, preset=preset,
                         overrides=overrides, hparams={"two_way": two_way, "region_embeddings": region_embeddings},
                         output=output, metrics=metrics)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def grounding_data(
    data: str,
    base: str,
    codebook: str,
    preset: str,
    overrides: list,
    two_way: bool,
    codebook_size: int,
    grounding_mode: str,
    output: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Region tokens for ground-truth regions -> grounding conversations."""
    from medsight.platform.component_runtime import run_component

    return run_component("grounding-data", {"data": data, "base": base, "codebook": codebook}, preset=preset,
                         overrides=overrides, hparams={"two_way": two_way, "codebook_size": codebook_size,
                                                       "grounding_mode": grounding_mode},
                         output=output, metrics=metrics)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def t2v_align(
    data: str,
    base: str,
    codebook: str,
    grounding: str,
    v2t: str,
    preset: str,
    overrides: list,
    two_way: bool,
    codebook_size: int,
    region_embeddings: bool,
    grounding_mode: str,
    output: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Stage 4: text-to-vision projector + region token embeddings (v2t = "" without stage 3)."""
    from medsight.platform.component_runtime import run_component

    return run_component("t2v-align", {"data": data, "base": base, "codebook": codebook, "grounding": grounding,
                                       "v2t": v2t}, preset=preset, overrides=overrides,
                         hparams={"two_way": two_way, "codebook_size": codebook_size,
                                  "region_embeddings": region_embeddings, "grounding_mode": grounding_mode},
                         output=output, metrics=metrics)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def instruct_tune(
    data: str,
    base: str,
    codebook: str,
    grounding: str,
    v2t: str,
    t2v: str,
    preset: str,
    overrides: list,
    two_way: bool,
    codebook_size: int,
    region_embeddings: bool,
    grounding_mode: str,
    output: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Stage 5: unified instruction tuning (v2t / t2v = "" when an ablation skipped them)."""
    from medsight.platform.component_runtime import run_component

    return run_component("instruct-tune", {"data": data, "base": base, "codebook": codebook, "grounding": grounding,
                                           "v2t": v2t, "t2v": t2v}, preset=preset, overrides=overrides,
                         hparams={"two_way": two_way, "codebook_size": codebook_size,
                                  "region_embeddings": region_embeddings, "grounding_mode": grounding_mode},
                         output=output, metrics=metrics)


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(
    data: str,
    base: str,
    model: str,
    grounding: str,
    preset: str,
    overrides: list,
    output: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
) -> NamedTuple("StageOutputs", [("ref", str), ("cached", bool)]):
    """Evaluation: VQA, DiagSeg, grounding Dice; the HTML report shows in the KFP UI."""
    from medsight.platform.component_runtime import run_component

    return run_component("evaluate", {"data": data, "base": base, "model": model, "grounding": grounding},
                         preset=preset, overrides=overrides, output=output, metrics=metrics, html=report)


STAGE_COMPONENTS = {
    "synth-data": synth_data,
    "base-models": base_models,
    "perceiver-pretrain": perceiver_pretrain,
    "codebook-pretrain": codebook_pretrain,
    "v2t-align": v2t_align,
    "grounding-data": grounding_data,
    "t2v-align": t2v_align,
    "instruct-tune": instruct_tune,
    "evaluate": evaluate,
}
