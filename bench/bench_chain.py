"""Per-stage wall time and peak memory of the tiny chain (each stage in its own process).

Usage: python bench/bench_chain.py [--workdir DIR] [--set key=value ...]
Prints a markdown table; paste it into BENCHMARKS.md ("Tiny chain").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medsight.stages.registry import STAGES, input_sources


def run_stage(name: str, out: Path, inputs: dict[str, Path], overrides: list[str]) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "medsight.cli", "stage", "run", name, "--out", str(out)]
    for key, path in inputs.items():
        cmd += ["--input", f"{key}={path}"]
    for override in overrides:
        cmd += ["--set", override]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{name}.log"
    started = time.perf_counter()
    # To a file, not a pipe: progress bars would fill a pipe nobody reads until exit and block the stage.
    with open(log, "wb") as handle:
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        # wait4 gives this child's own rusage, so each stage's peak RSS is measured separately.
        _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{name} failed; see {log}:\n{log.read_text(errors='replace')[-3000:]}")
    return elapsed, usage.ru_maxrss / 1024 / 1024  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medsight-bench-"))
    outputs: dict[str, Path] = {}
    rows = []
    for spec in STAGES:
        inputs = {name: outputs[source] for name, source in input_sources(spec).items()}
        out = workdir / spec.name
        seconds, peak_gib = run_stage(spec.name, out, inputs, args.overrides)
        outputs[spec.name] = out
        rows.append((spec.name, seconds, peak_gib))
        print(f"{spec.name:20s} {seconds:7.1f} s  {peak_gib:5.2f} GiB", flush=True)
    total = sum(r[1] for r in rows)
    print("\n| stage | wall time (s) | peak RSS (GiB) |\n|---|---:|---:|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.1f} | {peak:.2f} |")
    print(f"| **total** | **{total:.1f}** | **{max(r[2] for r in rows):.2f}** (max) |")
    print(f"\noutputs: {workdir}")


if __name__ == "__main__":
    main()
