"""The evaluation report tells the truth: provenance as versions, the row named after variant and
run, untrained formats marked and kept out of averages, modalities from the data, no test
fixtures, a labelled curve with validation points for every training stage.

The evaluate stage runs through the real runner (which writes lineage.json) with a stand-in
model; the report is rendered in headless Chromium and its screenshot kept under tests/artifacts/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from eval_fakes import FakeModel
from medsight.config.presets import get_preset
from medsight.config.schema import DataConfig
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import Taxonomy
from medsight.eval.benchmarks.common import canonical_modality
from medsight.eval.charts import stage_chart
from medsight.eval.coverage import MULTIPLE_CHOICE, formats_of, trained_formats, untrained_benchmarks
from medsight.eval.tables import comprehension_table
from medsight.stages.lineage import LINEAGE_FILE
from test_eval_report import render_in_chromium

RUN_ID, COMMIT = "local-20261129-101010-abcd", "fedcba9876543210fedcba9876543210fedcba98"
TRAINING = ("perceiver-pretrain", "codebook-pretrain", "v2t-align", "t2v-align", "instruct-tune")


def _summary(value: float, n: int = 4) -> dict:
    return {"per_modality": {"CT": value}, "counts": {"CT": n}, "macro": value, "micro": value, "n": n}


def test_untrained_benchmarks_are_marked_and_left_out_of_the_average() -> None:
    summaries = {"vqa_rad": {"closed_accuracy": _summary(0.8), "all_score": _summary(0.6)},
                 "mmmu_med": {"mc_accuracy": _summary(0.0)}, "omnimedvqa": {"mc_accuracy": _summary(0.0)}}
    untrained = untrained_benchmarks(summaries, ["free-text"])
    assert untrained == ["mmmu_med", "omnimedvqa"]
    table = comprehension_table(summaries, "full (run-1)", untrained)
    assert table.rows[0][0] == "full (run-1)"
    assert "MMMU-Med \u2020" in table.columns and "OMVQA \u2020" in table.columns
    assert table.rows[0][-1] == "70.0"  # (80 + 60) / 2: the zeros stay out
    assert "left out of Avg." in table.note
    included = comprehension_table(summaries, "x", untrained, include_untrained=True)
    assert included.rows[0][-1] == "35.0" and "included in Avg." in included.note
    # A model whose instruction data held multiple-choice questions is measured normally.
    assert untrained_benchmarks(summaries, ["free-text", MULTIPLE_CHOICE]) == []
    assert untrained_benchmarks(summaries, None) == []  # unknown training data: nothing claimed


def test_training_formats_come_from_the_instruction_data(tmp_path: Path) -> None:
    assert formats_of(["<image>\nIs there a lesion?"]) == ["free-text"]
    assert MULTIPLE_CHOICE in formats_of(["Which organ?\nA. liver\nB. kidney\nAnswer with the option's letter"])
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "instruct_train.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "<image>\nWhich finding?\nA. cyst\nB. tumor"},
                           {"from": "gpt", "value": "B"}]}]))
    assert trained_formats(tmp_path) == [MULTIPLE_CHOICE]
    assert trained_formats(tmp_path / "missing") is None


def test_stage_chart_has_labelled_axes_and_validation_points() -> None:
    svg = stage_chart("t2v-align", {"loss": [(1, 2.0), (2, 1.5)], "lm": [(1, 1.0), (2, 0.8)],
                                    "val_lm_loss": [(2, 0.9)], "val_seg_dice": [(2, 0.4)]})
    assert ">training step<" in svg and ">training loss<" in svg and ">validation value<" in svg
    assert svg.count("<circle") >= 2 + 2  # two markers in the plot, two in the legend
    assert "val_lm_loss = 0.9 at step 2" in svg and "val_seg_dice = 0.4 at step 2" in svg
    assert stage_chart("x", {"val_dice": [(1, 0.5)]}) == ""  # no training series: no chart


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The evaluate stage through the real runner, its model input carrying four upstream stages."""
    import medsight.model.inference as inference
    from medsight.stages.runner import run_stage

    root = tmp_path_factory.mktemp("truth")
    data = root / "data"
    generate_dataset(data, DataConfig(train_images=6, val_images=2, test_images=18, image_size=64, seed=5))
    model = root / "model"
    model.mkdir()
    history = [json.dumps({"step": s, "instruct-tune/loss": 3.0 / s, "instruct-tune/lm": 2.0 / s}) for s in (10, 20, 30)]
    (model / "history.jsonl").write_text("\n".join(history) + "\n")
    (model / "metrics.json").write_text(json.dumps({"val_lm_loss": 0.7, "val_seg_dice": 0.4}))
    (model / "stage.json").write_text(json.dumps({"stage": "instruct-tune", "key": "k" * 64, "inputs": {}}))
    upstream = {f"{i}" * 32 + ".dir": {"stage": stage, "metrics": {"val_lm_loss": 1.0, "val_dice": 0.6},
                                       "history": {f"{stage}/loss": [[5, 2.0], [10, 1.0]]}}
                for i, stage in enumerate(TRAINING[:-1])}
    (model / LINEAGE_FILE).write_text(json.dumps({"stage": "instruct-tune", "upstream": upstream}))
    base, grounding = root / "base", root / "grounding"
    base.mkdir()
    grounding.mkdir()
    config = get_preset("tiny")
    config.evaluate.batch_size = 8
    config.evaluate.report_samples = 3
    patch = pytest.MonkeyPatch()
    patch.setattr(inference.MedSightInference, "load", classmethod(lambda cls, m, b, device="cpu", dtype=None: FakeModel()))
    for key, value in {"KFP_RUN_ID": RUN_ID, "MEDSIGHT_GIT_COMMIT": COMMIT, "MEDSIGHT_VARIANT": "full",
                       "MEDSIGHT_HASH_INDEX": str(root / "index.sqlite")}.items():
        patch.setenv(key, value)
    try:
        run_stage("evaluate", config, {"data": data, "base": base, "model": model, "grounding": grounding},
                  root / "evaluate")
    finally:
        patch.undo()
    return root / "evaluate"


