"""Region Perceiver training steps/s at the full preset's shapes (and the tiny preset's).

Full: 576 patch tokens of width 1024, 20 queries, 3 layers, d=256, I_r at 192x192, masks 336x336.
Usage: python bench/bench_perceiver.py [--device cuda] [--batch 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from medsight.config import get_preset
from medsight.model.criterion import SetCriterion
from medsight.model.region_perceiver import RegionPerceiver


def bench(preset: str, batch: int, steps: int, device: str, dtype: torch.dtype) -> tuple[float, float]:
    config = get_preset(preset)
    encoder, perceiver_cfg = config.model.encoder, config.model.perceiver
    model = RegionPerceiver(encoder.width, perceiver_cfg).to(device)
    criterion = SetCriterion(perceiver_cfg.num_classes, config.model.loss).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randn(batch, encoder.num_patches, encoder.width, device=device)
    size = encoder.image_size
    masks = [(torch.rand(4, size, size, device=device) > 0.7).float() for _ in range(batch)]
    labels = [torch.randint(0, perceiver_cfg.num_classes, (4,), device=device) for _ in range(batch)]

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = criterion(model(tokens), masks, labels).total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # process max RSS (monotonic, so the full row includes the tiny run before it)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return steps / elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"device={args.device} threads={torch.get_num_threads()} dtype={dtype}")
    print("| preset | batch | steps/s | images/s | peak mem (GiB; GPU allocator or CPU RSS) |\n|---|---:|---:|---:|---:|")
    for preset, batch in (("tiny", 16), ("full", args.batch)):
        rate, peak = bench(preset, batch, args.steps, args.device, dtype)
        print(f"| {preset} | {batch} | {rate:.3f} | {rate * batch:.2f} | {peak:.2f} |", flush=True)


if __name__ == "__main__":
    main()
