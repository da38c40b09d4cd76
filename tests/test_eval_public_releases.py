"""Benchmarks read from their public releases, on fixtures written by hand with the releases'
own field names: VQA-RAD's original JSON (test selection), PathVQA / VQA-RAD Hugging Face parquet,
MMMU's validation parquet (dev/test left out, a two-image question) and the authors' DiagSeg."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medsight.eval.benchmarks.common import BenchmarkFormatError
from medsight.eval.benchmarks.diagseg import read_diagseg
from medsight.eval.benchmarks.manifest import load_manifest
from medsight.eval.benchmarks.multiple_choice import read_mmmu
from medsight.eval.benchmarks.vqa_llava_med import read_vqa
from medsight.eval.visuals import load_gt_regions, load_sample_image


def _png_bytes(width: int = 8, height: int = 8, value: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png(path: Path, box: tuple[int, int, int, int] | None = None, size: int = 16) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size), 90, np.uint8)
    if box:
        array[:] = 0
        array[box[1] : box[3], box[0] : box[2]] = 255
    Image.fromarray(array).save(path)
    return str(path)


def _parquet(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _vqa_rad_row(qid: int, phrase_type: str, question: str, answer: str, answer_type: str) -> dict:
    # Every field of the original "VQA_RAD Dataset Public.json" release.
    return {"qid": qid, "phrase_type": phrase_type, "qid_linked_id": f"03f451ca-de62-4617-9679-{qid:012d}",
            "image_case_url": "https://medpix.nlm.nih.gov/case?id=x", "image_name": "synpic54610.jpg",
            "image_organ": "HEAD", "evaluation": "not evaluated", "question": question, "question_rephrase": "NULL",
            "question_relation": "NULL", "question_frame": "NULL", "question_type": "PRES", "answer": answer,
            "answer_type": answer_type}


def test_vqa_rad_original_json_is_scored_on_its_test_questions_only(tmp_path: Path) -> None:
    _png(tmp_path / "VQA_RAD Image Folder" / "synpic54610.jpg")
    rows = [
        _vqa_rad_row(0, "freeform", "Are regions of the brain infarcted?", "Yes", "CLOSED"),
        _vqa_rad_row(1, "para", "Is part of the brain infarcted?", "Yes", "CLOSED"),
        _vqa_rad_row(2, "test_freeform", "Is there a mass?", "No", "CLOSED"),
        _vqa_rad_row(3, "test_para", "Which lobe is affected?", "left temporal lobe", "OPEN"),
    ]
    path = tmp_path / "VQA_RAD Dataset Public.json"
    path.write_text(json.dumps(rows))
    data = read_vqa(path, tmp_path / "VQA_RAD Image Folder", "vqa_rad")
    assert [(s.sample_id, s.task) for s in data.samples] == [("2", "closed"), ("3", "open")]
    train = read_vqa(path, tmp_path / "VQA_RAD Image Folder", "vqa_rad", split="train")
    assert [s.sample_id for s in train.samples] == ["0", "1"]
    assert len(read_vqa(path, tmp_path / "VQA_RAD Image Folder", "vqa_rad", split=None).samples) == 4


def test_pathvqa_and_vqa_rad_hugging_face_parquet(tmp_path: Path) -> None:
    # flaviagiammarino/path-vqa: data/{train,validation,test}-*.parquet with image, question, answer.
    image = {"bytes": _png_bytes(), "path": "test_0000.jpg"}
    _parquet([{"image": image, "question": "is this a lung?", "answer": "yes"},
              {"image": image, "question": "what does this show?", "answer": "adenocarcinoma"}],
             tmp_path / "path-vqa" / "data" / "test-00000-of-00003-5b0ec0b8d7b4e0dd.parquet")
    _parquet([{"image": image, "question": "train question?", "answer": "no"}],
             tmp_path / "path-vqa" / "data" / "train-00000-of-00013-e8fd3c4a7a2fd75c.parquet")
    data = read_vqa(tmp_path / "path-vqa", benchmark="pathvqa")
    assert [(s.task, s.answer) for s in data.samples] == [("closed", "yes"), ("open", "adenocarcinoma")]
    assert data.samples[0].image_bytes and data.samples[0].image_path is None
    assert load_sample_image(data.samples[0]).shape == (3, 8, 8)
    assert data.samples[0].modality == "Path"  # PathVQA's default modality
    single = read_vqa(tmp_path / "path-vqa" / "data" / "test-00000-of-00003-5b0ec0b8d7b4e0dd.parquet", benchmark="vqa_rad")
    assert len(single.samples) == 2
    manifest = tmp_path / "benchmarks.json"
    manifest.write_text(json.dumps({"benchmarks": [{"name": "pathvqa", "reader": "vqa", "path": "path-vqa"}]}))
    (loaded,) = load_manifest(manifest)
    assert len(loaded.samples) == 2


def _mmmu_row(split: str, subject: str, number: int, images: int = 1, question_type: str = "multiple-choice") -> dict:
    row = {"id": f"{split}_{subject}_{number}", "question": "<image 1> Which structure is shown?",
           "options": "['liver', 'spleen', 'kidney']", "explanation": "", "img_type": "['CT scans']", "answer": "B",
           "topic_difficulty": "Medium", "question_type": question_type, "subfield": "Radiology"}
    for n in range(1, 8):
        row[f"image_{n}"] = {"bytes": _png_bytes(8 + 4 * n, 8, 40 * n), "path": f"{n}.png"} if n <= images else None
    if images == 2:
        row["question"] = "Compare <image 1> and <image 2>: which shows the spleen?"
    return row


def test_mmmu_med_reads_validation_only_with_multi_image_questions(tmp_path: Path) -> None:
    for subject in ("Clinical_Medicine", "Public_Health"):
        folder = tmp_path / "MMMU" / subject
        _parquet([_mmmu_row("validation", subject, 1), _mmmu_row("validation", subject, 2, images=2),
                  _mmmu_row("validation", subject, 3, question_type="open")], folder / "validation-00000-of-00001.parquet")
        _parquet([_mmmu_row("dev", subject, 1)], folder / "dev-00000-of-00001.parquet")
        _parquet([{**_mmmu_row("test", subject, 1), "answer": "?"}], folder / "test-00000-of-00001.parquet")
    _parquet([_mmmu_row("validation", "Art", 1)], tmp_path / "MMMU" / "Art" / "validation-00000-of-00001.parquet")
    data = read_mmmu(tmp_path / "MMMU")
    assert sorted(s.sample_id for s in data.samples) == [
        "validation_Clinical_Medicine_1", "validation_Clinical_Medicine_2", "validation_Public_Health_1",
        "validation_Public_Health_2"]
    two = next(s for s in data.samples if s.sample_id == "validation_Clinical_Medicine_2")
    assert two.num_images == 2 and "image 2 (number 2 from the left)" in two.question
    picture = load_sample_image(two)
    assert picture.shape[1] == 8 and picture.shape[2] == 12 + 16  # both images, side by side
    assert {s.sample_id for s in data.skipped} == {"validation_Clinical_Medicine_3", "validation_Public_Health_3"}
    assert len(read_mmmu(tmp_path / "MMMU", subjects=("Public_Health",)).samples) == 2


def _authors_entry(qa_id: int, root: str, image: str, masks: list[tuple[int, str]], mask_ids: list) -> dict:
    # The authors' released DiagSeg entry: absolute paths into their own BiomedParse copy.
    return {"qa_id": qa_id, "question": "What abnormality is present on this imaging study? Please provide the "
            "diagnosis and then segment the lesion.", "answer": "Findings indicate a benign tumor; segment the lesion as <mask>.",
            "short_answer": "Benign tumor", "image_file": f"{root}/{image}", "mask_ids": mask_ids,
            "masks": [[i, f"{root}/{m}"] for i, m in masks], "answer_type": "open", "modality": "US"}


def test_authors_diagseg_release_is_rebased_and_unions_mask_groups(tmp_path: Path) -> None:
    data_root = tmp_path / "BiomedParse"
    foreign = "/qumulo/shared_data/someone/data/BiomedParse"
    image = "BreastUS/BreastUS/test/benign (46)_ultrasound_breast.png"
    _png(data_root / image)
    first = "BreastUS/BreastUS/test_mask/benign (46)_ultrasound_breast_benign+tumor.png"
    second = "BreastUS/BreastUS/test_mask/benign (46)_ultrasound_breast_tumor+part.png"
    _png(data_root / first, box=(0, 0, 4, 4))
    _png(data_root / second, box=(8, 8, 12, 12))
    entries = [
        _authors_entry(0, foreign, image, [(54, first)], [54]),
        _authors_entry(1, foreign, image, [(54, first), (55, second)], [[54, 55]]),  # one region, two files
        _authors_entry(2, foreign, image, [(56, "BreastUS/BreastUS/test_mask/gone.png")], [56]),
    ]
    path = tmp_path / "SegVQA_Diagnostic_test_vqa.json"
    path.write_text(json.dumps(entries))
    data = read_diagseg(path, data_root)
    first_sample, union = data.samples
    assert first_sample.sample_id == "0" and first_sample.diagnosis == "Benign tumor" and first_sample.answer == "Benign tumor"
    assert first_sample.image_path == data_root / image and first_sample.modality == "US"
    assert first_sample.question.startswith("What abnormality")
    (region,) = load_gt_regions(union)
    assert union.mask_groups == [2] and int(region.sum()) == 32  # the two 4x4 boxes together
    assert [s.sample_id for s in data.skipped] == ["2"] and "gone.png" in data.skipped[0].reason
    prefixed = read_diagseg(path, data_root, strip_prefix=foreign)
    assert len(prefixed.samples) == 2
    broken = [dict(entries[0], mask_ids=[99])]
    path.write_text(json.dumps(broken))
    with pytest.raises(BenchmarkFormatError, match=r"mask_ids \[99\] not listed in 'masks'"):
        read_diagseg(path, data_root)
