"""``medsight eval ...`` commands (and ``predict_command``, mounted as ``medsight predict``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from medsight.data.errors import DataError

eval_app = typer.Typer(help="Evaluate checkpoints, predict on images, build reports, run ablations, generate data.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # soft wrap: paths in messages stay copyable


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _base_for(checkpoint: Path, base: Path | None) -> Path:
    """--base, else the base-models input recorded in the checkpoint's stage.json."""
    if base is not None:
        return base
    stage_file = checkpoint / "stage.json"
    if stage_file.is_file():
        recorded = json.loads(stage_file.read_text()).get("inputs", {}).get("base")
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    _fail(f"{checkpoint}: cannot tell where its base models are; pass --base DIR (the base-models stage output)")
    raise AssertionError  # unreachable: _fail exits


def _load_model(checkpoint: Path, base: Path | None, device: str):
    from medsight.model.inference import MedSightInference

    if not checkpoint.is_dir():
        _fail(f"{checkpoint}: checkpoint folder not found (an instruct-tune or t2v-align stage output)")
    try:
        return MedSightInference.load(checkpoint, _base_for(checkpoint, base), device=device)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))


def predict_command(
    checkpoint: Annotated[Path, typer.Option(help="Trained model folder (instruct-tune or t2v-align output).")],
    image: Annotated[Path, typer.Option(help="PNG/JPEG image or DICOM file.")],
    question: Annotated[str, typer.Option(help="Question about the image.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: predictions/<image name>).")] = None,
    base: Annotated[Path | None, typer.Option(help="base-models output (default: read from the checkpoint's stage.json).")] = None,
    modality: Annotated[str | None, typer.Option(help="Modality name (e.g. CT) to pick the sub-codebook; default: predicted.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the checkpoint's evaluate.max_new_tokens (512 at full scale).")] = None,
    temperature: float = 0.0,
    device: str = "cpu",
) -> None:
    """Answer a question about one image; write the answer, a mask and an overlay per region token, and boxes."""
    from medsight.eval.predict import load_input_image, predict_image, write_prediction

    try:
        pixels = load_input_image(image)
    except DataError as error:
        _fail(str(error))
    model = _load_model(checkpoint, base, device)
    if max_new_tokens is None:
        config = getattr(model, "config", None)  # a trained model's own setting; 48 otherwise
        max_new_tokens = config.evaluate.max_new_tokens if config is not None else 48
    try:
        prediction = predict_image(model, pixels, question, modality, max_new_tokens, temperature,
                                   taxonomy=getattr(model, "taxonomy", None))
    except ValueError as error:  # e.g. an unknown --modality
        _fail(str(error))
    target = out or Path("predictions") / image.stem
    summary = write_prediction(target, pixels, question, prediction, image)
    console.print(f"[bold]answer:[/bold] {summary['answer']}")
    for region in summary["regions"]:
        console.print(f"  {region['token']}: mask {target / region['mask']}, box {region['box_xyxy_normalized']}")
    if prediction.ignored_tokens:
        console.print(f"[yellow]ignored region tokens not in the vocabulary:[/yellow] {', '.join(prediction.ignored_tokens)}")
    console.print(f"written to {target}/ (answer.txt, prediction.json, boxes.json)")


eval_app.command("predict")(predict_command)


