"""``medsight eval ...`` commands (and ``predict_command``, mounted as ``medsight predict``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from medsight.data.errors import DataError
from medsight.model.input_limits import DEFAULT_MAX_PIXELS

eval_app = typer.Typer(help="Evaluate checkpoints, predict on images, build reports, generate data.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # soft wrap: paths in messages stay copyable


def _fail(message: str, code: int = 1) -> None:
    """One line; exit 1 for bad data or a failure, 2 for a usage error. Errors raised instead
    reach ``medsight.cli_errors`` (one line, exit 1) through main()."""
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def _base_for(checkpoint: Path, base: Path | None) -> Path:
    """--base, else the base-models input the checkpoint records (by DVC hash): found locally or
    fetched from the store (``medsight/platform/resolve.py``)."""
    from medsight.platform.resolve import ResolveError, base_for

    try:
        return base_for(checkpoint, base)
    except ResolveError as error:
        _fail(str(error), code=1)
    raise AssertionError  # unreachable: _fail exits


def _check_checkpoint(checkpoint: Path) -> None:
    if not checkpoint.is_dir():
        _fail(f"{checkpoint}: checkpoint folder not found (an instruct-tune or t2v-align stage output)", code=2)


def _load_model(checkpoint: Path, base: Path | None, device: str):
    """Errors (a tampered config.yaml, corrupt weights, shapes that disagree) name their file."""
    from medsight.model.inference import MedSightInference

    _check_checkpoint(checkpoint)
    return MedSightInference.load(checkpoint, _base_for(checkpoint, base), device=device)


def _check_question(checkpoint: Path, base: Path | None, question: str, max_new_tokens: int | None) -> None:
    """Before the model loads (minutes at full scale): does the question fit the context?
    ``max_new_tokens`` None: the checkpoint's own ``evaluate.max_new_tokens``."""
    from medsight.config.io import load_config
    from medsight.data.tokenizer import load_tokenizer
    from medsight.eval.predict import check_question_fits
    from medsight.model.bundle import find_dir

    config_file = checkpoint / "config.yaml"
    if not config_file.is_file():
        return  # loading the model reports it
    full = load_config(config_file)
    config = full.model
    max_new_tokens = max_new_tokens if max_new_tokens is not None else full.evaluate.max_new_tokens
    tokenizer_dir = find_dir({"model": checkpoint, "base": _base_for(checkpoint, base)}, "tokenizer")
    if tokenizer_dir is None:
        return
    visual = config.num_patch_tokens + (config.perceiver.num_queries if config.region_embeddings else 0)
    check_question_fits(load_tokenizer(tokenizer_dir), question, config.llm.max_position_embeddings, visual,
                        max_new_tokens, config.llm)


def predict_command(
    checkpoint: Annotated[Path, typer.Option(help="Trained model folder (instruct-tune or t2v-align output).")],
    image: Annotated[Path, typer.Option(help="PNG/JPEG image or DICOM file.")],
    question: Annotated[str, typer.Option(help="Question about the image.")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default: predictions/<image name>).")] = None,
    base: Annotated[Path | None, typer.Option(help="base-models output (default: read from the checkpoint's stage.json).")] = None,
    modality: Annotated[str | None, typer.Option(help="Modality name (e.g. CT) to pick the sub-codebook; default: predicted.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Longest answer, in tokens. Default: the checkpoint's evaluate.max_new_tokens (512 at full scale).")] = None,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    device: str = "cpu",
    max_pixels: Annotated[int, typer.Option(min=1, help="Largest image accepted, in pixels (width x height).")] = DEFAULT_MAX_PIXELS,
) -> None:
    """Answer a question about one image; write the answer, a mask and an overlay per region token, and boxes."""
    from medsight.eval.predict import load_input_image, predict_image, write_prediction
    from medsight.io_utils import ensure_writable_dir

    # Everything that can be wrong with the request is found before the model loads.
    target = out or Path("predictions") / image.stem
    ensure_writable_dir(target, "--out")
    pixels = load_input_image(image, max_pixels)
    _check_checkpoint(checkpoint)
    _check_question(checkpoint, base, question, max_new_tokens)
    model = _load_model(checkpoint, base, device)
    if max_new_tokens is None:
        config = getattr(model, "config", None)  # a trained model's own setting; 48 otherwise
        max_new_tokens = config.evaluate.max_new_tokens if config is not None else 48
    try:
        prediction = predict_image(model, pixels, question, modality, max_new_tokens, temperature,
                                   taxonomy=getattr(model, "taxonomy", None))
    except ValueError as error:  # e.g. an unknown --modality
        _fail(str(error), code=2)
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
    from medsight.eval.benchmarks.manifest import load_manifest
    from medsight.eval.protocols import PROTOCOLS
    from medsight.eval.stage import evaluate_model, headline_metrics
    from medsight.io_utils import ensure_writable_dir

    if protocol is not None and protocol not in PROTOCOLS:
        _fail(f"--protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}", code=2)
    ensure_writable_dir(out, "--out")
    _check_checkpoint(checkpoint)
    load_manifest(benchmarks)  # a broken manifest or benchmark file is named before the model loads
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
    curves_from: Annotated[list[Path] | None, typer.Option(help="Stage outputs to read training curves from (default: the evaluation's own lineage.json, which carries every upstream stage's).")] = None,
    include_untrained: Annotated[bool, typer.Option(help="Average in benchmarks whose question format the model was never trained on (they are marked either way).")] = False,
) -> None:
    """Rebuild the self-contained HTML report of an evaluation folder."""
    from medsight.eval.curves import collect_curves
    from medsight.eval.report import build_report

    if not (eval_dir / "results.json").is_file():  # not an evaluation folder: a usage error
        _fail(f"{eval_dir}: no results.json here; run `medsight stage run evaluate` (or `medsight chain`) first", code=2)
    try:
        path = build_report(eval_dir, curves=collect_curves(list(curves_from or [eval_dir])), output=out,
                            include_untrained=include_untrained)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    console.print(f"report written: {path}")


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
        _fail("--kind must be diagseg or grounding, --generator template or llm", code=2)
    template = TemplateGenerator(seed)
    try:
        text_generator = template if generator == "template" else LLMGenerator(ChatClient.from_env(), max_attempts, template if fallback else None)
        label_space = resolve_taxonomy(data, taxonomy)
        if region_codes is not None:
            triples = triples_from_region_codes(region_codes, data, split, label_space)
        elif kind == "grounding":
            _fail("grounding conversations need region tokens: pass --region-codes GROUNDING_DIR/region_codes/<split>.json", code=2)
        else:
            triples = triples_from_biomedparse(data, split, label_space)
        build = build_diagseg if kind == "diagseg" else build_grounding_conversations
        report = build(triples, text_generator, out)
    except (LLMError, DataError, ValueError) as error:
        _fail(f"{error} (progress is kept in {out.with_suffix('.work')}; rerun the same command to resume)")
    console.print(f"wrote {report.written} items to {report.output} ({report.generated_now} new, {report.rejected} rejected)")


def main() -> None:  # pragma: no cover - `python -m medsight.eval.cli`
    from medsight.cli_errors import main_for

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    main_for(eval_app, "medsight-eval")


if __name__ == "__main__":  # pragma: no cover
    main()
