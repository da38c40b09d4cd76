"""``medsight import ...``: bring checkpoints trained elsewhere in as stage outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

import_app = typer.Typer(help="Import checkpoints trained elsewhere as stage outputs.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)

@import_app.callback()
def _group() -> None:
    """Import checkpoints trained elsewhere as stage outputs (``medsight import authors ...``)."""


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


@import_app.command("authors")
def authors_command(
    perceiver: Annotated[Path, typer.Option(help="Region Perceiver checkpoint (stage 1, e.g. region_perceiver/0079280.pt).")],
    out: Annotated[Path, typer.Option(help="Folder for the stage outputs (must not exist, or pass --force).")],
    codebook: Annotated[Path | None, typer.Option(help="Codebook checkpoint (stage 2).")] = None,
    projector: Annotated[Path | None, typer.Option(help="Stage-3 adapter (mm_projector.bin).")] = None,
    model: Annotated[Path | None, typer.Option(help="Final model folder (medsight_full_instruct); needs --codebook.")] = None,
    encoder: Annotated[Path | None, typer.Option(help="UniMed-CLIP release (unimed_clip_vit_l14_base_text_encoder.pt): writes base-models/.")] = None,
    taxonomy: Annotated[Path | None, typer.Option(help="taxonomy.json of the label space the weights were trained on (default: the shipped placeholder names).")] = None,
    feature_layer: Annotated[int, typer.Option(help="Encoder block feeding the perceiver: -1 for the released checkpoints (their eval config), -2 for models trained with the released scripts.")] = -1,
    preset: Annotated[str, typer.Option(help="Preset the imported config starts from (encoder dims, training settings).")] = "full",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Dotted override applied before import, e.g. --set model.encoder.width=64")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
) -> None:
    """Convert the authors' released MedSIGHT checkpoints into this platform's stage outputs.

    Pickle checkpoints are read with torch.load(weights_only=True) only; every weight is loaded
    strictly into the configured modules before anything is written.
    """
    from medsight.config import ConfigError, apply_overrides, get_preset
    from medsight.importers.authors import AuthorsFiles, import_authors
    from medsight.model.checkpoint_files import CheckpointError

    if model is not None and codebook is None:
        _fail("--model needs --codebook too (the imported model's bundles carry the codebook)", 2)
    for name, path in (("--perceiver", perceiver), ("--codebook", codebook), ("--projector", projector),
                       ("--model", model), ("--encoder", encoder), ("--taxonomy", taxonomy)):
        if path is not None and not path.exists():
            _fail(f"{name} {path}: not found", 2)
    if out.exists() and any(out.iterdir()) and not force:
        _fail(f"--out {out}: exists and is not empty; pick a new folder or pass --force", 2)
    try:
        config = apply_overrides(get_preset(preset), overrides or [])
    except (ConfigError, KeyError) as error:
        _fail(str(error).strip("'\""), 2)
    files = AuthorsFiles(perceiver, codebook, projector, model, encoder, taxonomy)
    try:
        with console.status("converting the checkpoints (the 8B model takes a few minutes)..."):
            result = import_authors(files, config, out, feature_layer)
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        _fail(str(error), 1)
    table = Table("stage output", "folder", title="imported")
    for stage, folder in result.written.items():
        table.add_row(stage, str(folder))
    console.print(table)
    for note in result.notes:
        console.print(note)
    if result.ignored:
        console.print(f"{len(result.ignored)} source tensor(s) not imported:")
        reasons: dict[str, list[str]] = {}
        for key, why in result.ignored.items():
            reasons.setdefault(why, []).append(key)
        for why, keys in reasons.items():
            console.print(f"  {len(keys)} x {why} (e.g. {keys[0]})")
    base = result.written.get("base-models", "BASE (a base-models output with the UniMed-CLIP encoder)")
    if "instruct-tune" in result.written:
        final = result.written["instruct-tune"]
        console.print("next:")
        console.print(f"  medsight predict --checkpoint {final} --base {base} --image IMAGE --question '...'")
        console.print(f"  medsight eval run --checkpoint {final} --base {base} --benchmarks benchmarks.json --out runs/eval-authors --protocol llava-med")