@eval_app.command("run")
def run_command(
    checkpoint: Annotated[Path, typer.Option(help="Trained model folder.")],
    benchmarks: Annotated[Path, typer.Option(help="benchmarks.json manifest (see medsight/eval/benchmarks/manifest.py).")],
    out: Annotated[Path, typer.Option(help="Output folder for results, tables and the report.")],
    base: Annotated[Path | None, typer.Option(help="base-models output (default: from stage.json).")] = None,
    batch_size: int = 16,
    device: str = "cpu",
    protocol: Annotated[str | None, typer.Option(help="Scoring that leads the tables: llava-med (LLaVA-Med's run_eval.py, as the paper) or strict; both are always computed. Default: the checkpoint's evaluate.protocol.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: the checkpoint's evaluate.max_new_tokens.")] = None,
) -> None:
    """Evaluate a checkpoint on the benchmarks of a manifest (real releases or synthetic)."""
    from medsight.eval.protocols import PROTOCOLS
    from medsight.eval.stage import evaluate_model, headline_metrics

    if protocol is not None and protocol not in PROTOCOLS:
        _fail(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    model = _load_model(checkpoint, base, device)
    config = model.config
    config.evaluate.batch_size = batch_size
    if protocol is not None:
        config.evaluate.protocol = protocol
    if max_new_tokens is not None:
        config.evaluate.max_new_tokens = max_new_tokens
    document = evaluate_model(model, benchmarks, out, config, {"model": str(checkpoint)}, [checkpoint], device)
    console.print(f"scoring: {config.evaluate.protocol} leads the tables; metrics ending in _llava_med are LLaVA-Med's")
    for name, value in headline_metrics(document).items():
        console.print(f"{name:>30}: {value:.4f}")
    console.print(f"report: {out / 'report.html'}")


@eval_app.command("report")
def report_command(
    eval_dir: Annotated[Path, typer.Argument(help="An evaluate stage output (holds results.json).")],
    out: Annotated[Path | None, typer.Option(help="Report file (default: EVAL_DIR/report.html).")] = None,
    curves_from: Annotated[list[Path] | None, typer.Option(help="Stage outputs to read training curves from (lineage is followed).")] = None,
) -> None:
    """Rebuild the self-contained HTML report of an evaluation folder."""
    from medsight.eval.curves import collect_curves
    from medsight.eval.report import build_report

    try:
        path = build_report(eval_dir, curves=collect_curves(list(curves_from or [])), output=out)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    console.print(f"report written: {path}")


@eval_app.command("compare-ablations")
def compare_command(
    variants: Annotated[str, typer.Option(help="Comma-separated variant names, or 'all'.")] = "full,no_region_embeddings,seg_token",
    workdir: Annotated[Path, typer.Option(help="Chain work folder (stage outputs are shared between variants).")] = Path("runs/ablations"),
    preset: str = "tiny",
    override: Annotated[list[str] | None, typer.Option("--set", help="Extra config override key=value for every variant.")] = None,
    list_variants: Annotated[bool, typer.Option("--list", help="List the variants and exit.")] = False,
) -> None:
    """Run several ablation variants through the same training/eval code; print them side by side."""
    from medsight.eval.ablations import VARIANTS, compare_ablations

    if list_variants:
        for variant in VARIANTS:
            detail = ", ".join([*variant.overrides, *(f"skip {s}" for s in sorted(variant.skip))]) or "-"
            console.print(f"[bold]{variant.name:<22}[/bold] {variant.description}  [dim]({detail})[/dim]")
        return
    names = [v.name for v in VARIANTS] if variants == "all" else [n.strip() for n in variants.split(",") if n.strip()]
    try:
        table = compare_ablations(names, workdir, preset, tuple(override or ()), on_variant=lambda n: console.print(f"[bold]variant {n}[/bold]"))
    except KeyError as error:
        _fail(str(error.args[0]))
    typer.echo(table.to_text())
    console.print(f"also written: {workdir / 'ablations.md'}, {workdir / 'ablations.json'}")


@eval_app.command("gen-data")
def gen_data_command(
    data: Annotated[Path, typer.Option(help="Dataset root (holds biomedparse/).")],
    out: Annotated[Path, typer.Option(help="Output JSON file.")],
    kind: Annotated[str, typer.Option(help="diagseg | grounding")] = "diagseg",
    split: str = "test",
    generator: Annotated[str, typer.Option(help="template | llm (endpoint from MEDSIGHT_LLM_* env vars)")] = "template",
    region_codes: Annotated[Path | None, typer.Option(help="grounding-data output region_codes/<split>.json (tokens per region).")] = None,
    seed: int = 0,
    max_attempts: int = 3,
    fallback: Annotated[bool, typer.Option(help="Use template text when the LLM fails validation every time.")] = True,
    taxonomy: Annotated[str, typer.Option(help="Taxonomy JSON, as data.taxonomy (default: DATA/taxonomy.json, else synthetic).")] = "",
) -> None:
    """Generate DiagSeg-style QA or grounding conversations (resumable: rerun to continue)."""
    from medsight.data.taxonomy import resolve_taxonomy
    from medsight.data.datagen.diagseg_builder import build_diagseg
    from medsight.data.datagen.grounding_conversations import build_grounding_conversations
    from medsight.data.datagen.llm_client import ChatClient, LLMError
    from medsight.data.datagen.llm_generator import LLMGenerator
    from medsight.data.datagen.records import triples_from_biomedparse, triples_from_region_codes
    from medsight.data.datagen.templates import TemplateGenerator

    if kind not in ("diagseg", "grounding") or generator not in ("template", "llm"):
        _fail("--kind must be diagseg or grounding, --generator template or llm")
    template = TemplateGenerator(seed)
    try:
        text_generator = template if generator == "template" else LLMGenerator(ChatClient.from_env(), max_attempts, template if fallback else None)
        label_space = resolve_taxonomy(data, taxonomy)
        if region_codes is not None:
            triples = triples_from_region_codes(region_codes, data, split, label_space)
        elif kind == "grounding":
            _fail("grounding conversations need region tokens: pass --region-codes GROUNDING_DIR/region_codes/<split>.json")
        else:
            triples = triples_from_biomedparse(data, split, label_space)
        build = build_diagseg if kind == "diagseg" else build_grounding_conversations
        report = build(triples, text_generator, out)
    except (LLMError, DataError, ValueError) as error:
        _fail(f"{error}\n(progress is kept in {out.with_suffix('.work')}; rerun the same command to resume)")
    console.print(f"wrote {report.written} items to {report.output} ({report.generated_now} new, {report.rejected} rejected)")


def main() -> None:  # pragma: no cover - `python -m medsight.eval.cli`
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    eval_app()


if __name__ == "__main__":  # pragma: no cover
    main()
