"""The frozen and pre-trained vision modules, built from a config and its label space.

Kept apart from ``factory.py`` (the whole model): stages 1-2 build only these, so their code
(and cache keys) does not depend on the LLM side.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import Taxonomy, check_model_matches
from medsight.model.encoder import ImageEncoder
from medsight.model.perceiver_factory import build_codebook, build_perceiver


def load_encoder(config: ExperimentConfig, inputs: dict[str, Path]) -> ImageEncoder:
    return ImageEncoder.load(config.model.encoder, Path(inputs["base"]) / "encoder")


def new_perceiver(config: ExperimentConfig, taxonomy: Taxonomy) -> nn.Module:
    """The configured perceiver (``model.perceiver.architecture``), checked against the taxonomy."""
    check_model_matches(config, taxonomy)
    return build_perceiver(config.model.encoder.width, config.model.perceiver)


def new_codebook(config: ExperimentConfig, taxonomy: Taxonomy) -> nn.Module:
    """The configured codebook (``model.codebook.architecture``), checked against the taxonomy."""
    check_model_matches(config, taxonomy)
    model = config.model
    return build_codebook(model.perceiver.dim, model.codebook, model.encoder.width, model.perceiver.num_classes)
