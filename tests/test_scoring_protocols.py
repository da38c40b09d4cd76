"""The llava-med protocol reproduces LLaVA-Med's run_eval.py; results.json and the report show
both protocols, labelled, with the configured one leading the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medsight.config import get_preset
from medsight.config.schema import DataConfig
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import Taxonomy
from medsight.eval import llava_med_scoring, metrics
from medsight.eval.stage import evaluate_model, headline_metrics
from medsight.eval.synthetic_benchmarks import write_synthetic_benchmarks
from tests.eval_fakes import FakeModel

# (prediction, ground truth, open recall, closed hit) as LLaVA-Med's run_eval.py scores them: each
# row's expected values were produced by running microsoft/LLaVA-Med v1.0's scorer
# (llava/eval/run_eval.py with eval_metrics/glossary.py normalize_word and
# evaluate_metrics.calculate_f1score) on the pair; the comment says which quirk it shows.
LLAVA_MED_TABLE = [
    ("left left lung", "left lung", 1.0, 0.0),  # repeated words: prediction counts go into tp
    ("lung lung lung", "lung heart", 0.75, 0.0),  # ... so recall is 3 / (3 + 1), not 1/2
    ("a b c", "a a a a", 0.0, 0.0),  # articles vanish: an all-article answer is empty
    ("the the the", "the", 0.0, 0.0),
    ("x-ray", "x ray", 1.0, 0.0),  # a hyphen inside a word becomes a space
    ("x-ray - left", "xray left", 1.0, 0.0),  # ... but is deleted everywhere once " -" occurs
    ("T2-weighted MRI", "t2 weighted", 1.0, 0.0),
    ("It isn't enlarged", "isnt", 1.0, 0.0),  # contractions: "isnt" -> "isn't"
    ("dont know", "don't", 1.0, 1.0),  # ... and "no" inside "don't" makes it a closed hit
    ("couldnt've", "couldn't've", 1.0, 0.0),
    ("Two nodules", "2", 1.0, 1.0),  # number words; "no" inside "nodules" opens the closed test
    ("none", "0", 1.0, 0.0),
    ("No.", "no", 1.0, 1.0),
    ("nodule present", "no", 0.0, 1.0),  # closed: substring "no" in "nodule" counts as a no
    ("yes.no", "yes", 0.0, 1.0),  # periods are deleted, joining words
    ("1,000 cells", "1000", 1.0, 0.0),  # a digit,digit group deletes every punctuation mark
    ("3.5 cm", "3.5", 1.0, 0.0),  # decimal points stay
    ("Yes, it is.", "Yes", 1.0, 1.0),
    ("The answer is NO", "no", 1.0, 1.0),
    ("", "yes", 0.0, 0.0),  # empty prediction
    ("yes", "", 0.0, 1.0),  # empty answer: recall 0, but "" is a substring of anything
    ("[C3_16] liver", "liver", 1.0, 0.0),
]


@pytest.mark.parametrize("prediction, truth, recall, hit", LLAVA_MED_TABLE)
def test_llava_med_protocol_agrees_with_run_eval(prediction, truth, recall, hit):
    assert llava_med_scoring.open_recall(prediction, truth) == pytest.approx(recall)
    assert llava_med_scoring.closed_hit(prediction, truth) == hit


def test_the_protocols_differ_where_the_issue_says():
    """Strict scoring is whole-word and set-based; these rows are where the two part ways."""
    assert metrics.open_recall("lung lung lung", "lung heart") == 0.5
    assert metrics.closed_hit("nodule present", "no") == 0.0
    assert metrics.closed_hit("dont know", "don't") == 0.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(root, DataConfig(train_images=4, val_images=2, test_images=8, image_size=32, seed=5))
    return root


def test_results_and_report_show_both_protocols_labelled(dataset, tmp_path):
    manifest = write_synthetic_benchmarks(dataset, tmp_path / "bench", Taxonomy.synthetic())
    kept = [entry for entry in json.loads(manifest.read_text())["benchmarks"] if entry["name"] in ("vqa_rad", "diagseg")]
    manifest.write_text(json.dumps({"benchmarks": kept}))
    config = get_preset("tiny")
    config.evaluate.protocol = "llava-med"
    config.evaluate.report_samples = 1
    document = evaluate_model(FakeModel(), manifest, tmp_path / "eval", config, {"model": "fake"}, progress=False)

    assert document["run"]["protocol"] == "llava-med"
    vqa = document["benchmarks"]["vqa_rad"]["metrics"]
    for metric in ("closed_accuracy", "open_recall", "all_score"):
        assert metric in vqa and metric + "_llava_med" in vqa
    assert "diagnosis_recall_llava_med" in document["benchmarks"]["diagseg"]["metrics"]
    headline = headline_metrics(document)
    assert {"closed_accuracy", "closed_accuracy_llava_med", "comprehension_avg", "comprehension_avg_llava_med"} <= set(headline)
    tables = (tmp_path / "eval" / "tables.md").read_text()
    llava_title, strict_title = "Table 2 - Medical visual comprehension [LLaVA-Med", "Table 2 - Medical visual comprehension [strict"
    assert tables.index(llava_title) < tables.index(strict_title)  # the configured protocol leads
    html = (tmp_path / "eval" / "report.html").read_text()
    assert llava_title in html and strict_title in html and "(leads the tables)" in html
    assert "Table 3 - Grounded diagnostic segmentation (DiagSeg) [LLaVA-Med" in html


def test_an_unknown_protocol_is_refused(dataset, tmp_path):
    config = get_preset("tiny")
    config.evaluate.protocol = "vqa"
    manifest = write_synthetic_benchmarks(dataset, tmp_path / "bench", Taxonomy.synthetic())
    with pytest.raises(ValueError, match="evaluate.protocol / --protocol: 'vqa' is not one of strict, llava-med"):
        evaluate_model(FakeModel(), manifest, tmp_path / "eval", config, {}, progress=False)
