"""``medsight data prepare pubmedvision`` on a hand-made release in the published layout
(``PubMedVision_Alignment_VQA.json`` / ``PubMedVision_InstructionTuning_VQA.json`` + ``images/``),
with a multi-image row, a row whose image is missing and a malformed row; and ``medsight data
check`` over a prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from medsight.data.cli import data_app
from medsight.data.conversation_dataset import ConversationDataset
from medsight.data.llava import read_conversations
from medsight.data.prepare.pubmedvision import PubMedVisionOptions, prepare_pubmedvision
from medsight.data.prepare.report import PrepareError
from medsight.data.quality_check import check_dataset
from medsight.data.taxonomy import Taxonomy


def _row(kind: str, number: int, images: list[str], modality: str = "Computed Tomography") -> dict:
    markers = "<image>\n" * len(images)
    return {"id": f"{kind}_VQA_{number}", "image": images, "modality": modality, "body_part": "Chest",
            "conversations": [{"from": "human", "value": f"{markers}What does the image show?"},
                              {"from": "gpt", "value": f"A chest scan number {number}."}]}


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    src = tmp_path / "PubMedVision"
    (src / "images").mkdir(parents=True)
    for n in range(12):
        Image.new("RGB", (12, 8), (n * 10, 0, 0)).save(src / "images" / f"pmc_{n}_0.jpg")
    alignment = [_row("Alignment", n, [f"images/pmc_{n}_0.jpg"]) for n in range(10)]
    alignment.append(_row("Alignment", 10, ["images/pmc_10_0.jpg", "images/pmc_11_0.jpg"], "Magnetic Resonance Imaging"))
    alignment.append(_row("Alignment", 11, ["images/pmc_9_0_missing.jpg"]))  # referenced, never shipped
    alignment.append({"id": "Alignment_VQA_12", "image": ["images/pmc_1_0.jpg"], "conversations": [{"from": "gpt", "value": "x"}]})
    instruct = [_row("InstructionTuning", n, [f"images/pmc_{n % 12}_0.jpg"]) for n in range(40)]
    (src / "PubMedVision_Alignment_VQA.json").write_text(json.dumps(alignment))
    (src / "PubMedVision_InstructionTuning_VQA.json").write_text(json.dumps(instruct))
    return src


def _lines(dest: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (dest / "pubmedvision" / f"{name}.jsonl").read_text().splitlines()]


def _prepare(src: Path, dest: Path, **overrides):
    options = PubMedVisionOptions(**{"val_fraction": 0.2, "instruct_samples": 25, "max_bad_fraction": 0.2, **overrides})
    return prepare_pubmedvision(src, dest, options, progress=False)


def test_rows_keep_every_image_and_bad_rows_are_reported(release: Path, tmp_path: Path) -> None:
    dest = tmp_path / "prepared"
    summary = _prepare(release, dest)
    alignment = _lines(dest, "alignment_train") + _lines(dest, "alignment_val")
    assert len(alignment) == 11 and _lines(dest, "alignment_val")
    (pair,) = [row for row in alignment if len(row["image"]) == 2]
    assert all((dest / image).is_file() for image in pair["image"]) and pair["modality"] == "Magnetic Resonance Imaging"
    assert pair["body_part"] == "Chest"  # free-text metadata kept as published
    report = json.loads((dest / "reports" / "pubmedvision.json").read_text())
    found = {(Path(p["file"]).name, p["kind"]) for p in report["problems"]}
    assert ("pmc_9_0_missing.jpg", "missing image") in found
    assert ("PubMedVision_Alignment_VQA.json", "bad entry") in found
    assert report["bad"] == 2 and summary.multi_image == 1
    assert not list(dest.rglob("*.jpg")), "prepare must not copy images"


def test_instruct_sample_is_seeded_and_disjoint_from_val(release: Path, tmp_path: Path) -> None:
    _prepare(release, tmp_path / "a")
    _prepare(release, tmp_path / "b")
    _prepare(release, tmp_path / "c", seed=5)
    ids = lambda root, name: [row["id"] for row in _lines(root, name)]  # noqa: E731
    sample = ids(tmp_path / "a", "instruct_train")
    assert len(sample) == 25 and sample == ids(tmp_path / "b", "instruct_train")
    assert sample != ids(tmp_path / "c", "instruct_train")
    assert not set(sample) & set(ids(tmp_path / "a", "instruct_val"))
    numbers = [int(i.rsplit("_", 1)[1]) for i in sample]
    assert numbers == sorted(numbers)  # release order kept within the sample


def test_free_text_modality_never_meets_the_taxonomy(release: Path, tmp_path: Path, tiny_tokenizer_dir) -> None:
    from medsight.data.tokenizer import load_tokenizer

    dest = tmp_path / "prepared"
    _prepare(release, dest)
    conversations = read_conversations(dest / "pubmedvision" / "alignment_train.jsonl", dest)
    assert any(len(c.image_paths) == 2 for c in conversations)
    dataset = ConversationDataset(conversations, load_tokenizer(tiny_tokenizer_dir), num_visual_tokens=4,
                                  image_size=16, max_length=256, taxonomy=Taxonomy.synthetic())
    items = [dataset[i] for i in range(len(dataset))]
    assert {item["modality"] for item in items} == {-1}  # "Computed Tomography" is metadata, not a label
    assert all(item["image"].shape == (3, 16, 16) for item in items)


def test_too_many_bad_rows_stop_and_leave_only_the_report(release: Path, tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="2 of 53 entries are bad"):
        _prepare(release, tmp_path / "prepared", max_bad_fraction=0.01)
    assert not (tmp_path / "prepared" / "pubmedvision").exists()
    assert json.loads((tmp_path / "prepared" / "reports" / "pubmedvision.json").read_text())["status"] == "failed"


def test_quality_check_report_and_limit(release: Path, tmp_path: Path) -> None:
    from medsight.config.schema import DataConfig
    from medsight.data.synthetic import generate_dataset

    root = tmp_path / "data"
    generate_dataset(root, DataConfig(image_size=32, train_images=12, val_images=6, test_images=6))
    report = check_dataset(root, max_bad_fraction=0.2, verify_files=True)
    assert report["ok"] and report["releases"]["pubmedvision"]["problems_by_kind"] == {"missing image": 2}
    bmp = report["biomedparse"]
    assert sum(bmp["images"].values()) == 24 and bmp["images"]["test"] == 6 and bmp["images"]["val"] >= 6
    assert set(bmp["class_balance"]) == set(Taxonomy.synthetic().modalities)
    assert sum(sum(c) for c in bmp["mask_area_histogram"]["per_modality"].values()) == \
        sum(n * count for n, count in bmp["masks_per_image"].items())
    index = root / "biomedparse" / "train.jsonl"
    lines = [json.loads(line) for line in index.read_text().splitlines()]
    for entry in lines:  # a release without area fields: check measures the masks itself
        for region in entry["regions"]:
            region["area"] = None
    index.write_text("".join(json.dumps(entry) + "\n" for entry in lines))
    measured = check_dataset(root, max_bad_fraction=0.2)["biomedparse"]
    assert measured["areas_measured_on_sample"] == sum(len(e["regions"]) for e in lines)
    assert measured["mask_area_histogram"] == bmp["mask_area_histogram"]
    page = (root / "reports" / "quality.html").read_text()
    assert "<svg" in page and "Mask area" in page and "pmc_missing_0.jpg" in page
    assert json.loads((root / "reports" / "quality.json").read_text())["ok"] is True
    runner = CliRunner()
    strict = runner.invoke(data_app, ["check", str(root), "--max-bad-fraction", "0.001"])
    assert strict.exit_code == 1 and "OVER THE LIMIT" in strict.output
    next(iter((root / "raw" / "biomedparse").rglob("train_mask/*.png"))).unlink()  # gone since prepare
    gone = check_dataset(root, max_bad_fraction=0.2, verify_files=True)
    assert len(gone["biomedparse"]["missing_now"]) == 1 and gone["releases"]["biomedparse"]["bad"] == 1
    assert runner.invoke(data_app, ["check", str(tmp_path / "nothing")]).exit_code == 2
    elsewhere = runner.invoke(data_app, ["check", str(root), "--out", str(tmp_path / "qc"), "--max-bad-fraction", "0.5"])
    assert elsewhere.exit_code == 0 and (tmp_path / "qc" / "quality.html").is_file()
