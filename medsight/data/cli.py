"""``medsight data ...``: prepare public releases as published, build grounding sets, check quality.

Exit codes: 2 for usage errors (a missing folder, a bad option or taxonomy file), 1 for data
errors (too many bad files: the report says which).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medsight.data.errors import DataError

data_app = typer.Typer(help="Prepare dataset releases as published, build grounding sets, check data quality.",
                       no_args_is_help=True)
prepare_app = typer.Typer(help="Index a release as published into the layout the stages read (no image copies).",
                          no_args_is_help=True)
data_app.add_typer(prepare_app, name="prepare")

MaxBad = Annotated[float, typer.Option(help="Stop (exit 1) when more than this share of entries is bad.")]


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


@prepare_app.command("biomedparse")
def prepare_biomedparse_command(
    src: Annotated[Path, typer.Argument(help="The release: a folder of sub-datasets (any subset of them).")],
    dest: Annotated[Path, typer.Argument(help="Dataset root to write (biomedparse/, taxonomy.json, reports/).")],
    taxonomy: Annotated[str, typer.Option(help="Shipped template (biomedparse-18, biomedparse-9) or a taxonomy JSON.")] = "biomedparse-18",
    val_fraction: Annotated[float, typer.Option(help="Share of each sub-dataset's train images carved into val.")] = 0.05,
    seed: int = 0,
    max_masks_per_image: Annotated[int, typer.Option(help="Images with more masks are skipped (the authors use 16).")] = 16,
    max_bad_fraction: MaxBad = 0.01,
    verify: Annotated[str, typer.Option(help="full: decode every file; header: sizes only (faster).")] = "full",
    workers: Annotated[int, typer.Option(help="Worker processes checking files (0 = every CPU).")] = 0,
    subset: Annotated[list[str] | None, typer.Option(help="Only these sub-datasets (paths under SRC); repeatable.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Index a BiomedParse release: val carved out of train, names mapped through the taxonomy's
    aliases, images over max-masks skipped, every bad file reported; prints counts per modality and class."""
    from medsight.data.prepare.biomedparse import BiomedParseOptions, prepare_biomedparse
    from medsight.data.taxonomy import TaxonomyError

    options = BiomedParseOptions(taxonomy, val_fraction, seed, max_masks_per_image, max_bad_fraction, verify, workers,
                                 tuple(subset or ()))
    try:
        summary = prepare_biomedparse(src, dest, options, progress=not quiet)
    except DataError as error:
        _fail(str(error), 1)
    except (FileNotFoundError, TaxonomyError, ValueError) as error:
        _fail(str(error), 2)
    typer.echo(summary.table())
    typer.echo(f"\n{summary.seen} images listed, {sum(summary.images.values())} indexed, {summary.bad} bad, "
               f"{summary.skipped} skipped (reports in {dest}/reports/). Next: medsight data check {dest}")


