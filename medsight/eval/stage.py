"""Stage 6, ``evaluate``: every benchmark, paper-shaped tables, the HTML report, MLflow logging.

Inputs: ``data`` (dataset root), ``base`` (tokenizer + encoder), ``model`` (the newest trained
bundle) and ``grounding`` (its ``diagseg_test.json`` is DiagSeg). Which benchmarks run:
``data/benchmarks.json`` when the dataset ships a manifest (real releases, see
``benchmarks/manifest.py``), else the synthetic test split written in every public format.
Outputs: ``results.json``, ``predictions.jsonl``, ``tables.md``, ``examples.json``,
``overlays/``, ``report.html``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from medsight.config.io import to_dict
from medsight.config.schema import ExperimentConfig
from medsight.data.prepared_index import index_path
from medsight.data.taxonomy import Taxonomy, resolve_taxonomy
from medsight.eval.benchmarks.manifest import load_manifest
from medsight.eval.coverage import trained_formats, untrained_benchmarks
from medsight.eval.curves import collect_curves
from medsight.eval.examples import write_examples
from medsight.eval.protocols import LLAVA_MED_SUFFIX, PROTOCOLS, check_protocol, protocol_metric
from medsight.eval.report import build_report, run_label
from medsight.eval.results_io import flat_metrics, results_document, summaries_from, write_predictions, write_results
from medsight.eval.runner import GenerationSettings, evaluate_all, peak_memory_mb
from medsight.eval.synthetic_benchmarks import write_synthetic_benchmarks
from medsight.eval.tables import all_tables, comprehension_table, render_markdown
from medsight.io_utils import atomic_write_text
from medsight.stages.lineage import read_lineage
from medsight.train import distributed
from medsight.train.tracker import Tracker

logger = logging.getLogger(__name__)
VQA_BENCHMARKS = ("vqa_rad", "slake", "pathvqa")
REQUIRED_METRICS = ("closed_accuracy", "open_recall", "seg_dice")


def benchmark_manifest(data: Path, grounding: Path | None, output: Path, taxonomy: Taxonomy) -> Path:
    """The dataset's own manifest if it has one, else the synthetic benchmarks (written now)."""
    shipped = Path(data) / "benchmarks.json"
    if shipped.is_file():
        return shipped
    if not index_path(Path(data), "test").is_file():
        raise FileNotFoundError(
            f"{data}: no benchmarks.json and no synthetic test split; write a manifest listing the "
            "benchmark releases (see medsight/eval/benchmarks/manifest.py) into the dataset folder"
        )
    return write_synthetic_benchmarks(Path(data), Path(output) / "benchmarks", taxonomy, grounding)


def _pooled(summaries: dict, benchmarks: tuple[str, ...], metric: str) -> float:
    """Mean over all questions of several benchmarks (n-weighted), NaN if none ran."""
    total = count = 0.0
    for name in benchmarks:
        summary = summaries.get(name, {}).get(metric)
        if summary and summary["n"]:
            total += summary["micro"] * summary["n"]
            count += summary["n"]
    return total / count if count else float("nan")


def headline_metrics(document: dict) -> dict[str, float]:
    """The registry's metrics (closed_accuracy, open_recall, seg_dice) and a few more."""
    summaries = summaries_from(document)

    def get(benchmark: str, metric: str, average: str) -> float:
        summary = summaries.get(benchmark, {}).get(metric)
        return summary[average] if summary and summary["n"] else float("nan")

    # Benchmarks in a format the model never trained on stay out of the average (coverage.py).
    untrained = untrained_benchmarks(summaries, document.get("run", {}).get("trained_formats"))

    def average(protocol: str) -> float:
        cell = comprehension_table(summaries, untrained=untrained, protocol=protocol).rows[0][-1]
        return float(cell) / 100 if cell != "-" else float("nan")

    box_benchmarks = tuple(name for name in ("schain", "medtrinity") if name in summaries)
    headline = {
        "seg_dice": get("diagseg", "dice", "macro"),
        "mc_accuracy": _pooled(summaries, ("mmmu_med", "omnimedvqa"), "mc_accuracy"),
        "mecovqa_dice": get("mecovqa_g", "dice", "macro"),
        "box_miou": _pooled(summaries, box_benchmarks, "box_miou"),
    }
    # Text metrics under both protocols: the plain names are strict, "_llava_med" ones LLaVA-Med's.
    for protocol in PROTOCOLS:
        for metric in ("closed_accuracy", "open_recall"):
            headline[protocol_metric(metric, protocol)] = _pooled(summaries, VQA_BENCHMARKS, protocol_metric(metric, protocol))
        headline[protocol_metric("diagnosis_recall", protocol)] = get("diagseg", protocol_metric("diagnosis_recall", protocol), "macro")
        headline["comprehension_avg" + ("" if protocol == "strict" else LLAVA_MED_SUFFIX)] = average(protocol)
    return headline


