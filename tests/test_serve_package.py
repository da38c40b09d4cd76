"""Model packages (seconds, a random tiny model): self-contained, checked, no pickles."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import build_tiny_model


@pytest.fixture()
def stage_outputs(tmp_path, tiny_config, tiny_tokenizer_dir):
    """A base-models output and an instruct-tune-like output of a random tiny model."""
    from medsight.config.io import save_config
    from medsight.data.taxonomy import Taxonomy
    from medsight.model.bundle import save_modules
    from medsight.model.llm import save_llm

    model, _ = build_tiny_model(tiny_config, tiny_tokenizer_dir)
    base, trained = tmp_path / "base", tmp_path / "instruct"
    model.encoder.save(base / "encoder")
    shutil.copytree(tiny_tokenizer_dir, base / "tokenizer")
    save_llm(model.llm, base / "llm")
    save_config(tiny_config, trained / "config.yaml")
    save_modules(trained, {n: getattr(model, n) for n in ("perceiver", "codebook", "v2t", "t2v", "region_tokens")}, Taxonomy.synthetic())
    (trained / "metrics.json").write_text('{"val_seg_dice": 0.5}\n')
    return trained, base


def test_package_loads_alone_and_answers_like_the_stage_outputs(stage_outputs, tmp_path):
    from medsight.model.inference import MedSightInference
    from medsight.serve.package import build_package, load_package, read_lineage, verify_package

    trained, base = stage_outputs
    package = build_package(trained, base, tmp_path / "package", lineage={"git_commit": "abc"})
    manifest = verify_package(package)
    assert {"config.yaml", "modules/perceiver.safetensors", "modules/taxonomy.json", "llm/config.json", "encoder/model.safetensors",
            "tokenizer/tokenizer.json", "lineage.json"} <= set(manifest["files"])
    assert read_lineage(package) == {"git_commit": "abc"}
    image, question = torch.rand(1, 3, 64, 64), ["Segment all visible structures."]
    expected = MedSightInference.load(trained, base).answer(image, question, max_new_tokens=6)[0]
    moved = tmp_path / "elsewhere" / "pkg"
    shutil.move(str(package), moved)
    shutil.rmtree(trained)
    shutil.rmtree(base)  # nothing but the package is left
    answer = load_package(moved).answer(image, question, max_new_tokens=6)[0]
    assert answer.text == expected.text and answer.region_tokens == expected.region_tokens
    assert torch.equal(answer.masks, expected.masks)


def test_package_refuses_damage_and_pickles(stage_outputs, tmp_path):
    from medsight.serve.package import PackageError, build_package, locate_package, verify_package

    trained, base = stage_outputs
    package = build_package(trained, base, tmp_path / "mlflow-model" / "artifacts" / "pkg")
    assert locate_package(tmp_path / "mlflow-model") == package  # where MLflow / KServe put it
    weights = package / "modules" / "t2v.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(PackageError, match="t2v.safetensors: checksum differs"):
        verify_package(package)
    weights.write_bytes(original)
    (package / "llm" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(PackageError, match="unexpected .bin file"):
        verify_package(package)
    (base / "llm" / "evil.pkl").write_bytes(b"x")
    with pytest.raises(PackageError, match="evil.pkl: a model package takes only safetensors"):
        build_package(trained, base, tmp_path / "again")
    assert not (tmp_path / "again").exists()  # nothing half-written
    with pytest.raises(PackageError, match="no MedSIGHT model package here"):
        locate_package(tmp_path / "elsewhere-empty")
    (trained / "modules" / "t2v.safetensors").unlink()
    with pytest.raises(PackageError, match="no t2v weights"):
        build_package(trained, base, tmp_path / "incomplete")


def test_engine_checks_requests_before_the_model_runs(stage_outputs, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from medsight.data.errors import DataError
    from medsight.model.input_limits import InputLimitError, InputLimits
    from medsight.serve.engine import GroundingEngine
    from medsight.serve.package import build_package, load_package

    engine = GroundingEngine(load_package(build_package(*stage_outputs, tmp_path / "p")), InputLimits(max_question_tokens=10_000, max_question_chars=100_000))
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    image = buffer.getvalue()
    request = engine.prepare(image, "Segment the liver.", mask_format="rle", settings=engine.settings(5, 0.0))
    [result] = engine.run_batch([request])
    assert result.image_hw == (30, 40) and result.completion_tokens <= 5
    assert all(r["mask"]["size"] == [30, 40] for r in result.regions)
    budget = engine.context_budget(engine.defaults.max_new_tokens)
    with pytest.raises(InputLimitError, match="do not fit the model's context"):
        engine.prepare(image, "liver " * (budget + 5))
    with pytest.raises(DataError, match="mask_format: must be one of png, rle"):
        engine.prepare(image, "q", mask_format="gif")
    for bad in (0, 10_000, 1.5, True):
        with pytest.raises(DataError, match="max_new_tokens"):
            engine.settings(bad, None)
    with pytest.raises(DataError, match="temperature"):
        engine.settings(None, -1)
    with pytest.raises(DataError, match="question: must be a string"):
        engine.prepare(image, 42)


def test_serve_loads_a_package_or_a_stage_output(stage_outputs, tmp_path):
    import json

    from medsight.serve.package import PackageError, build_package
    from medsight.serve.server import load_model

    trained, base = stage_outputs
    package = build_package(trained, base, tmp_path / "package")
    assert load_model(str(tmp_path)).config.model.llm.hidden_size == 32  # a folder holding one package
    with pytest.raises(PackageError, match="base-models input cannot be found .*no stage.json records an input 'base'"):
        load_model(str(trained))
    (trained / "stage.json").write_text(json.dumps({"stage": "instruct-tune", "inputs": {"base": {"path": str(base)}}}))
    assert load_model(str(trained)).taxonomy is not None  # base read from its stage.json
    (trained / "stage.json").write_text(json.dumps({"stage": "instruct-tune", "inputs": {"base": str(base)}}))
    assert load_model(str(trained)).taxonomy is not None  # an older record: a bare path
    assert load_model(str(package)).image_size == 64
