"""Shared fixtures: a tiny in-memory MedSIGHT (random init, no training) for mechanism tests."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from medsight.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    corpus = [
        "Is there a lesion in this image? yes no tumor cyst liver kidney brain",
        "Here is the liver. Please segment the kidney. A CT image of the abdomen.",
    ] * 20
    train_tokenizer(corpus, 300, out)
    return out


@pytest.fixture()
def tiny_config():
    from medsight.config import apply_overrides, get_preset

    return apply_overrides(
        get_preset("tiny"),
        ["model.codebook.codes_per_modality=4", "model.llm.hidden_size=32", "model.llm.intermediate_size=64"],
    )


def build_tiny_model(config, tokenizer_dir):
    import torch

    from medsight.data.tokenizer import load_tokenizer
    from medsight.model.codebook import ModalityCodebook
    from medsight.model.encoder import ImageEncoder
    from medsight.model.llm import random_init_llm
    from medsight.model.medsight import MedSight
    from medsight.model.region_perceiver import RegionPerceiver
    from medsight.model.region_vocabulary import RegionVocabulary

    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    base = len(tokenizer)
    vocabulary = RegionVocabulary(
        config.model.codebook.num_modalities, config.model.codebook.codes_per_modality, config.model.grounding
    )
    tokenizer.add_tokens(vocabulary.names, special_tokens=True)
    model = MedSight(
        config.model,
        ImageEncoder.random_init(config.model.encoder),
        RegionPerceiver(config.model.encoder.width, config.model.perceiver),
        ModalityCodebook(config.model.perceiver.dim, config.model.codebook, config.model.encoder.width),
        random_init_llm(config.model.llm, vocab_size=base),
        base_vocab_size=base,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model.initialise_region_tokens()
    return model, tokenizer


@pytest.fixture()
def tiny_model(tiny_config, tiny_tokenizer_dir):
    return build_tiny_model(tiny_config, tiny_tokenizer_dir)


# Session fixtures of the serving tests (a tiny model trained once, registered, served). Defined
# here, not imported by each test module, so every module shares the one session instance.
from trained_model import model_server, multi_region_image, registry, trained_chain  # noqa: E402,F401