def evaluate_model(
    model,
    manifest: Path,
    output: Path,
    config: ExperimentConfig,
    run_info: dict,
    curve_dirs: list[Path] = (),
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run every benchmark of ``manifest`` and write all outputs; returns the results document.
    The model's ``taxonomy`` attribute, if it has one, tells it each sample's modality."""
    output = Path(output)
    settings = GenerationSettings(
        batch_size=config.evaluate.batch_size,
        max_new_tokens=config.evaluate.max_new_tokens,
        temperature=config.evaluate.temperature,
        repetition_penalty=config.evaluate.repetition_penalty,
    )
    datasets = load_manifest(manifest)
    started = time.perf_counter()
    results = evaluate_all(model, datasets, settings, keep_examples=config.evaluate.report_samples, progress=progress,
                           taxonomy=getattr(model, "taxonomy", None))
    seconds = time.perf_counter() - started
    if not distributed.is_main():
        return {}  # rank 0 holds every rank's results and writes them
    evaluated = sum(len(r.results) for r in results)
    protocol = check_protocol(config.evaluate.protocol)
    run_info = {
        **run_info,
        "protocol": protocol,
        "samples": evaluated,
        "seconds": round(seconds, 2),
        "samples_per_second": round(evaluated / seconds, 3) if seconds else 0.0,
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "device": device,
        "settings": str(to_dict(config.evaluate)),
    }
    document = results_document(results, run_info)
    write_results(output / "results.json", document)
    write_predictions(output / "predictions.jsonl", results)
    write_examples(results, output)
    summaries = summaries_from(document)
    untrained = untrained_benchmarks(summaries, run_info.get("trained_formats"))
    label = run_label(read_lineage(output))
    atomic_write_text(output / "tables.md", render_markdown(all_tables(summaries, label, untrained, protocol=protocol)))
    build_report(output, curves=collect_curves(list(curve_dirs)))
    return document


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    from medsight.model.inference import MedSightInference

    output = Path(output)
    device = str(distributed.device())
    taxonomy = resolve_taxonomy(Path(inputs["data"]), config.data.taxonomy)
    # Rank 0 writes the synthetic benchmarks (when the dataset ships none); every rank reads them.
    manifest = benchmark_manifest(inputs["data"], inputs.get("grounding"), output, taxonomy) if distributed.is_main() else None
    manifest = Path(distributed.broadcast_from_main(str(manifest) if manifest else None))
    # bf16 on a GPU (an 8B LLM in half the memory and twice the speed); float32 on the CPU.
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = MedSightInference.load(Path(inputs["model"]), Path(inputs["base"]), device=device, dtype=dtype)
    tracker.log_params({f"evaluate.{k}": v for k, v in to_dict(config.evaluate).items()})
    document = evaluate_model(
        model,
        manifest,
        output,
        config,
        # Versions, not paths: the inputs' DVC hashes are in this output's lineage.json.
        run_info={"preset": config.preset, "trained_formats": trained_formats(Path(inputs["data"]))},
        curve_dirs=[Path(p) for p in inputs.values()],
        device=device,
    )
    if not distributed.is_main():
        return {}
    metrics = {**flat_metrics(document), **headline_metrics(document)}
    metrics["samples_per_second"] = float(document["run"]["samples_per_second"])
    metrics["peak_memory_mb"] = float(document["run"]["peak_memory_mb"])
    for name in ("report.html", "results.json", "tables.md", "predictions.jsonl"):
        tracker.log_artifact(output / name, "eval")
    for overlay in sorted((output / "overlays").rglob("*.png")):
        tracker.log_artifact(overlay, f"eval/overlays/{overlay.parent.name}")
    logger.info("evaluation report: %s", output / "report.html")
    # A benchmark that did not run gives NaN: keep it out of MLflow except for the registry's three.
    return {k: v for k, v in metrics.items() if not math.isnan(v) or k in REQUIRED_METRICS}
