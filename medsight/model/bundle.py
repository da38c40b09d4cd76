"""Stage output bundles: the on-disk format of trained modules (what a stage directory holds).

Every stage output carries all *small* modules trained so far (perceiver, codebook, projectors,
region-token rows), so the newest bundle is self-contained. The LLM is only written by the stage
that changes it (instruct tuning); earlier LLM stages read it from the base-models output.
A bundle also carries the taxonomy its modules were trained with: modality and class ids mean
nothing without it, and inference has no dataset to read it from.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import TAXONOMY_FILE, Taxonomy, resolve_taxonomy

if TYPE_CHECKING:  # finding and copying bundle files needs no torch (model registration, packaging)
    from torch import nn

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
    from medsight.model.weights import save_weights

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


def load_module(module: nn.Module, modules: dict[str, Path], name: str, stage_hint: str) -> nn.Module:
    if name not in modules:
        raise FileNotFoundError(f"no {name} weights among the stage inputs; run {stage_hint} first")
    from medsight.model.weights import load_weights

    load_weights(module, modules[name])
    return module