def test_report_names_versions_run_and_variant(evaluation: Path) -> None:
    html = (evaluation / "report.html").read_text()
    record = json.loads((evaluation / "stage.json").read_text())
    assert f"full ({RUN_ID})" in html and COMMIT in html
    for name, entry in record["inputs"].items():
        assert entry["md5"] in html, name
    assert f"<td>full ({RUN_ID})</td>" in html  # Table 2's row
    assert ".partial" not in html and str(evaluation.parent) not in html  # no (temporary) local paths
    assert f"| full ({RUN_ID}) |" in (evaluation / "tables.md").read_text()
    results = json.loads((evaluation / "results.json").read_text())
    assert "model" not in results["run"]  # no path of a (temporary) input in the results
    assert results["run"]["trained_formats"] == ["free-text"]


def test_report_marks_untrained_formats_and_shows_only_real_entries(evaluation: Path) -> None:
    html = (evaluation / "report.html").read_text()
    assert "MMMU-Med \u2020" in html and "OMVQA \u2020" in html and "left out of the averages" in html
    assert "missing-mask-probe" not in html
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["mmmu_med.mc_accuracy.micro"] >= 0.0
    # Asked for: `medsight eval report` rebuilds it with them averaged in; curves from the lineage.
    from typer.testing import CliRunner

    from medsight.eval.cli import eval_app

    target = evaluation.parent / "with-untrained.html"
    result = CliRunner().invoke(eval_app, ["report", str(evaluation), "--out", str(target), "--include-untrained"])
    assert result.exit_code == 0, result.output
    rebuilt = target.read_text()
    assert "included in the averages" in rebuilt
    assert len(re.findall(r'aria-label="[^"]+ training curves"', rebuilt)) == len(TRAINING)


def test_box_grounding_modalities_come_from_the_data(evaluation: Path) -> None:
    rows = [json.loads(line) for line in (evaluation / "predictions.jsonl").read_text().splitlines()]
    schain = [row for row in rows if row["benchmark"] == "schain"]
    assert schain and len({row["modality"] for row in schain}) > 1
    taxonomy = Taxonomy.synthetic()
    for row in schain:  # the image's own modality: its file-name spelling, read through the data's taxonomy
        spelling = row["id"].split("/", 1)[1].split("_")[1]
        assert row["modality"] == canonical_modality(taxonomy.find_modality(spelling) or spelling), row["id"]


def test_report_has_a_labelled_curve_per_training_stage_in_chromium(evaluation: Path, tmp_path: Path) -> None:
    html = (evaluation / "report.html").read_text()
    charts = re.findall(r'aria-label="([^"]+) training curves"', html)
    assert charts == list(TRAINING)  # every training stage, in pipeline order
    assert html.count(">training step<") == len(TRAINING) and html.count(">training loss<") == len(TRAINING)
    assert "val_lm_loss = 0.7 at step 30" in html  # instruct-tune's validation point at its last step
    render_in_chromium(evaluation / "report.html", tmp_path, name="report_truth.png")
