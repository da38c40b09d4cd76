"""Region Perceiver training steps at the full preset's shapes, both architectures, before/after.

Full shapes: 576 patch tokens of width 1024, 20 queries, 3 layers up to 192x192, masks at 336x336.
  authors  the full preset's perceiver (d = 1024, 8 heads of 64, FFN x4); ``--impl plain`` is the
           layer-by-layer computation (bench/authors_perceiver_plain.py), ``fast`` the module's own
           forward (SDPA, channels-last convs, no avoidable full-resolution copies)
  medsight this project's perceiver at paper scale (d = 256), the named alternative
Each row runs in its own process, so CPU peak RSS is that configuration's alone.

Usage: python bench/bench_perceiver.py [--device cuda] [--batches 1,2] [--steps 2] [--profile]
       python bench/bench_perceiver.py --one authors:fast:1   (a single row, used internally)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/authors_perceiver_plain.py

from medsight.config import get_preset  # noqa: E402
from medsight.model.criterion import SetCriterion  # noqa: E402
from medsight.model.perceiver_factory import build_perceiver  # noqa: E402

MODULE_GROUPS = ("initial", "adapters", "read_image", "write_image", "mask_proj", "class_head")


def make(arch: str, device: str):
    config = get_preset("full")
    perceiver_cfg = config.model.perceiver
    if arch == "medsight":
        perceiver_cfg = dataclasses.replace(perceiver_cfg, architecture="medsight", dim=256, head_dim=0, ffn_dim=1024)
    model = build_perceiver(config.model.encoder.width, perceiver_cfg).to(device)
    return config, perceiver_cfg, model


def forward_fn(arch: str, impl: str, model):
    if arch == "authors" and impl == "plain":
        from authors_perceiver_plain import plain_forward

        return lambda tokens: plain_forward(model, tokens)
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_row(arch: str, impl: str, batch: int, steps: int, device: str, dtype: torch.dtype, profile: bool) -> dict:
    torch.manual_seed(0)
    config, perceiver_cfg, model = make(arch, device)
    forward = forward_fn(arch, impl, model)
    criterion = SetCriterion(perceiver_cfg.num_classes, config.model.loss).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    encoder = config.model.encoder
    tokens = torch.randn(batch, encoder.num_patches, encoder.width, device=device)
    size = encoder.image_size
    masks = [(torch.rand(4, size, size, device=device) > 0.7).float() for _ in range(batch)]
    labels = [torch.randint(0, perceiver_cfg.num_classes, (4,), device=device) for _ in range(batch)]
    timings: dict[str, float] = {}

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            started = time.perf_counter()
            out = forward(tokens)
            _sync(device)
            timings["forward"] = timings.get("forward", 0.0) + time.perf_counter() - started
            loss = criterion(out, masks, labels).total
        started = time.perf_counter()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        timings["backward+step"] = timings.get("backward+step", 0.0) + time.perf_counter() - started

    step()  # warm-up: allocator, kernels
    timings.clear()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - started
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = {"arch": arch, "impl": impl, "batch": batch, "seconds_per_step": elapsed / steps, "peak_gib": peak,
           "forward_s": timings["forward"] / steps, "backward_step_s": timings["backward+step"] / steps}
    if profile:
        row["profile"] = profile_step(model, step, device)
    return row


def profile_step(model, step, device: str) -> dict:
    """Where the time goes: forward time per module group (hooks) and the top ops (fwd + bwd)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    contexts = {}

    def enter(name):
        def hook(module, args):
            contexts[id(module)] = record_function(f"module::{name}")
            contexts[id(module)].__enter__()
        return hook

    def leave(module, args, output):
        contexts.pop(id(module)).__exit__(None, None, None)

    handles = []
    for name, module in model.named_modules():
        group = next((g for g in MODULE_GROUPS if name.split(".")[-1] == g or (g == "adapters" and name.startswith("adapters.") and name.count(".") == 1)), None)
        if group:
            handles += [module.register_forward_pre_hook(enter(group)), module.register_forward_hook(leave)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        step()
    for handle in handles:
        handle.remove()
    use_cuda = device.startswith("cuda")
    events = prof.key_averages()
    total = "device_time_total" if use_cuda else "cpu_time_total"
    modules = {e.key: getattr(e, total) / 1e6 for e in events if e.key.startswith("module::")}
    self_key = "self_device_time_total" if use_cuda else "self_cpu_time_total"
    ops = sorted(((e.key, getattr(e, self_key) / 1e6) for e in events if not e.key.startswith("module::")), key=lambda x: -x[1])[:10]
    return {"forward_by_module_s": modules, "top_ops_self_s": ops}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--rows", default="authors:plain,authors:fast,medsight:fast", help="arch:impl pairs")
    parser.add_argument("--profile", action="store_true", help="also profile one step per row")
    parser.add_argument("--one", help="run one row arch:impl:batch in this process and print JSON")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.one:
        arch, impl, batch = args.one.split(":")
        print(json.dumps(run_row(arch, impl, int(batch), args.steps, args.device, dtype, args.profile)))
        return
    print(f"device={args.device} threads={torch.get_num_threads()} dtype={dtype} steps={args.steps}")
    print("| perceiver | impl | batch | s/step | forward s | backward+step s | peak GiB (GPU allocator / CPU RSS of its process) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    profiles = []
    for pair in args.rows.split(","):
        arch, impl = pair.split(":")
        for batch in (int(b) for b in args.batches.split(",")):
            command = [sys.executable, __file__, "--one", f"{arch}:{impl}:{batch}", "--steps", str(args.steps), "--device", args.device]
            command += ["--bf16"] if args.bf16 else []
            command += ["--profile"] if args.profile else []
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {arch} | {impl} | {batch} | failed: {done.stderr.strip().splitlines()[-1][:80]} | | | |", flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {arch} | {impl} | {batch} | {row['seconds_per_step']:.2f} | {row['forward_s']:.2f} | {row['backward_step_s']:.2f} | {row['peak_gib']:.2f} |", flush=True)
            if "profile" in row:
                profiles.append(row)
    for row in profiles:
        print(f"\nprofile {row['arch']}:{row['impl']} batch {row['batch']}: forward by module (s, inclusive)")
        for name, seconds in sorted(row["profile"]["forward_by_module_s"].items(), key=lambda x: -x[1]):
            print(f"  {name:28s} {seconds:8.3f}")
        print("  top ops by self time, forward + backward (s):")
        for name, seconds in row["profile"]["top_ops_self_s"]:
            print(f"  {name:40s} {seconds:8.3f}")


if __name__ == "__main__":
    main()
