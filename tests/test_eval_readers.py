"""Each benchmark reader on small fixtures written in that benchmark's public format."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medsight.data.taxonomy import Taxonomy
from medsight.eval.benchmarks.box_grounding import SCHAIN_BOX_COLUMN, read_box_json, read_schain
from medsight.eval.benchmarks.common import BenchmarkFormatError, canonical_modality, model_modality
from medsight.eval.benchmarks.diagseg import read_diagseg
from medsight.eval.benchmarks.manifest import load_manifest
from medsight.eval.benchmarks.mecovqa_grounding import read_mecovqa_grounding
from medsight.eval.benchmarks.multiple_choice import read_mmmu, read_omnimedvqa
from medsight.eval.benchmarks.vqa_llava_med import read_vqa


def png(path: Path, size=(20, 10), value=128, box=None) -> Path:
    """Write a grayscale PNG (width x height = size); ``box`` = (x1, y1, x2, y2) set to 255."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size[1], size[0]), value, dtype=np.uint8)
    if box:
        array[:] = 0
        array[box[1] : box[3], box[0] : box[2]] = 255
    Image.fromarray(array).save(path)
    return path


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def dump(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_modality_names():
    assert canonical_modality("CT(Computed Tomography)") == "CT"
    assert canonical_modality("MR (Mag-netic Resonance Imaging)") == "MRI"
    assert canonical_modality("ct_00") == "CT"
    assert canonical_modality("fundus_photography") == "FP"
    assert canonical_modality("X-Ray") == "X-ray"
    assert canonical_modality("Infrared Reflectance Imaging") == "Infrared Reflectance Imaging"
    assert model_modality("MR (Mag-netic Resonance Imaging)", Taxonomy.synthetic()) == "MRI"
    assert model_modality("Microscopy Images", Taxonomy.synthetic()) is None


# ---------------------------------------------------------------------------- VQA


def test_vqa_llava_med_format(tmp_path):
    png(tmp_path / "img" / "a.png")
    entries = [
        {"id": "q1", "image": "img/a.png", "answer_type": "CLOSED", "modality": "CT",
         "conversations": [{"from": "human", "value": "<image>\nIs there a tumor?"}, {"from": "gpt", "value": "Yes"}]},
        # LLaVA-Med's released files misspell the key as "conversatons".
        {"id": "q2", "image": "img/a.png", "answer_type": "OPEN",
         "conversatons": [{"from": "human", "value": "Which organ?"}, {"from": "gpt", "value": "the liver"}]},
        {"id": "q3", "image": "img/missing.png", "answer_type": "OPEN",
         "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    data = read_vqa(dump(tmp_path / "test.json", entries), tmp_path, "vqa_rad")
    assert [(s.sample_id, s.task, s.question, s.answer) for s in data.samples] == [
        ("q1", "closed", "Is there a tumor?", "Yes"),
        ("q2", "open", "Which organ?", "the liver"),
    ]
    assert data.samples[0].modality == "CT" and data.samples[0].source_modality == "CT"
    assert data.samples[1].modality == "Radiology"  # the benchmark default
    assert [s.sample_id for s in data.skipped] == ["q3"] and "missing" in data.skipped[0].reason


def test_vqa_slake_and_vqarad_raw_formats(tmp_path):
    png(tmp_path / "xmlab1" / "source.jpg")
    slake = [
        {"qid": 1, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "No",
         "answer_type": "CLOSED", "modality": "MRI", "q_lang": "en"},
        {"qid": 2, "img_name": "xmlab1/source.jpg", "question": "这是CT吗?", "answer": "否",
         "answer_type": "CLOSED", "modality": "MRI", "q_lang": "zh"},
    ]
    data = read_vqa(dump(tmp_path / "slake.json", slake), tmp_path, "slake")
    assert [s.sample_id for s in data.samples] == ["1"]  # the Chinese half is not the benchmark
    assert data.samples[0].modality == "MRI"
    vqarad = [{"qid": 7, "image_name": "xmlab1/source.jpg", "question": "Where?", "answer": "left lung",
               "answer_type": "OPEN  ", "image_organ": "CHEST"}]
    data = read_vqa(dump(tmp_path / "rad.json", vqarad), tmp_path, "vqa_rad")
    assert data.samples[0].task == "open" and data.samples[0].answer == "left lung"


def test_vqa_pathvqa_infers_answer_type_and_rejects_bad_entries(tmp_path):
    png(tmp_path / "p.png")
    entries = [{"id": "a", "image": "p.png", "question": "Is it benign?", "answer": "yes"},
               {"id": "b", "image": "p.png", "question": "What stain?", "answer": "H&E"}]
    path = tmp_path / "path.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    data = read_vqa(path, tmp_path, "pathvqa")
    assert [s.task for s in data.samples] == ["closed", "open"]
    assert data.samples[0].modality == "Path"
    with pytest.raises(BenchmarkFormatError, match="entry x"):
        read_vqa(dump(tmp_path / "bad.json", [{"id": "x", "image": "p.png"}]), tmp_path, "pathvqa")
    with pytest.raises(BenchmarkFormatError, match="CLOSED or OPEN"):
        read_vqa(dump(tmp_path / "bad2.json", [{"id": "y", "image": "p.png", "question": "q", "answer": "a", "answer_type": "MAYBE"}]), tmp_path, "x")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1}\n{not json\n')
    with pytest.raises(BenchmarkFormatError, match="broken.jsonl:2"):
        read_vqa(broken, tmp_path, "x")


# ---------------------------------------------------------------------------- multiple choice


def test_mmmu_parquet(tmp_path):
    rows = [
        {"id": "validation_Clinical_Medicine_1", "question": "<image 1> Which organ is enlarged?",
         "options": "['liver', 'spleen', 'kidney']", "answer": "B", "question_type": "multiple-choice",
         "image_1": {"bytes": png_bytes(), "path": "x.png"}},
        {"id": "validation_Clinical_Medicine_2", "question": "Dose?", "options": "[]", "answer": "5 mg",
         "question_type": "open", "image_1": {"bytes": png_bytes(), "path": "y.png"}},
        {"id": "validation_Art_1", "question": "Painter?", "options": "['a', 'b']", "answer": "A",
         "question_type": "multiple-choice", "image_1": {"bytes": png_bytes(), "path": "z.png"}},
    ]
    target = tmp_path / "Clinical_Medicine" / "validation-00000-of-00001.parquet"
    target.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), target)
    data = read_mmmu(tmp_path)
    assert len(data.samples) == 1  # the open one is skipped, the non-medical subject filtered
    sample = data.samples[0]
    assert sample.options == ["liver", "spleen", "kidney"] and sample.answer_index == 1
    assert sample.question.startswith("Which organ is enlarged?\nA. liver\nB. spleen")
    assert sample.image_bytes and sample.modality == "Clinical_Medicine"
    assert [s.sample_id for s in data.skipped] == ["validation_Clinical_Medicine_2"]


def test_omnimedvqa_layout_and_modality_selection(tmp_path):
    png(tmp_path / "Images" / "ds" / "1.png")
    rows = [
        {"dataset": "ds", "question_id": "ds_1", "question_type": "Modality Recognition", "question": "Modality?",
         "gt_answer": "CT", "image_path": "Images/ds/1.png", "option_A": "MRI", "option_B": "CT",
         "modality_type": "CT(Computed Tomography)"},
        {"dataset": "ds", "question_id": "ds_2", "question": "Q", "gt_answer": "x", "image_path": "Images/ds/1.png",
         "option_A": "x", "option_B": "y", "modality_type": "Dermoscopy"},  # not in HealthGPT's selection
        {"dataset": "ds", "question_id": "ds_3", "question": "Q", "gt_answer": "z", "image_path": "Images/ds/1.png",
         "option_A": "x", "option_B": "y", "modality": "X-Ray"},  # one release file uses "modality"
    ]
    dump(tmp_path / "QA information" / "Open-access" / "ds.json", rows)
    data = read_omnimedvqa(tmp_path)
    assert [(s.sample_id, s.answer_index, s.modality) for s in data.samples] == [("ds/ds_1", 1, "CT")]
    assert data.skipped[0].sample_id == "ds_3" and "matches no option" in data.skipped[0].reason
    assert len(read_omnimedvqa(tmp_path, modalities=None).samples) == 2


# ---------------------------------------------------------------------------- segmentation


def test_diagseg(tmp_path):
    png(tmp_path / "img.png")
    png(tmp_path / "m1.png", box=(0, 0, 5, 5))
    png(tmp_path / "m2.png", box=(5, 5, 10, 10))
    entries = [
        {"id": "d1", "image": "img.png", "modality": "Ultrasound", "diagnosis": "cyst",
         "mask_files": ["m1.png", "m2.png"], "mask_orders": [1, 0],
         "conversations": [{"from": "human", "value": "<image>\nWhat is it? Segment it."},
                           {"from": "gpt", "value": "A cyst [C3_1] next to the gland [C3_4]."}]},
        {"id": "d2", "image": "img.png", "mask_files": ["gone.png"],
         "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    data = read_diagseg(dump(tmp_path / "diagseg.json", entries), tmp_path)
    sample = data.samples[0]
    assert sample.task == "diagseg" and sample.diagnosis == "cyst" and sample.modality == "US"
    assert [p.name for p in sample.mask_paths] == ["m2.png", "m1.png"]  # mask_orders applied
    assert data.skipped[0].sample_id == "d2"
    with pytest.raises(BenchmarkFormatError, match="no mask_files"):
        read_diagseg(dump(tmp_path / "bad.json", [{"id": "z", "image": "img.png", "conversations": entries[0]["conversations"]}]), tmp_path)


def test_mecovqa_grounding_skips_missing_and_bad_masks(tmp_path):
    image = "images/ct_00--AbdomenCT1K--Case_00220--x_0359.png"
    png(tmp_path / image)
    png(tmp_path / "masks" / "liver.png", box=(2, 2, 6, 6))
    png(tmp_path / "masks" / "empty.png", value=0)
    png(tmp_path / "masks" / "small.png", size=(4, 4), box=(0, 0, 2, 2))

    def entry(i, mask):
        return {"id": f"e{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nPlease segment the liver."},
            {"from": "gpt", "value": f"Sure, it is <SEG>.<mask>{mask}</mask>"}]}

    entries = [entry(0, "masks/liver.png"), entry(1, "masks/missing.png"), entry(2, "masks/empty.png"), entry(3, "masks/small.png")]
    data = read_mecovqa_grounding(dump(tmp_path / "MeCoVQA_G.json", entries), tmp_path)
    assert [s.sample_id for s in data.samples] == ["e0"]
    sample = data.samples[0]
    assert sample.modality == "CT" and sample.answer == "Sure, it is <SEG>." and sample.task == "grounding"
    reasons = {s.sample_id: s.reason for s in data.skipped}
    assert "missing" in reasons["e1"] and "empty" in reasons["e2"] and "4x4" in reasons["e3"]


def test_schain_parquet_boxes(tmp_path):
    rows = [
        {"Patient ID": "OAS1", "Slide": "s1", SCHAIN_BOX_COLUMN: "[[0.1, 0.2, 0.3, 0.4]]", "Q1": "q", "A1": "a",
         "image": {"bytes": png_bytes(), "path": "a.png"}},
        {"Patient ID": "OAS2", "Slide": "s2", SCHAIN_BOX_COLUMN: "0.5, 0.5, 0.2, 0.2; 0.0, 0.0, 0.1, 0.1",
         "image": {"bytes": png_bytes(), "path": "b.png"}},
        {"Patient ID": "OAS3", "Slide": "s3", SCHAIN_BOX_COLUMN: "", "image": {"bytes": png_bytes(), "path": "c.png"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    data = read_schain(tmp_path / "test.parquet")
    assert data.samples[0].boxes == [pytest.approx((0.1, 0.2, 0.4, 0.6))]
    assert len(data.samples[1].boxes) == 2 and data.samples[1].modality == "MRI"
    assert data.skipped[0].sample_id == "OAS3/s3"
    centre = read_schain(tmp_path / "test.parquet", box_origin="center").samples[0].boxes[0]
    assert centre == pytest.approx((0.0, 0.0, 0.25, 0.4))  # clipped at 0


def test_box_json_pixel_and_normalised(tmp_path):
    png(tmp_path / "a.png", size=(20, 10))
    entries = [
        {"id": "p", "image": "a.png", "bbox": [2, 1, 12, 6], "modality": "CT"},  # pixels, xyxy
        {"id": "n", "image": "a.png", "boxes": [[0.1, 0.1, 0.5, 0.5]], "box_format": "xywh"},
    ]
    data = read_box_json(dump(tmp_path / "boxes.json", entries), tmp_path)
    assert data.samples[0].boxes == [pytest.approx((0.1, 0.1, 0.6, 0.6))]
    assert data.samples[1].boxes == [pytest.approx((0.1, 0.1, 0.6, 0.6))]
    with pytest.raises(BenchmarkFormatError, match="groups of 4"):
        read_box_json(dump(tmp_path / "bad.json", [{"id": "x", "image": "a.png", "bbox": [1, 2, 3]}]), tmp_path)


def test_manifest(tmp_path):
    png(tmp_path / "vqa" / "a.png")
    dump(tmp_path / "vqa" / "test.json", [{"id": "1", "image": "a.png", "question": "q?", "answer": "yes"}])
    manifest = dump(tmp_path / "benchmarks.json", {"benchmarks": [
        {"name": "pathvqa", "reader": "vqa", "path": "vqa/test.json", "image_root": "vqa"},
        {"name": "vqa_rad", "reader": "vqa", "path": "vqa/test.json", "image_root": "vqa"},
    ]})
    datasets = load_manifest(manifest)
    assert [d.name for d in datasets] == ["vqa_rad", "pathvqa"]  # the paper's order
    assert len(load_manifest(manifest, only=["pathvqa"])) == 1
    with pytest.raises(BenchmarkFormatError, match="unknown reader"):
        load_manifest(dump(tmp_path / "m2.json", {"benchmarks": [{"name": "x", "reader": "nope", "path": "a"}]}))
    with pytest.raises(BenchmarkFormatError, match="unknown manifest key.*image_rot"):
        load_manifest(dump(tmp_path / "m3.json", {"benchmarks": [{"name": "x", "reader": "vqa", "path": "vqa/test.json", "image_rot": "vqa"}]}))
    with pytest.raises(BenchmarkFormatError, match="no benchmark named"):
        load_manifest(manifest, only=["slake"])
