"""Every stage for a few steps on the visible GPUs at the full preset's widths, then evaluation
on a few samples; per stage: step time, images/s or tokens/s, peak GPU memory, and MFU for the
LLM stages.

    python bench/gpu_smoke.py --workdir /tmp/smoke [--steps 6] [--llm-layers 2] [--json out.json]
    python bench/gpu_smoke.py --workdir /tmp/smoke --cpu-dry-run   # the same wiring, tiny widths, CPU

Each stage runs as a user runs it, ``medsight stage run NAME --nproc-per-node auto`` (one rank
per visible GPU, DDP for stages 1-2, DeepSpeed ZeRO-3 in bf16 for 3-5), on synthetic data at
336 px with random-init weights of the full widths (ViT-L/14-336, perceiver d=256, Qwen3-8B's
hidden size, heads and MLP) and ``--llm-layers`` decoder layers instead of 36. The synthetic
tokenizer's vocabulary is small, so the LM head is far cheaper than Qwen3's 151,936 rows; MFU
counts the model's own FLOPs (6 per parameter per token when every weight trains, 4 when the
LLM is frozen: forward plus the backward through its activations), without recomputation.
Figures come from the stages' own per-step log (``history.jsonl``: step_seconds, peak_gpu_mib,
tokens) and ``metrics.json``; the first step (warm-up, cuDNN autotuning) is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Dense bf16 peak per GPU (datasheet, no sparsity).
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12}
CHAIN = (
    ("synth-data", {}),
    ("base-models", {"data": "synth-data"}),
    ("perceiver-pretrain", {"data": "synth-data", "base": "base-models"}),
    ("codebook-pretrain", {"data": "synth-data", "base": "base-models", "perceiver": "perceiver-pretrain"}),
    ("v2t-align", {"data": "synth-data", "base": "base-models", "perceiver": "perceiver-pretrain"}),
    ("grounding-data", {"data": "synth-data", "base": "base-models", "codebook": "codebook-pretrain"}),
    ("t2v-align", {"data": "synth-data", "base": "base-models", "codebook": "codebook-pretrain",
                   "grounding": "grounding-data", "v2t": "v2t-align"}),
    ("instruct-tune", {"data": "synth-data", "base": "base-models", "codebook": "codebook-pretrain",
                       "grounding": "grounding-data", "v2t": "v2t-align", "t2v": "t2v-align"}),
    ("evaluate", {"data": "synth-data", "base": "base-models", "model": "instruct-tune", "grounding": "grounding-data"}),
)
TRAINING = {"perceiver-pretrain": "perceiver_pretrain", "codebook-pretrain": "codebook_pretrain",
            "v2t-align": "v2t_align", "t2v-align": "t2v_align", "instruct-tune": "instruct_tune"}
LLM_STAGES = ("v2t-align", "t2v-align", "instruct-tune")


def overrides(args) -> tuple[str, list[str]]:
    if args.cpu_dry_run:
        common = ["data.train_images=32", "data.val_images=8", "data.test_images=8"]
        return "tiny", common
    common = [
        "data.source=synthetic", f"data.train_images={args.images}", "data.val_images=16", "data.test_images=16",
        "data.image_size=336", "model.encoder.weights_path=null", "model.llm.weights_path=null",
        f"model.llm.num_layers={args.llm_layers}", "model.llm.tokenizer_vocab_size=32000",
        # The synthetic label space: 6 modalities (the authors' fine-grained split has 18).
        "model.codebook.num_modalities=6", "evaluate.max_new_tokens=32", "evaluate.temperature=0",
    ]
    return "full", common


def stage_overrides(stage: str, steps: int) -> list[str]:
    section = TRAINING.get(stage)
    if section is None:
        return []
    return [f"{section}.max_steps={steps}", f"{section}.log_every=1", f"{section}.checkpoint_every=100000",
            f"{section}.epochs=100"]


def run_stage(stage: str, inputs: dict[str, Path], out: Path, preset: str, sets: list[str], log: Path) -> float:
    command = [sys.executable, "-m", "medsight.cli", "stage", "run", stage, "--out", str(out), "--preset", preset,
               "--force"]
    if stage in TRAINING or stage == "evaluate":
        command += ["--nproc-per-node", "auto"]  # one rank per GPU; the data stages run in one process
    for name, path in inputs.items():
        command += ["--input", f"{name}={path}"]
    for item in sets:
        command += ["--set", item]
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ})
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {done.returncode}); its log: {log}")
    return time.perf_counter() - started


def _gpu() -> tuple[str, int, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", 1, None
    name = torch.cuda.get_device_name(0)
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)
    return name, torch.cuda.device_count(), peak


def summarise(stage: str, out: Path, section: str | None, llm_params: float, trained_llm: bool, peak: float | None) -> dict:
    record = json.loads((out / "stage.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    world = int(record.get("world_size", 1))
    row: dict = {"stage": stage, "world_size": world}
    if section is None:
        if stage == "evaluate":
            row.update(samples_per_second=metrics.get("samples_per_second"), peak_gpu_mib=metrics.get("peak_memory_mb"))
        return row
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    timed = [p for p in history if p["step"] > 1] or history
    step = statistics.median(p[f"{stage}/step_seconds"] for p in timed)
    row["step_seconds"] = round(step, 4)
    row["peak_gpu_mib"] = max((p.get(f"{stage}/peak_gpu_mib", 0.0) for p in history), default=None)
    config = __import__("yaml").safe_load((out / "config.yaml").read_text())
    batch = config[section]["batch_size"] * world
    if stage in LLM_STAGES:
        tokens = statistics.mean(p[f"{stage}/tokens"] for p in timed) * world
        row["tokens_per_second"] = round(tokens / step, 1)
        flops_per_token = (6 if trained_llm else 4) * llm_params
        if peak:
            row["mfu"] = round(tokens / step * flops_per_token / (peak * world), 4)
    else:
        row["images_per_second"] = round(batch / step, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU: check the wiring at tiny widths on the CPU")
    args = parser.parse_args()
    gpu, count, peak = _gpu()
    if gpu == "cpu" and not args.cpu_dry_run:
        raise SystemExit("no GPU is visible: this smoke test runs the full preset's widths on GPUs. "
                         "Run it where nvidia-smi shows one, or pass --cpu-dry-run to check the wiring here.")
    preset, common = overrides(args)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    rows = []
    llm_params = 0.0
    print(f"device: {gpu} x {count}; preset {preset} ({'CPU dry run' if args.cpu_dry_run else 'full widths'})", flush=True)
    for stage, wanted in CHAIN:
        out = work / stage
        inputs = {name: outputs[source] for name, source in wanted.items()}
        seconds = run_stage(stage, inputs, out, preset, [*common, *stage_overrides(stage, args.steps)],
                            work / f"{stage}.log")
        outputs[stage] = out
        if stage == "base-models":
            llm_params = json.loads((out / "metrics.json").read_text())["llm_parameters"]
        row = summarise(stage, out, TRAINING.get(stage), llm_params, stage == "instruct-tune", peak)
        row["stage_seconds"] = round(seconds, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{gpu} x {count}, {args.llm_layers} LLM layers, {args.steps} steps per stage\n")
    print("| stage | ranks | step (s) | images/s | tokens/s | MFU | peak GPU (MiB) | stage wall (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [row.get("step_seconds", "-"), row.get("images_per_second", row.get("samples_per_second", "-")),
                 row.get("tokens_per_second", "-"), row.get("mfu", "-"), row.get("peak_gpu_mib", "-")]
        print(f"| {row['stage']} | {row['world_size']} | " + " | ".join(str(c) for c in cells) + f" | {row['stage_seconds']} |")
    if args.json:
        args.json.write_text(json.dumps({"device": gpu, "gpus": count, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
