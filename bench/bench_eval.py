"""Evaluation throughput (samples/s) and peak memory on the tiny preset.

Trains (or reuses) a tiny chain up to instruct-tune, then evaluates it on every synthetic
benchmark once per batch size, each run in its own process so peak memory is the evaluation's
own. Writes the "## Evaluation" section of BENCHMARKS.md (other sections are left alone).

Usage: python bench/bench_eval.py [--workdir DIR] [--batch-sizes 1,8,16] [--max-steps 10]
       [--from-chain TRAINED_CHAIN_DIR] [--set key=value ...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Evaluation"


def train_chain(workdir: Path, max_steps: int, overrides: list[str]) -> dict[str, Path]:
    """Tiny chain up to instruct-tune, with capped steps (the bench times evaluation, not training)."""
    from medsight.config.io import apply_overrides
    from medsight.config.presets import get_preset
    from medsight.stages.chain import run_chain

    caps = [f"{stage}.max_steps={max_steps}" for stage in ("perceiver_pretrain", "codebook_pretrain", "v2t_align", "t2v_align", "instruct_tune")]
    # A small training set keeps the setup short; the test split (what is evaluated) keeps 40 images.
    sizes = ["data.train_images=60", "data.val_images=20", "data.test_images=40"]
    config = apply_overrides(get_preset("tiny"), caps + sizes + overrides)
    result = run_chain(config, workdir, until="instruct-tune")
    return {name: record.output for name, record in result.stages.items()}


def chain_outputs(workdir: Path) -> dict[str, Path]:
    """Outputs of an already-trained chain (``medsight chain --workdir DIR``): newest per stage."""
    outputs = {}
    for stage in ("synth-data", "base-models", "grounding-data", "instruct-tune"):
        # `medsight chain` keeps <stage>/<fingerprint>/, bench_chain.py plain <stage>/
        candidates = [*Path(workdir).glob(f"{stage}/*/stage.json"), *Path(workdir).glob(f"{stage}/stage.json")]
        finished = sorted(candidates, key=lambda p: p.stat().st_mtime)
        if not finished:
            raise SystemExit(f"{workdir}: no finished {stage} output; run `medsight chain --workdir {workdir}` first")
        outputs[stage] = finished[-1].parent
    return outputs


def worker(args: argparse.Namespace) -> None:
    """One evaluation in this process; prints a JSON line with the numbers."""
    from medsight.config.io import load_config
    from medsight.eval.stage import benchmark_manifest, evaluate_model
    from medsight.model.inference import MedSightInference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MedSightInference.load(args.model, args.base, device=device)
    config = load_config(args.model / "config.yaml")
    from medsight.data.taxonomy import resolve_taxonomy

    taxonomy = resolve_taxonomy(args.data, config.data.taxonomy)
    config.evaluate.batch_size = args.batch_size
    config.evaluate.max_new_tokens = args.max_new_tokens
    config.evaluate.report_samples = 2
    out = args.out
    manifest = benchmark_manifest(args.data, args.grounding, out, taxonomy)
    document = evaluate_model(model, manifest, out, config, {"bench": "eval"}, device=device, progress=False)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    tokens = [len(model.tokenizer.encode(line["prediction"], add_special_tokens=False)) for line in lines]
    print("RESULT " + json.dumps({
        "batch_size": args.batch_size,
        "samples": document["run"]["samples"],
        "seconds": document["run"]["seconds"],
        "samples_per_second": document["run"]["samples_per_second"],
        "peak_memory_mb": document["run"]["peak_memory_mb"],
        "mean_answer_tokens": sum(tokens) / max(1, len(tokens)),
        "device": device,
    }), flush=True)


def run_worker(outputs: dict[str, Path], batch_size: int, max_new_tokens: int, workdir: Path) -> dict:
    out = workdir / f"eval-bs{batch_size}"
    cmd = [sys.executable, __file__, "--worker", "--batch-size", str(batch_size), "--max-new-tokens", str(max_new_tokens),
           "--model", str(outputs["instruct-tune"]), "--base", str(outputs["base-models"]), "--data", str(outputs["synth-data"]),
           "--grounding", str(outputs["grounding-data"]), "--out", str(out)]
    started = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"evaluation with batch size {batch_size} failed:\n{stderr[-3000:]}")
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


def section(results: list[dict], args: argparse.Namespace) -> str:
    cpu = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    lines = [
        SECTION,
        "",
        f"`python bench/bench_eval.py {trained_by(args)} --batch-sizes {args.batch_sizes}` "
        f"(tiny preset, every synthetic benchmark: VQA-RAD/SLAKE/PathVQA, MMMU-Med, OmniMedVQA, DiagSeg, "
        f"MeCoVQA-G, S-Chain, MedTrinity; greedy decoding, max_new_tokens={args.max_new_tokens}; {results[0]['device']}, {cpu}; "
        f"torch {torch.__version__}; measured {time.strftime('%Y-%m-%d')}).",
        "",
        "| batch size | samples | eval time (s) | samples/s | mean answer tokens | peak memory (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['batch_size']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_second']:.2f} | {r['mean_answer_tokens']:.1f} | {r['peak_memory_mb']:.0f} |")
    mean_tokens = sum(r["mean_answer_tokens"] for r in results) / len(results)
    lines += [
        "",
        "Peak memory is the evaluation process's max RSS on CPU (CUDA allocator peak on GPU), including "
        "model load and the torch/transformers libraries, which dominate it at this size. Eval time "
        "excludes model loading and reading the benchmarks. The model is "
        + ("the fully trained tiny chain" if args.from_chain else f"a tiny chain trained for {args.max_steps} steps per stage")
        + f" (mean answer {mean_tokens:.1f} tokens); generation cost grows "
        "with answer length, up to max_new_tokens. Each batch size runs once in a fresh process; on a "
        "shared 2-core machine other load moves these times a lot (3x seen between two runs).",
        "",
        "",
    ]
    return "\n".join(lines)


def trained_by(args: argparse.Namespace) -> str:
    return "--from-chain DIR" if args.from_chain else f"--max-steps {args.max_steps}"


def write_section(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace (or append) only the "## Evaluation" section."""
    current = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    updated = pattern.sub(text, current) if pattern.search(current) else current.rstrip("\n") + "\n\n" + text
    from medsight.io_utils import atomic_write_text

    atomic_write_text(path, updated)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench_eval")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--from-chain", type=Path, help="evaluate this trained chain's model instead of training a short one")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    # Internal: one evaluation run in a child process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("model", "base", "data", "grounding", "out"):
        parser.add_argument(f"--{name}", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.from_chain:
        outputs = chain_outputs(args.from_chain)
        args.workdir.mkdir(parents=True, exist_ok=True)
    else:
        outputs = train_chain(args.workdir, args.max_steps, args.overrides)
    results = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        result = run_worker(outputs, batch_size, args.max_new_tokens, args.workdir)
        print(f"batch {batch_size:3d}: {result['samples_per_second']:.2f} samples/s, peak {result['peak_memory_mb']:.0f} MiB", flush=True)
        results.append(result)
    text = section(results, args)
    if args.no_write:
        print(text)
    else:
        write_section(text)
        print(f"updated {ROOT / 'BENCHMARKS.md'} ({SECTION})")


if __name__ == "__main__":
    main()
