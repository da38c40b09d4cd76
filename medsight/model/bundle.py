"""Stage output bundles: which trained modules a stage directory holds, and assembling a model.

Every stage output carries all *small* modules trained so far (perceiver, codebook, projectors,
region-token rows), so the newest bundle is self-contained. The LLM is only written by the stage
that changes it (instruct tuning); earlier LLM stages read it from the base-models output.
A bundle also carries the taxonomy its modules were trained with: modality and class ids mean
nothing without it, and inference has no dataset to read it from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from medsight.config.schema import ExperimentConfig
from medsight.data.conversation_dataset import PromptFormat
from medsight.data.taxonomy import TAXONOMY_FILE, Taxonomy, check_model_matches, resolve_taxonomy
from medsight.data.tokenizer import load_tokenizer
from medsight.model.codebook import ModalityCodebook
from medsight.model.encoder import ImageEncoder
from medsight.model.llm import load_llm
from medsight.model.medsight import MedSight
from medsight.model.perceiver_factory import build_codebook, build_perceiver
from medsight.model.region_vocabulary import RegionVocabulary
from medsight.model.weights import load_weights, save_weights

MODULES_DIR = "modules"
MODULE_NAMES = ("perceiver", "codebook", "v2t", "t2v", "region_tokens")
BUNDLE_ORDER = ("perceiver", "codebook", "v2t", "t2v", "model")


def module_file(directory: Path, name: str) -> Path:
    return Path(directory) / MODULES_DIR / f"{name}.safetensors"


def find_modules(inputs: dict[str, Path]) -> dict[str, Path]:
    """Module name -> newest file among the stage inputs (later stages override earlier)."""
    found: dict[str, Path] = {}
    for key in BUNDLE_ORDER:
        if key not in inputs:
            continue
        for name in MODULE_NAMES:
            path = module_file(inputs[key], name)
            if path.is_file():
                found[name] = path
    return found


def find_dir(inputs: dict[str, Path], subdir: str) -> Path | None:
    """Newest ``subdir`` (``llm`` or ``tokenizer``) among bundles, falling back to base."""
    for key in reversed(BUNDLE_ORDER):
        if key in inputs and (Path(inputs[key]) / subdir).is_dir():
            return Path(inputs[key]) / subdir
    if "base" in inputs and (Path(inputs["base"]) / subdir).is_dir():
        return Path(inputs["base"]) / subdir
    return None


def taxonomy_file(directory: Path) -> Path:
    return Path(directory) / MODULES_DIR / TAXONOMY_FILE


def bundle_taxonomy(inputs: dict[str, Path]) -> Taxonomy | None:
    """The taxonomy of the newest bundle among the inputs that carries one."""
    for key in reversed(BUNDLE_ORDER):
        if key in inputs and taxonomy_file(inputs[key]).is_file():
            return Taxonomy.load(taxonomy_file(inputs[key]))
    return None


def stage_taxonomy(config: ExperimentConfig, inputs: dict[str, Path]) -> Taxonomy:
    """The data's taxonomy, refused when upstream modules were trained on another one (their
    class and modality ids would be read with different meanings)."""
    taxonomy = resolve_taxonomy(Path(inputs["data"]), config.data.taxonomy)
    upstream = bundle_taxonomy(inputs)
    if upstream is not None and upstream != taxonomy:
        raise ValueError(
            f"the data's taxonomy ({taxonomy.source}) differs from the one the input modules were "
            f"trained with ({upstream.source}); retrain from perceiver-pretrain or point "
            "data.taxonomy at the original file"
        )
    return taxonomy


def save_modules(output: Path, modules: dict[str, nn.Module], taxonomy: Taxonomy) -> None:
    for name, module in modules.items():
        save_weights(module, module_file(output, name))
    taxonomy.save(taxonomy_file(output))


def copy_modules(source: dict[str, Path], output: Path, names: tuple[str, ...]) -> None:
    """Carry untouched upstream modules forward so the new bundle stands alone."""
    for name in names:
        if name in source:
            target = module_file(output, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source[name], target)


def load_encoder(config: ExperimentConfig, inputs: dict[str, Path]) -> ImageEncoder:
    return ImageEncoder.load(config.model.encoder, Path(inputs["base"]) / "encoder")


def new_perceiver(config: ExperimentConfig, taxonomy: Taxonomy) -> nn.Module:
    """The configured perceiver (``model.perceiver.architecture``), checked against the taxonomy."""
    check_model_matches(config, taxonomy)
    return build_perceiver(config.model.encoder.width, config.model.perceiver)


def new_codebook(config: ExperimentConfig, taxonomy: Taxonomy) -> ModalityCodebook:
    check_model_matches(config, taxonomy)
    model = config.model
    return build_codebook(model.perceiver.dim, model.codebook, model.encoder.width, model.perceiver.num_classes)


def load_module(module: nn.Module, modules: dict[str, Path], name: str, stage_hint: str) -> nn.Module:
    if name not in modules:
        raise FileNotFoundError(f"no {name} weights among the stage inputs; run {stage_hint} first")
    load_weights(module, modules[name])
    return module


def tokenizer_with_region_tokens(
    config: ExperimentConfig, inputs: dict[str, Path]
) -> tuple[PreTrainedTokenizerBase, int]:
    """Tokenizer whose last len(vocabulary) ids are the region tokens; returns (tokenizer, base size)."""
    directory = find_dir(inputs, "tokenizer")
    if directory is None:
        raise FileNotFoundError("no tokenizer among the stage inputs; run base-models first")
    tokenizer = load_tokenizer(directory)
    vocabulary = RegionVocabulary(
        config.model.codebook.num_modalities, config.model.codebook.codes_per_modality, config.model.grounding
    )
    names = vocabulary.names
    present = [n for n in names if n in tokenizer.get_vocab()]
    if present and len(present) != len(names):
        raise ValueError(f"{directory}: tokenizer has some but not all region tokens; it was built for another codebook size")
    if not present:
        tokenizer.add_tokens(names, special_tokens=True)
    base_size = len(tokenizer) - len(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(base_size, base_size + len(names))):
        raise ValueError(f"{directory}: region tokens must be the last {len(names)} ids of the tokenizer")
    return tokenizer, base_size


def build_medsight(
    config: ExperimentConfig, inputs: dict[str, Path], taxonomy: Taxonomy, allow_missing: tuple[str, ...] = ()
) -> tuple[MedSight, PreTrainedTokenizerBase, set[str]]:
    """Assemble the full model from base + bundles; returns which modules came from checkpoints."""
    modules = find_modules(inputs)
    encoder = load_encoder(config, inputs)
    perceiver = load_module(new_perceiver(config, taxonomy), modules, "perceiver", "perceiver-pretrain")
    codebook = new_codebook(config, taxonomy)
    if "codebook" not in allow_missing or "codebook" in modules:
        load_module(codebook, modules, "codebook", "codebook-pretrain")
    tokenizer, base_size = tokenizer_with_region_tokens(config, inputs)
    llm_dir = find_dir(inputs, "llm")
    if llm_dir is None:
        raise FileNotFoundError("no LLM among the stage inputs; run base-models first")
    llm = load_llm(llm_dir, config.model.llm)
    if llm.get_input_embeddings().num_embeddings < base_size:
        raise ValueError(f"{llm_dir}: LLM vocabulary is smaller than the tokenizer's base vocabulary")
    model = MedSight(
        config.model,
        encoder,
        perceiver,
        codebook,
        llm,
        base_vocab_size=base_size,
        image_token_id=PromptFormat.from_tokenizer(tokenizer, config.model.llm).image_id,
    )
    loaded = set()
    for name in ("v2t", "t2v", "region_tokens"):
        if name in modules:
            load_weights(getattr(model, name), modules[name])
            loaded.add(name)
    if "region_tokens" not in loaded:
        model.initialise_region_tokens()
    return model, tokenizer, loaded
