"""Peak host memory of stage 1 against the size of its training split (streaming data path).

    python bench/bench_stage_memory.py --workdir /tmp/mem [--sizes 1000 8000] [--steps 40]
                                       [--code /work/main]   # the same on another checkout

For each size a synthetic dataset is generated (tiny preset, 64 px; val/test fixed at 100
images), and ``medsight stage run perceiver-pretrain`` runs in its own process for a fixed number
of steps; its peak RSS is read from ``wait4``. Run with the stage's per-image caches off (the
default, and the full preset's setting) and, for reference, with the tiny preset's bounded
caches (``feature_cache_mb``), whose growth stops at the budget. ``--code`` runs the same
against another checkout (e.g. the in-memory ``load_split`` before issue 10).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], code: Path, log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of ``python -m medsight.cli ARGS`` from checkout ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code), "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "medsight.cli", *args], stdout=handle, stderr=handle, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"medsight {' '.join(args[:3])} failed; see {log}")
    return time.perf_counter() - started, usage.ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 8000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose medsight to run")
    parser.add_argument("--cache-mb", type=int, nargs="+", default=[0, 256],
                        help="perceiver_pretrain.feature_cache_mb values to measure (0 = off)")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    base = None
    for size in args.sizes:
        data = work / f"data-{size}"
        if not (data / "stage.json").is_file():
            _run(["stage", "run", "synth-data", "--out", str(data), "--set", f"data.train_images={size}"],
                 ROOT, work / f"synth-{size}.log")
        if base is None:
            base = work / "base"
            if not (base / "stage.json").is_file():
                _run(["stage", "run", "base-models", "--out", str(base), "--input", f"data={data}"], ROOT, work / "base.log")
        for cache in args.cache_mb:
            out = work / f"perceiver-{size}-{cache}-{args.code.name}"
            stage = ["stage", "run", "perceiver-pretrain", "--out", str(out), "--input", f"data={data}",
                     "--input", f"base={base}", "--force", "--set", f"perceiver_pretrain.max_steps={args.steps}"]
            if cache or args.code == ROOT:
                stage += ["--set", f"perceiver_pretrain.feature_cache_mb={cache}"]
            seconds, peak = _run(stage, args.code, work / f"perceiver-{size}-{cache}.log")
            rows.append({"train_images": size, "feature_cache_mb": cache, "steps": args.steps,
                         "seconds": round(seconds, 1), "peak_rss_gib": round(peak, 3), "code": str(args.code)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| train images | feature_cache_mb | steps | wall (s) | peak RSS (GiB) |\n|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['train_images']} | {row['feature_cache_mb']} | {row['steps']} | {row['seconds']} | {row['peak_rss_gib']} |")
    for cache in args.cache_mb:
        peaks = [r["peak_rss_gib"] for r in rows if r["feature_cache_mb"] == cache]
        if len(peaks) > 1:
            print(f"feature_cache_mb={cache}: largest/smallest peak = {max(peaks) / min(peaks):.3f}")
    (work / "memory.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
