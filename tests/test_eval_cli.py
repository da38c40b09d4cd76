"""`medsight eval` commands: generated data and the report from results."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medsight.config.schema import DataConfig
from medsight.data.synthetic import generate_dataset
from medsight.eval import cli


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
