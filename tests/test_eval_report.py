"""Runner, stage, tables and the HTML report on the synthetic benchmarks, with a fake model.

The report is rendered in headless Chromium when one is installed (CI installs it with
``apt-get install -y chromium``); the screenshot is kept under ``tests/artifacts/``.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval_fakes import FakeModel
from medsight.config.presets import get_preset
from medsight.config.schema import DataConfig
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import Taxonomy
from medsight.eval import stage as eval_stage
from medsight.eval.benchmarks.manifest import load_manifest
from medsight.eval.curves import HistoryRecorder, collect_curves
from medsight.eval.results_io import read_results, summaries_from
from medsight.eval.runner import GenerationSettings, evaluate_benchmark
from medsight.eval.synthetic_benchmarks import write_synthetic_benchmarks
from medsight.eval.tables import all_tables, comprehension_table
from medsight.train.tracker import NullTracker

ARTIFACTS = Path(__file__).parent / "artifacts"
ALL_BENCHMARKS = {"vqa_rad", "slake", "pathvqa", "mmmu_med", "omnimedvqa", "diagseg", "mecovqa_g", "schain", "medtrinity"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(root, DataConfig(train_images=6, val_images=2, test_images=18, image_size=64, seed=3))
    return root


class RecordingTracker(NullTracker):
    def __init__(self):
        self.artifacts: list[tuple[Path, str | None]] = []
        self.metrics: dict[str, float] = {}
        self.params: dict = {}

    def log_artifact(self, path, artifact_path=None):
        assert Path(path).is_file(), path
        self.artifacts.append((Path(path), artifact_path))

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_params(self, params):
        self.params.update(params)


def test_synthetic_benchmarks_exercise_every_reader(dataset, tmp_path):
    manifest = write_synthetic_benchmarks(dataset, tmp_path / "bench", Taxonomy.synthetic(), probes=True)
    datasets = {d.name: d for d in load_manifest(manifest)}
    assert set(datasets) == ALL_BENCHMARKS
    for name, data in datasets.items():
        assert data.samples, f"{name} has no samples"
    # The probe entry with a missing mask is reported and skipped, as in the real MeCoVQA-G.
    assert [s.sample_id for s in datasets["mecovqa_g"].skipped] == ["missing-mask-probe"]
    vqa_total = sum(len(datasets[n].samples) for n in ("vqa_rad", "slake", "pathvqa"))
    assert vqa_total == len(json.loads((dataset / "vqa" / "test.json").read_text()))


def test_runner_batches_and_scores(dataset, tmp_path, caplog):
    manifest = write_synthetic_benchmarks(dataset, tmp_path / "bench", Taxonomy.synthetic())
    data = {d.name: d for d in load_manifest(manifest)}["mecovqa_g"]
    model = FakeModel()
    result = evaluate_benchmark(model, data, GenerationSettings(batch_size=4), keep_examples=2, progress=False)
    assert max(model.calls) <= 4 and sum(model.calls) == len(data.samples)
    assert len(result.results) == len(data.samples)
    assert sum(r.example is not None for r in result.results) == 2
    # The fake answers hold [C9_9], not in the vocabulary: ignored with one summary warning.
    assert all(r.region_tokens == ["[C0_1]"] for r in result.results)
    assert "not in the model vocabulary" in caplog.text and "[C9_9]" in caplog.text
    dice = result.metrics["dice"]
    assert 0.0 < dice.micro < 1.0 and set(dice.per_modality) <= {"CT", "MRI", "X-ray", "US", "Der", "Path"}
    assert dice.macro == pytest.approx(sum(dice.per_modality.values()) / len(dice.per_modality))


def test_stage_outputs_tables_report_and_tracking(dataset, tmp_path, monkeypatch):
    import medsight.model.inference as inference

    monkeypatch.setattr(inference.MedSightInference, "load", classmethod(lambda cls, model_dir, base_dir, device="cpu", dtype=None: FakeModel()))
    config = get_preset("tiny")
    config.evaluate.batch_size = 8
    config.evaluate.report_samples = 2
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    HistoryRecorder(NullTracker(), model_dir).log_metrics({"instruct-tune/loss": 2.0}, step=10)
    HistoryRecorder(NullTracker(), model_dir).log_metrics({"instruct-tune/loss": 1.2}, step=20)
    tracker = RecordingTracker()
    output = tmp_path / "eval"
    metrics = eval_stage.run(config, {"data": dataset, "base": tmp_path, "model": model_dir, "grounding": tmp_path}, output, tracker)

    for key in ("closed_accuracy", "open_recall", "seg_dice", "diagnosis_recall", "mc_accuracy", "mecovqa_dice", "box_miou"):
        assert 0.0 <= metrics[key] <= 1.0, key
    # The readers' skip-path probe is a test fixture: a user's evaluation never contains it.
    assert "vqa_rad.closed_accuracy.macro" in metrics and metrics["mecovqa_g.skipped"] == 0.0
    document = read_results(output / "results.json")
    assert set(document["benchmarks"]) == ALL_BENCHMARKS
    assert document["run"]["samples_per_second"] > 0
    lines = (output / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == sum(entry["n"] for entry in document["benchmarks"].values())
    tables = (output / "tables.md").read_text()
    for title in ("Table 2", "Table 3", "Table 4", "Table 10", "per modality"):
        assert title in tables
    logged = {(p.name, a) for p, a in tracker.artifacts}
    assert ("report.html", "eval") in logged
    assert any(a and a.startswith("eval/overlays/") for _, a in logged)
    assert collect_curves([model_dir]) == {"instruct-tune/loss": [(10.0, 2.0), (20.0, 1.2)]}

    html = (output / "report.html").read_text()
    sources = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:  # every inlined image decodes
        Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).verify()
    assert 'aria-label="instruct-tune training curves"' in html and ">training step<" in html  # labelled curve
    assert 'class="tok"' in html  # region tokens highlighted
    assert "missing-mask-probe" not in html
    assert not re.search(r'(src|href)="(?!data:)[^"#]', html), "report must not reference external files"
    render_in_chromium(output / "report.html", tmp_path)


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def render_in_chromium(report: Path, tmp_path: Path, name: str = "eval_report.png") -> None:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("chromium not installed (CI: apt-get install -y chromium)")
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}"]
    # Images loaded: count <img> elements the browser decoded (naturalWidth > 0) after the load event.
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text() + "<script>addEventListener('load',()=>{const i=[...document.images];"
                     "document.body.setAttribute('data-loaded',i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)})</script>")
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180)
    loaded = re.search(r'data-loaded="(\d+)/(\d+)"', dom.stdout)
    assert loaded, f"chromium did not render the report: {dom.stderr[-2000:]}"
    assert loaded.group(1) == loaded.group(2) and int(loaded.group(2)) > 0, f"images loaded: {loaded.group(0)}"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")  # screenshots are test artifacts, never committed
    screenshot = ARTIFACTS / name
    subprocess.run([*flags, f"--screenshot={screenshot}", "--window-size=1280,2400", report.as_uri()], capture_output=True, timeout=180, check=True)
    with Image.open(screenshot) as shot:
        assert shot.size == (1280, 2400)
        assert len(np.unique(np.asarray(shot.convert("L")))) > 10, "screenshot is blank"


def test_tables_from_partial_results():
    summaries = {"vqa_rad": {"closed_accuracy": {"per_modality": {"CT": 0.5}, "counts": {"CT": 2}, "macro": 0.5, "micro": 0.5, "n": 2}}}
    table = comprehension_table(summaries)
    assert table.rows[0][1] == "50.0" and table.rows[0][3] == "-" and table.rows[0][-1] == "50.0"
    assert all_tables(summaries)[-1].title.startswith("VQA-RAD")
    assert "| model | 50.0 |" in table.to_markdown() and "VQA-RAD close" in table.to_text()
    assert summaries_from({"benchmarks": {"x": {"metrics": {}}}}) == {"x": {}}
