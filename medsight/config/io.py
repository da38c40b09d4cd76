"""Config (de)serialisation and dotted command-line overrides, with errors that name the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from medsight.config.schema import ExperimentConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key (and file, if any)."""


def check_ranges(config: ExperimentConfig, error: type[Exception]) -> None:
    from medsight.config.ranges import check_ranges as check

    check(config, error)


def to_dict(config: Any) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [convert(v) for v in value]
        return value

    return convert(config)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` (the subset of typing the schema uses)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}: {value!r} matches none of {annotation}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_types = typing.get_args(annotation)
        if len(item_types) == 2 and item_types[1] is Ellipsis:
            item_types = (item_types[0],) * len(value)
        if len(item_types) != len(value):
            raise ConfigError(f"{key}: expected {len(item_types)} items, got {len(value)}")
        return tuple(_coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, prefix=key)
    raise ConfigError(f"{key}: unsupported type {annotation}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s}; valid keys here: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    # YAML scalars give the CLI the same spelling as the saved config (true, 1e-4, null, [1,2]).
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``a.b.c=value`` overrides; unknown keys and wrong types raise ``ConfigError``."""
    data = to_dict(config)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key.path=value")
        dotted, raw = override.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {'.'.join(parts[: depth + 1])}")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown config key {dotted}")
        node[parts[-1]] = _parse_scalar(raw)
    config = from_dict(ExperimentConfig, data)
    check_ranges(config, ConfigError)
    return config


def save_config(config: ExperimentConfig, path: Path) -> None:
    from medsight.io_utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))


def load_config(path: Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    try:
        config = from_dict(ExperimentConfig, data)
        check_ranges(config, ConfigError)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
    return config
