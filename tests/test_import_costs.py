"""A component pays only for the libraries its stage uses (issue 8: per-component fixed cost).

torch costs ~2 s to import here, DeepSpeed and MLflow more; each check runs in a fresh
interpreter, because the test process itself has imported everything long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "deepspeed", "transformers", "timm", "open_clip", "mlflow", "dvc", "kubernetes")


def _imported_after(code: str, cwd: Path) -> list[str]:
    probe = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print("IMPORTED=" + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
    """)
    done = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("IMPORTED="))
    return json.loads(line.split("=", 1)[1])


def test_bookkeeping_stages_run_without_torch(tmp_path):
    """synth-data and data-check, run through the stage runner (rank checks, lineage, stage.json)."""
    imported = _imported_after(f"""
        from pathlib import Path
        from medsight.config import apply_overrides, get_preset
        from medsight.stages.runner import run_stage
        config = apply_overrides(get_preset("tiny"), ["data.train_images=6", "data.val_images=3", "data.test_images=3"])
        run_stage("synth-data", config, {{}}, Path({str(tmp_path / "data")!r}))
        run_stage("data-check", config, {{"data": Path({str(tmp_path / "data")!r})}}, Path({str(tmp_path / "check")!r}))
        assert (Path({str(tmp_path / "check")!r}) / "stage.json").is_file()
    """, tmp_path)
    assert imported == [], f"a bookkeeping stage imported {imported}"


def test_register_model_code_needs_no_torch(tmp_path):
    """Registration copies bundle files into an MLflow model; it never loads weights."""
    imported = _imported_after("""
        import medsight.stages.register, medsight.platform.model_registry, medsight.serve.package
        import medsight.model.bundle
    """, tmp_path)
    assert "torch" not in imported, imported


def test_restored_component_imports_no_stage_libraries(tmp_path):
    """A run-cache hit is restored in the KFP executor: no torch, no DVC, no MLflow, and not the
    Kubernetes client that only a multi-node stage needs."""
    imported = _imported_after("""
        import os
        os.environ["_KFP_RUNTIME"] = "true"  # what KFP's own launcher command sets
        import kfp.dsl.executor_main
        from medsight.platform.kfp_component import run_component, compare_evaluations
        from medsight.platform.component_runtime import execute_stage, resolve_config
        from medsight.platform.stage_card import render_stage_card
        from medsight.stages.cache_key import stage_key
        resolve_config("tiny", [])
    """, Path(__file__).resolve().parents[1])
    assert imported == [], imported


@pytest.mark.parametrize("stage", ["perceiver-pretrain", "codebook-pretrain"])
def test_vision_stages_do_not_import_deepspeed(stage, tmp_path):
    imported = _imported_after(f"""
        from medsight.stages.registry import get_stage
        get_stage({stage!r}).load()
    """, tmp_path)
    assert "torch" in imported and "deepspeed" not in imported, imported


def test_encoder_builds_without_transformers_or_timm(tmp_path):
    """open_clip imports transformers and timm whenever they are installed; the encoder (open_clip's
    own ViT) needs neither, so a perceiver or codebook stage does not pay for them. They still
    import normally afterwards (the LLM stages build the encoder too)."""
    imported = _imported_after("""
        import torch
        from medsight.config.schema import EncoderConfig
        from medsight.model.encoder import ImageEncoder
        encoder = ImageEncoder.random_init(EncoderConfig(), seed=0)
        size = encoder.config.image_size
        tokens = encoder(torch.rand(1, 3, size, size)).patch_tokens
        assert tokens.shape[0] == 1 and tokens.isfinite().all()
    """, tmp_path)
    assert "open_clip" in imported and "transformers" not in imported and "timm" not in imported, imported
    after = _imported_after("""
        from medsight.config.schema import EncoderConfig
        from medsight.model.encoder import ImageEncoder
        ImageEncoder.random_init(EncoderConfig(), seed=0)
        import timm, transformers
        from transformers import AutoConfig
        assert AutoConfig is not None and timm.__version__
    """, tmp_path)
    assert {"open_clip", "transformers", "timm"} <= set(after), after


def test_open_clip_configs_with_library_towers_keep_them():
    """A bundled open_clip config whose tower comes from transformers or timm (or a hub model,
    unknown until downloaded) imports open_clip with both available."""
    from medsight.model.encoder import _needs_optional_towers

    assert not _needs_optional_towers("ViT-L-14-336-quickgelu")  # UniMed-CLIP's architecture
    assert not _needs_optional_towers("medsight-tiny-vit")  # registered by MedSIGHT, plain ViT
    assert _needs_optional_towers("roberta-ViT-B-32")  # Hugging Face text tower
    assert _needs_optional_towers("ViT-B-16-SigLIP")  # timm vision tower
    assert _needs_optional_towers("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
