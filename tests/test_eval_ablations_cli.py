"""Ablation variants as config overrides + skipped stages; the comparison table; eval CLI commands."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from medsight.config.schema import DataConfig
from medsight.data.synthetic import generate_dataset
from medsight.eval import cli
from medsight.eval.ablations import VARIANTS, compare_ablations, get_variant, variant_config
from medsight.io_utils import atomic_write_json


def test_every_paper_ablation_is_a_variant():
    expected = {
        "no_region_embeddings": ("model.region_embeddings", False),
        "seg_token": ("model.grounding", "seg_token"),
        "one_way_decoder": ("model.perceiver.two_way", False),
        "qwen2_backbone": ("model.llm.backbone", "qwen2"),
        "codebook_8": ("model.codebook.codes_per_modality", 8),
        "codebook_64": ("model.codebook.codes_per_modality", 64),
    }
    for name, (dotted, value) in expected.items():
        node = variant_config(get_variant(name))
        for part in dotted.split("."):
            node = getattr(node, part)
        assert node == value, name
    assert get_variant("no_stage3").skip == {"v2t-align"}
    assert get_variant("no_stage4").skip == {"t2v-align"}
    assert get_variant("no_stage5").skip == {"instruct-tune"}
    assert {f"codebook_{n}" for n in (8, 16, 32, 64)} <= {v.name for v in VARIANTS}
    with pytest.raises(KeyError, match="unknown ablation variant"):
        get_variant("nope")


def fake_chain(calls: list):
    """Stands in for medsight.stages.chain.run_chain: writes an evaluate output per config."""

    def run_chain(config, workdir, skip=frozenset()):
        calls.append((config, skip))
        output = Path(workdir) / "evaluate" / str(len(calls))
        score = 0.5 + 0.1 * config.model.region_embeddings - 0.2 * ("instruct-tune" in skip)
        summary = {"per_modality": {"CT": score}, "counts": {"CT": 4}, "macro": score, "micro": score, "n": 4}
        atomic_write_json(output / "results.json", {"benchmarks": {"vqa_rad": {"metrics": {"closed_accuracy": summary}}, "diagseg": {"metrics": {"dice": summary}}}, "run": {}})
        return SimpleNamespace(stages={"evaluate": SimpleNamespace(output=output)})

    return run_chain


def test_compare_ablations_side_by_side(tmp_path):
    calls: list = []
    table = compare_ablations(["full", "no_region_embeddings", "no_stage5"], tmp_path, run_chain=fake_chain(calls))
    assert [row[0] for row in table.rows] == ["full", "no_region_embeddings", "no_stage5"]
    close = table.columns.index("VQA-RAD close") + 1
    seg = table.columns.index("DiagSeg-Seg") + 1
    assert [row[close] for row in table.rows] == ["60.0", "50.0", "40.0"]
    assert table.rows[0][seg] == "60.0" and table.rows[0][table.columns.index("MeCo") + 1] == "-"
    assert calls[1][0].model.region_embeddings is False and calls[2][1] == {"instruct-tune"}
    assert (tmp_path / "ablations.md").is_file()
    assert set(json.loads((tmp_path / "ablations.json").read_text())["variants"]) == {"full", "no_region_embeddings", "no_stage5"}
    with pytest.raises(KeyError):  # a typo fails before anything trains
        compare_ablations(["full", "typo"], tmp_path, run_chain=fake_chain([]))
    assert len(calls) == 3


def test_cli_compare_ablations_and_list(tmp_path, monkeypatch):
    import medsight.stages.chain as chain

    calls: list = []
    monkeypatch.setattr(chain, "run_chain", fake_chain(calls))
    runner = CliRunner()
    result = runner.invoke(cli.eval_app, ["compare-ablations", "--variants", "full,codebook_8", "--workdir", str(tmp_path), "--set", "data.test_images=10"])
    assert result.exit_code == 0, result.output
    assert "codebook_8" in result.output and "VQA-RAD close" in result.output
    assert calls[1][0].model.codebook.codes_per_modality == 8 and calls[1][0].data.test_images == 10
    listed = runner.invoke(cli.eval_app, ["compare-ablations", "--list"])
    assert "one_way_decoder" in listed.output and "skip instruct-tune" in listed.output
    bad = runner.invoke(cli.eval_app, ["compare-ablations", "--variants", "nope", "--workdir", str(tmp_path)])
    assert bad.exit_code == 2 and "unknown ablation variant" in bad.output


def test_cli_gen_data_and_report(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, DataConfig(train_images=2, val_images=1, test_images=8, image_size=64, seed=1))
    runner = CliRunner()
    out = tmp_path / "diagseg.json"
    result = runner.invoke(cli.eval_app, ["gen-data", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text())
    assert entries and all(e["mask_files"] and (data / e["mask_files"][0]).is_file() for e in entries)
    # Grounding conversations from the grounding-data stage's region codes.
    codes = []
    for number, line in enumerate((data / "biomedparse" / "test.jsonl").read_text().splitlines()):
        entry = json.loads(line)
        codes.append({"image": entry["image"], "modality": entry["modality"],
                      "regions": [{"class_name": r["class"], "mask_file": r["mask"], "token": f"[C0_{(number + i) % 16}]", "host": None}
                                  for i, r in enumerate(entry["regions"])]})
    codes_file = tmp_path / "codes.json"
    codes_file.write_text(json.dumps(codes))
    conv = tmp_path / "conv.json"
    result = runner.invoke(cli.eval_app, ["gen-data", "--data", str(data), "--out", str(conv), "--kind", "grounding", "--region-codes", str(codes_file)])
    assert result.exit_code == 0, result.output
    assert json.loads(conv.read_text())[0]["mask_files"]
    missing = runner.invoke(cli.eval_app, ["gen-data", "--data", str(data), "--out", str(conv), "--kind", "grounding"])
    assert missing.exit_code == 2 and "--region-codes" in missing.output
    no_results = runner.invoke(cli.eval_app, ["report", str(tmp_path)])
    assert no_results.exit_code == 2 and "results.json" in no_results.output
