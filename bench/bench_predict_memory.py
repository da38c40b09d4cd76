"""Peak memory of writing a prediction's masks for a large image: per mask vs all masks at once.

``medsight predict`` keeps masks at the model's resolution and resizes each one to the image only
while it is written (``eval/examples.write_prediction_files``). Before issue 9 every mask was
resized to the image's resolution first, so memory grew with (number of region tokens) x (image
pixels). Each mode runs in its own process (peak RSS via wait4), with a stand-in answer of K masks
so only the mask handling differs.

Usage: python bench/bench_predict_memory.py [--size 6000] [--masks 8]
Prints a markdown table; paste it into BENCHMARKS.md ("Predict memory").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import sys, torch
from pathlib import Path
from medsight.eval.metrics import resize_probabilities
from medsight.eval.predict import Prediction, write_prediction
mode, size, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
image = torch.rand(3, size, size)  # [3, H, W], what load_input_image returns
masks = torch.rand(count, 64, 64)  # [K, S, S] at the tiny model's resolution
if mode == "all-at-once":  # the pre-issue-9 path: every mask at full resolution first
    masks = resize_probabilities(masks, (size, size))
prediction = Prediction("answer", [f"[C0_{i}]" for i in range(count)], masks, [None] * count, [])
write_prediction(out, image, "q", prediction, Path("scan.png"))
"""


def peak_gib(mode: str, size: int, count: int, out: Path) -> float:
    process = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(size), str(count), str(out)])
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{mode} failed (status {status})")
    return usage.ru_maxrss / 1024 / 1024  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000, help="image side in pixels")
    parser.add_argument("--masks", type=int, default=8, help="region tokens in the answer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(mode, peak_gib(mode, args.size, args.masks, Path(tmp) / mode)) for mode in ("per-mask", "all-at-once")]
    print("| masks resized | image | region tokens | peak RSS (GiB) |\n|---|---|---|---|")
    for mode, gib in rows:
        print(f"| {mode} | {args.size} x {args.size} | {args.masks} | {gib:.2f} |")


if __name__ == "__main__":
    main()
