"""The frozen and pre-trained vision modules, built from a config and its label space.

Kept apart from ``factory.py`` (the whole model): stages 1-2 build only these, so their code
(and cache keys) does not depend on the LLM side.
"""

from __future__ import annotations

from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import Taxonomy, check_model_matches
from medsight.model.codebook import ModalityCodebook
from medsight.model.encoder import ImageEncoder
from medsight.model.region_perceiver import RegionPerceiver


def load_encoder(config: ExperimentConfig, inputs: dict[str, Path]) -> ImageEncoder:
    return ImageEncoder.load(config.model.encoder, Path(inputs["base"]) / "encoder")


def new_perceiver(config: ExperimentConfig, taxonomy: Taxonomy) -> RegionPerceiver:
    check_model_matches(config, taxonomy)
    return RegionPerceiver(config.model.encoder.width, config.model.perceiver)


def new_codebook(config: ExperimentConfig, taxonomy: Taxonomy) -> ModalityCodebook:
    check_model_matches(config, taxonomy)
    return ModalityCodebook(config.model.perceiver.dim, config.model.codebook, config.model.encoder.width)
