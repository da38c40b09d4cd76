"""Typed configs, presets and overrides."""

from medsight.config.io import ConfigError, apply_overrides, load_config, save_config, to_dict
from medsight.config.presets import PRESETS, get_preset
from medsight.config.schema import ExperimentConfig

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "PRESETS",
    "apply_overrides",
    "get_preset",
    "load_config",
    "save_config",
    "to_dict",
]
