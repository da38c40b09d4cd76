"""The model factory: the whole MedSIGHT model assembled from base weights and stage bundles."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from medsight.config.schema import ExperimentConfig
from medsight.data.conversation_dataset import PromptFormat
from medsight.data.taxonomy import Taxonomy
from medsight.data.tokenizer import load_tokenizer
from medsight.model.bundle import find_dir, find_modules, load_module
from medsight.model.llm import load_llm
from medsight.model.medsight import MedSight
from medsight.model.region_vocabulary import RegionVocabulary
from medsight.model.vision_modules import load_encoder, new_codebook, new_perceiver
from medsight.model.weights import load_weights


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
    config: ExperimentConfig,
    inputs: dict[str, Path],
    taxonomy: Taxonomy,
    region_tokens: bool = True,
    llm_dtype: torch.dtype = torch.float32,
) -> tuple[MedSight, PreTrainedTokenizerBase, set[str]]:
    """Assemble the full model from base + bundles; returns which modules came from checkpoints.

    ``region_tokens=False`` (stage 3): no codebook and no region tokens, which exist only from
    stage 4 on; the model then reads no codebook setting, so neither does stage 3's cache key.
    ``llm_dtype``: load the LLM weights straight in the dtype it will run in (bf16 at full scale).
    """
    modules = find_modules(inputs)
    encoder = load_encoder(config, inputs)
    perceiver = load_module(new_perceiver(config, taxonomy), modules, "perceiver", "perceiver-pretrain")
    codebook = None
    if region_tokens:
        codebook = load_module(new_codebook(config, taxonomy), modules, "codebook", "codebook-pretrain")
        tokenizer, base_size = tokenizer_with_region_tokens(config, inputs)
    else:
        directory = find_dir(inputs, "tokenizer")
        if directory is None:
            raise FileNotFoundError("no tokenizer among the stage inputs; run base-models first")
        tokenizer = load_tokenizer(directory)
        base_size = len(tokenizer)
    llm_dir = find_dir(inputs, "llm")
    if llm_dir is None:
        raise FileNotFoundError("no LLM among the stage inputs; run base-models first")
    llm = load_llm(llm_dir, config.model.llm, dtype=llm_dtype)
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
        vocabulary=None if region_tokens else RegionVocabulary.empty(),
    )
    loaded = set()
    for name in ("v2t", "t2v", "region_tokens"):
        if name in modules:
            load_weights(getattr(model, name), modules[name])
            loaded.add(name)
    if "region_tokens" not in loaded:
        model.initialise_region_tokens()
    return model, tokenizer, loaded
