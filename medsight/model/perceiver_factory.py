"""Build the configured perceiver and codebook variant by name (``architecture`` fields)."""

from __future__ import annotations

from torch import nn

from medsight.config.schema import PERCEIVER_ARCHITECTURES, CodebookConfig, PerceiverConfig


def build_perceiver(encoder_width: int, config: PerceiverConfig) -> nn.Module:
    """``medsight`` -> RegionPerceiver, ``authors`` -> AuthorsRegionPerceiver (same outputs)."""
    if config.architecture == "medsight":
        from medsight.model.region_perceiver import RegionPerceiver

        return RegionPerceiver(encoder_width, config)
    if config.architecture == "authors":
        from medsight.model.authors_perceiver import AuthorsRegionPerceiver

        return AuthorsRegionPerceiver(encoder_width, config)
    raise ValueError(f"model.perceiver.architecture: {config.architecture!r} is not one of {', '.join(PERCEIVER_ARCHITECTURES)}")


def build_codebook(query_dim: int, config: CodebookConfig, encoder_width: int, num_classes: int) -> nn.Module:
    """``medsight`` -> ModalityCodebook, ``authors`` -> AuthorsCodebook (same interface; its own
    head for quantized queries needs the perceiver's ``num_classes``)."""
    if config.architecture == "medsight":
        from medsight.model.codebook import ModalityCodebook

        return ModalityCodebook(query_dim, config, encoder_width)
    if config.architecture == "authors":
        from medsight.model.authors_codebook import AuthorsCodebook

        return AuthorsCodebook(query_dim, config, encoder_width, num_classes)
    raise ValueError(f"model.codebook.architecture: {config.architecture!r} is not one of medsight, authors")
