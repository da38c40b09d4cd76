"""The paper's ablations as config variants, run through the same chain and evaluation code.

Each variant is config overrides plus the training stages it leaves out. The comparison runs
the chosen variants with ``run_chain`` (which reuses every upstream output whose inputs did not
change, so e.g. the codebook-size variants share the perceiver) and prints one table row each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medsight.config.io import apply_overrides
from medsight.config.presets import get_preset
from medsight.eval.results_io import read_results, summaries_from
from medsight.eval.tables import Summaries, Table, ablation_table
from medsight.io_utils import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: tuple[str, ...] = ()
    skip: frozenset[str] = frozenset()


VARIANTS: tuple[Variant, ...] = (
    Variant("full", "MedSIGHT as configured (reference row)"),
    Variant("no_region_embeddings", "no region embeddings in the LLM input (Table 5 row 2)", ("model.region_embeddings=false",)),
    Variant("seg_token", "one [SEG] token instead of the region codebook", ("model.grounding=seg_token",)),
    Variant("no_stage3", "without vision-to-text alignment (stage 3)", skip=frozenset({"v2t-align"})),
    Variant("no_stage4", "without text-to-vision alignment (stage 4)", skip=frozenset({"t2v-align"})),
    Variant("no_stage5", "without unified instruction tuning (stage 5)", skip=frozenset({"instruct-tune"})),
    Variant("codebook_8", "8 codes per modality (App. F.8)", ("model.codebook.codes_per_modality=8",)),
    Variant("codebook_16", "16 codes per modality", ("model.codebook.codes_per_modality=16",)),
    Variant("codebook_32", "32 codes per modality", ("model.codebook.codes_per_modality=32",)),
    Variant("codebook_64", "64 codes per modality", ("model.codebook.codes_per_modality=64",)),
    Variant("one_way_decoder", "query-to-image only decoder, no dual cross-attention (App. F.7)", ("model.perceiver.two_way=false",)),
    Variant("qwen2_backbone", "Qwen2 LLM backbone instead of Qwen3 (App. F.6)", ("model.llm.backbone=qwen2",)),
)


def get_variant(name: str) -> Variant:
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(f"unknown ablation variant {name!r}; choose from: {', '.join(v.name for v in VARIANTS)}")


def variant_config(variant: Variant, preset: str = "tiny", extra_overrides: tuple[str, ...] = ()):
    """The preset with the variant's overrides (then the user's) applied."""
    return apply_overrides(get_preset(preset), [*variant.overrides, *extra_overrides])


def run_variant(
    variant: Variant,
    workdir: Path,
    preset: str = "tiny",
    extra_overrides: tuple[str, ...] = (),
    run_chain: Callable | None = None,
) -> Summaries:
    """Train (or reuse) and evaluate one variant; returns its benchmark summaries."""
    if run_chain is None:
        from medsight.stages.chain import run_chain
    config = variant_config(variant, preset, extra_overrides)
    result = run_chain(config, Path(workdir), skip=variant.skip)
    stages = getattr(result, "stages", result)
    if "evaluate" not in stages:
        raise RuntimeError(f"variant {variant.name}: the chain finished without an evaluate stage")
    output = stages["evaluate"].output if hasattr(stages["evaluate"], "output") else Path(stages["evaluate"])
    return summaries_from(read_results(Path(output) / "results.json"))


def compare_ablations(
    names: list[str],
    workdir: Path,
    preset: str = "tiny",
    extra_overrides: tuple[str, ...] = (),
    run_chain: Callable | None = None,
    on_variant: Callable[[str], None] | None = None,
) -> Table:
    """Run ``names`` in order and write ``workdir/ablations.{json,md}``; returns the table."""
    variants = [get_variant(name) for name in names]  # fail on a typo before training anything
    workdir = Path(workdir)
    summaries: dict[str, Summaries] = {}
    for variant in variants:
        if on_variant:
            on_variant(variant.name)
        summaries[variant.name] = run_variant(variant, workdir, preset, extra_overrides, run_chain)
    table = ablation_table(summaries)
    atomic_write_json(workdir / "ablations.json", {"preset": preset, "overrides": list(extra_overrides), "variants": summaries})
    atomic_write_text(workdir / "ablations.md", table.to_markdown())
    return table
