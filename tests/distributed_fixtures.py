"""A miniature MedSIGHT world for the multi-process tests: a few 32-px synthetic images, a
one-layer-wide ViT, a perceiver and a Qwen3 a few units wide, so each torchrun launch costs
seconds of compute and most of its time is interpreter start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MINI = [
    "data.train_images=16", "data.val_images=8", "data.test_images=8", "data.image_size=32",
    "model.encoder.image_size=32", "model.encoder.patch_size=8", "model.encoder.width=16",
    "model.encoder.heads=2",
    "model.perceiver.dim=16", "model.perceiver.ffn_dim=16", "model.perceiver.num_heads=2",
    "model.perceiver.upsample_factors=[1,1,2]",
    "model.llm.hidden_size=16", "model.llm.num_layers=1", "model.llm.num_heads=2", "model.llm.num_kv_heads=1",
    "model.llm.intermediate_size=32", "model.patch_merge=2",
    "perceiver_pretrain.feature_cache_mb=0",
]


def cli(*args: str, env: dict | None = None, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m medsight.cli ARGS`` in a fresh process (its own distributed state)."""
    merged = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "medsight.cli", *args], capture_output=True, text=True,
                          env=merged, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"medsight {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def build_inputs(root: Path, stages: tuple[str, ...] = ()) -> dict[str, Path]:
    """synth-data and base-models (and any of ``stages``: perceiver-pretrain) at MINI size."""
    out = {"data": root / "data", "base": root / "base"}
    cli("stage", "run", "synth-data", "--out", str(out["data"]), *sets(MINI))
    cli("stage", "run", "base-models", "--out", str(out["base"]), "--input", f"data={out['data']}", *sets(MINI))
    if {"perceiver-pretrain", "grounding-data"} & set(stages):
        out["perceiver"] = root / "perceiver"
        cli("stage", "run", "perceiver-pretrain", "--out", str(out["perceiver"]), "--input", f"data={out['data']}",
            "--input", f"base={out['base']}", *sets([*MINI, "perceiver_pretrain.max_steps=2"]))
    if "grounding-data" in stages:
        out["codebook"], out["grounding"] = root / "codebook", root / "grounding"
        cli("stage", "run", "codebook-pretrain", "--out", str(out["codebook"]), "--input", f"data={out['data']}",
            "--input", f"base={out['base']}", "--input", f"perceiver={out['perceiver']}",
            *sets([*MINI, "codebook_pretrain.max_steps=2", "model.codebook.codes_per_modality=4"]))
        cli("stage", "run", "grounding-data", "--out", str(out["grounding"]), "--input", f"data={out['data']}",
            "--input", f"base={out['base']}", "--input", f"codebook={out['codebook']}",
            *sets([*MINI, "model.codebook.codes_per_modality=4"]))
    return out
