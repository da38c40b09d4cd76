"""Several registry variants trained and evaluated side by side, in-process, one table row each.

``run_chain`` reuses every stage output whose cache key did not change, so e.g. the codebook-size
variants share the perceiver and the ``without-stage-N`` variants share everything upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from medsight.config.presets import get_preset
from medsight.eval.results_io import read_results, summaries_from
from medsight.eval.tables import Summaries, Table, ablation_table
from medsight.io_utils import atomic_write_json, atomic_write_text
from medsight.stages.registry import Variant, get_variant


def run_variant(
    variant: Variant,
    workdir: Path,
    preset: str = "tiny",
    overrides: tuple[str, ...] = (),
    run_chain: Callable | None = None,
) -> Summaries:
    """Train (or reuse) and evaluate one variant; returns its benchmark summaries."""
    from medsight.config.io import apply_overrides

    if run_chain is None:
        from medsight.stages.chain import run_chain
    config = apply_overrides(get_preset(preset), list(overrides))
    result = run_chain(config, Path(workdir), variant=variant)
    if "evaluate" not in result.stages:
        raise RuntimeError(f"variant {variant.name}: the chain finished without an evaluate stage")
    return summaries_from(read_results(Path(result.stages["evaluate"].output) / "results.json"))


def compare_variants(
    names: list[str],
    workdir: Path,
    preset: str = "tiny",
    overrides: tuple[str, ...] = (),
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
        summaries[variant.name] = run_variant(variant, workdir, preset, overrides, run_chain)
    table = ablation_table(summaries)
    atomic_write_json(workdir / "ablations.json", {"preset": preset, "overrides": list(overrides), "variants": summaries})
    atomic_write_text(workdir / "ablations.md", table.to_markdown())
    return table
