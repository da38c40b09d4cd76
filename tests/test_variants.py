"""Ablation variants: registry entries (overrides + dropped stages), the comparison table, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from medsight import cli
from medsight.config import get_preset
from medsight.io_utils import atomic_write_json
from medsight.stages.ablations import compare_variants
from medsight.stages.chain import variant_config
from medsight.stages.registry import VARIANTS, get_variant


def test_every_paper_ablation_is_a_variant():
    expected = {
        "no-region-embeddings": ("model.region_embeddings", False),
        "seg-token": ("model.grounding", "seg_token"),
        "one-way-decoder": ("model.perceiver.two_way", False),
        "qwen2-backbone": ("model.llm.backbone", "qwen2"),
        "codebook-8": ("model.codebook.codes_per_modality", 8),
        "codebook-64": ("model.codebook.codes_per_modality", 64),
        "lora": ("instruct_tune.lora_rank", 32),
    }
    for name, (dotted, value) in expected.items():
        node = variant_config(get_preset("tiny"), get_variant(name))
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value, name
    assert get_variant("without-stage-3").drops == {"v2t-align"}
    assert get_variant("without-stage-4").drops == {"t2v-align"}
    assert get_variant("without-stage-5").drops == {"instruct-tune"}
    assert {f"codebook-{n}" for n in (8, 16, 32, 64)} <= {v.name for v in VARIANTS}
    with pytest.raises(KeyError, match="unknown variant"):
        get_variant("nope")


def fake_chain(calls: list):
    """Stands in for medsight.stages.chain.run_chain: writes an evaluate output per config."""

    def run_chain(config, workdir, variant):
        config = variant_config(config, variant)
        calls.append((config, variant.drops))
        output = Path(workdir) / "evaluate" / str(len(calls))
        score = 0.5 + 0.1 * config.model.region_embeddings - 0.2 * ("instruct-tune" in variant.drops)
        summary = {"per_modality": {"CT": score}, "counts": {"CT": 4}, "macro": score, "micro": score, "n": 4}
        atomic_write_json(output / "results.json", {"benchmarks": {"vqa_rad": {"metrics": {"closed_accuracy": summary}}, "diagseg": {"metrics": {"dice": summary}}}, "run": {}})
        return SimpleNamespace(stages={"evaluate": SimpleNamespace(output=output)})

    return run_chain


def test_compare_variants_side_by_side(tmp_path):
    calls: list = []
    table = compare_variants(["full", "no-region-embeddings", "without-stage-5"], tmp_path, run_chain=fake_chain(calls))
    assert [row[0] for row in table.rows] == ["full", "no-region-embeddings", "without-stage-5"]
    close = table.columns.index("VQA-RAD close") + 1
    seg = table.columns.index("DiagSeg-Seg") + 1
    assert [row[close] for row in table.rows] == ["60.0", "50.0", "40.0"]
    assert table.rows[0][seg] == "60.0" and table.rows[0][table.columns.index("MeCo") + 1] == "-"
    assert calls[1][0].model.region_embeddings is False and calls[2][1] == {"instruct-tune"}
    assert (tmp_path / "ablations.md").is_file()
    assert set(json.loads((tmp_path / "ablations.json").read_text())["variants"]) == {"full", "no-region-embeddings", "without-stage-5"}
    with pytest.raises(KeyError):  # a typo fails before anything trains
        compare_variants(["full", "typo"], tmp_path, run_chain=fake_chain([]))
    assert len(calls) == 3


def test_cli_compare_variants_and_list(tmp_path, monkeypatch):
    import medsight.stages.chain as chain

    calls: list = []
    monkeypatch.setattr(chain, "run_chain", fake_chain(calls))
    runner = CliRunner()
    result = runner.invoke(cli.app, ["variants", "compare", "full,codebook-8", "--workdir", str(tmp_path), "--set", "data.test_images=10"])
    assert result.exit_code == 0, result.output
    assert "codebook-8" in result.output and "VQA-RAD close" in result.output
    assert calls[1][0].model.codebook.codes_per_modality == 8 and calls[1][0].data.test_images == 10
    listed = runner.invoke(cli.app, ["variants", "list"])
    assert "one-way-decoder" in listed.output and "drops instruct-tune" in listed.output
    bad = runner.invoke(cli.app, ["variants", "compare", "nope", "--workdir", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown variant" in bad.output


