"""A stage's cache key: its config view + its inputs' content hashes + the code it runs.

The same key serves the in-process chain (output folder names, reuse), the KFP components (the
run-cache in the S3 store) and, through the same three ingredients, ``dvc.yaml`` (params = the
view, deps = the inputs + the code files). ``key_material`` is what gets hashed, so a stage's
``stage.json`` can show exactly why two runs differ.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medsight
from medsight.stages.registry import StageSpec

# Bump to invalidate every cache entry deliberately (e.g. after a numerics fix in a dependency).
CACHE_SALT_ENV = "MEDSIGHT_CACHE_SALT"
KEY_FORMAT = 2  # bumped when the recipe below changes


def package_root() -> Path:
    """The folder holding the ``medsight`` package (a checkout, or site-packages in an image)."""
    return Path(medsight.__file__).resolve().parent.parent


def view_value(config_dict: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config_dict
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"config view entry {dotted!r} (medsight/stages/registry.py) is not a config field")
        node = node[part]
    return node


def config_view(spec: StageSpec, config: Any) -> dict[str, Any]:
    """The values of the stage's ``reads`` paths, JSON-ready."""
    from medsight.config.io import to_dict

    data = to_dict(config)
    return {dotted: view_value(data, dotted) for dotted in spec.reads}


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, module: str) -> set[str]:
    """``medsight.*`` modules a file imports, at any depth of its body (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            # ``from medsight.data import image_io`` imports the submodule image_io.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "medsight" or name.startswith("medsight.")}


@functools.lru_cache(maxsize=None)
def module_code_files(module: str) -> tuple[str, ...]:
    """Every file of ``medsight/`` that importing ``module`` executes, relative to the package root."""
    root = package_root()
    seen: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix in seen:
                continue
            path = _module_file(root, prefix)
            if path is None:
                continue  # an attribute imported from a package, not a module
            seen[prefix] = path
            pending.extend(_imported_modules(path, prefix) - set(seen))
    return tuple(sorted(path.relative_to(root).as_posix() for path in seen.values()))


def code_files(spec: StageSpec) -> tuple[str, ...]:
    return module_code_files(spec.entrypoint.split(":")[0])


def code_hash(spec: StageSpec) -> str:
    """sha256 over the stage's code files (path + bytes): an edit to any of them changes it."""
    return module_code_hash(spec.entrypoint.split(":")[0])


@functools.lru_cache(maxsize=None)
def module_code_hash(module: str) -> str:
    root = package_root()
    digest = hashlib.sha256()
    for relative in module_code_files(module):
        digest.update(relative.encode())
        digest.update(hashlib.sha256((root / relative).read_bytes()).digest())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    key: str  # sha256 hex
    material: dict[str, Any]

    @property
    def short(self) -> str:
        return self.key[:12]


def stage_key(spec: StageSpec, config: Any, input_hashes: Mapping[str, str]) -> CacheKey:
    """``input_hashes``: input name -> DVC-style content hash (``<md5>.dir``) of that input."""
    material = {
        "format": KEY_FORMAT,
        "stage": spec.name,
        "config": config_view(spec, config),
        "inputs": dict(sorted(input_hashes.items())),
        "code": code_hash(spec),
        "salt": os.environ.get(CACHE_SALT_ENV, ""),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return CacheKey(digest, material)


def relevant_overrides(spec: StageSpec, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """The ``key=value`` overrides that fall inside the stage's view, in order (later ones win).

    The pipeline hands each stage only these, so a setting a stage does not read changes neither
    its config nor its KFP cache key. Whatever it changes upstream reaches the stage as a changed
    input hash instead.
    """
    from medsight.config.access import covered

    picked = []
    for override in overrides:
        dotted = override.split("=", 1)[0].strip()
        if covered(dotted, spec.reads) or any(entry.startswith(dotted + ".") for entry in spec.reads):
            picked.append(override)
    return picked


def variant_plan(variant_name: str, preset: str, overrides: list[str],
                 thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Per stage: whether the variant runs it, and its relevant overrides (variant's, then user's).

    ``thresholds`` (a pipeline parameter: metric -> minimum) become ``register.thresholds``.
    Validates everything first (unknown variant, unknown config key, a wrong value), so a
    pipeline fails in its first task with a message that names the problem.
    """
    from medsight.config import apply_overrides, get_preset
    from medsight.stages.registry import STAGES, get_variant

    variant = get_variant(variant_name)
    combined = [*variant.overrides, *overrides]
    if thresholds:
        entries = [f"{metric}={float(value)}" for metric, value in sorted(thresholds.items())]
        combined.append(f"register.thresholds={json.dumps(entries)}")
    apply_overrides(get_preset(preset), combined)
    return {
        spec.name: {"runs": spec.name not in variant.drops, "overrides": relevant_overrides(spec, combined)}
        for spec in STAGES
    }