@prepare_app.command("pubmedvision")
def prepare_pubmedvision_command(
    src: Annotated[Path, typer.Argument(help="The release root: the two PubMedVision JSON files and images/.")],
    dest: Annotated[Path, typer.Argument(help="Dataset root to write (pubmedvision/, reports/).")],
    val_fraction: Annotated[float, typer.Option(help="Share of each file carved into val.")] = 0.01,
    instruct_samples: Annotated[int, typer.Option(help="Stage 5's seeded uniform sample of instruct rows (paper: 60K).")] = 60_000,
    seed: int = 0,
    max_bad_fraction: MaxBad = 0.01,
    image_root: Annotated[str, typer.Option(help="Where image paths are relative to (default: SRC).")] = "",
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Index PubMedVision's alignment and instruct sets: every image of multi-image rows kept, rows
    with missing images reported and skipped, val carved, the stage-5 sample drawn."""
    from medsight.data.prepare.pubmedvision import PubMedVisionOptions, prepare_pubmedvision

    options = PubMedVisionOptions(val_fraction, instruct_samples, seed, max_bad_fraction, image_root)
    try:
        summary = prepare_pubmedvision(src, dest, options, progress=not quiet)
    except DataError as error:
        _fail(str(error), 1)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error), 2)
    typer.echo(summary.table())
    typer.echo(f"Next: medsight data check {dest}")


@prepare_app.command("grounding")
def prepare_grounding_command(
    data: Annotated[Path, typer.Option(help="Prepared dataset root (biomedparse/ index).")],
    base: Annotated[Path, typer.Option(help="base-models output (encoder, tokenizer).")],
    codebook: Annotated[Path, typer.Option(help="codebook-pretrain output (perceiver + codebook).")],
    out: Annotated[Path, typer.Option(help="Output folder (the grounding-data stage's layout).")],
    preset: Annotated[str | None, typer.Option(help="tiny | full | full-qwen2.5 (default: the codebook stage's own config.yaml)")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="YAML config instead of a preset.")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override, e.g. --set grounding_data.t2v_samples=60000")] = None,
    generator: Annotated[str | None, typer.Option(help="template | llm (endpoint from MEDSIGHT_LLM_* env vars)")] = None,
    t2v_samples: Annotated[int | None, typer.Option(help="Stage 4's grounding set size (conversations).")] = None,
    instruct_images: Annotated[int | None, typer.Option(help="Stage 5's codebook-conversation images.")] = None,
) -> None:
    """Build the paper's two grounding sets from the trained codebook: stage 4's set and stage 5's
    codebook conversations around uniformly sampled BiomedParse images (the grounding-data stage)."""
    from medsight.cli import make_tracker, resolve_config
    from medsight.config import ConfigError
    from medsight.stages.runner import run_stage

    extra = [f"grounding_data.{key}={value}" for key, value in
             (("generator", generator), ("t2v_samples", t2v_samples), ("instruct_images", instruct_images)) if value is not None]
    if preset is None and config_file is None:
        # The codebook was trained with a config: build its grounding sets with the same one.
        saved = codebook / "config.yaml"
        if saved.is_file():
            config_file = saved
        else:
            _fail(f"{saved} not found: pass --preset or --config (the config the codebook was trained with)", 2)
    try:
        config = resolve_config(preset or "full", config_file, [*(overrides or []), *extra])
        metrics = run_stage("grounding-data", config, {"data": data, "base": base, "codebook": codebook}, out,
                            make_tracker("grounding-data", config)).metrics
    except DataError as error:
        _fail(str(error), 1)
    except (ConfigError, KeyError, ValueError, FileNotFoundError) as error:
        _fail(str(error).strip("'\""), 2)
    typer.echo("  ".join(f"{k}={v:g}" for k, v in metrics.items()))
    typer.echo(f"stage 4 set: {out}/conversations/train.json; stage 5 set: {out}/instruct_conversations/train.json")


@data_app.command("check")
def check_command(
    root: Annotated[Path, typer.Argument(help="A prepared dataset root.")],
    max_bad_fraction: MaxBad = 0.01,
    verify_files: Annotated[bool, typer.Option(help="Also check that every indexed file still exists.")] = False,
    out: Annotated[Path | None, typer.Option(help="Where quality.json/.html go (default: ROOT/reports).")] = None,
) -> None:
    """Data-quality report (counts, class balance, mask-area histograms, bad and skipped files):
    ROOT/reports/quality.json and quality.html; exit 1 when a bad share is over the limit."""
    from medsight.data.quality_check import check_dataset, summary_line

    try:
        report = check_dataset(root, max_bad_fraction, verify_files, out)
    except DataError as error:
        _fail(str(error), 1)
    except FileNotFoundError as error:
        _fail(str(error), 2)
    typer.echo(summary_line(report))
    folder = out or root / "reports"
    typer.echo(f"report: {folder}/quality.html (JSON: {folder}/quality.json)")
    if not report["ok"]:
        raise typer.Exit(code=1)
