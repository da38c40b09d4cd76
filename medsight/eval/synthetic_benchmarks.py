"""The synthetic test split, written in each benchmark's own public format.

Every evaluation run of the tiny preset then goes through every reader, exactly as a real
release would: VQA-RAD (the original public JSON, whose training questions the reader must leave
out), SLAKE (its original schema, with a Chinese duplicate that the reader must drop), PathVQA
(Hugging Face parquet, embedded images, a train file that must not be read), MMMU-Med (HF
parquet, validation files read and dev files not, one two-image question), OmniMedVQA (``QA
information/Open-access``), DiagSeg (the authors' release format, absolute paths into another
machine's BiomedParse copy), MeCoVQA-G (SA-Med2D names, inline ``<mask>`` tags; with ``probes``,
one entry with a missing mask that must be reported and skipped), S-Chain (parquet, normalised
XYWH strings, a Modality column) and MedTrinity-style JSON (pixel XYXY boxes).
Files are copied into each benchmark folder so the output stands alone (and is DVC-cacheable).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from medsight.data.prepared_index import SegmentationRecord, index_path, read_split
from medsight.data.synthetic_world import SYNTHETIC_MODALITIES
from medsight.data.taxonomy import Taxonomy
from medsight.eval.benchmarks.multiple_choice import MMMU_MED_SUBJECTS
from medsight.eval.benchmarks.box_grounding import SCHAIN_BOX_COLUMN, SCHAIN_MODALITY_COLUMN
from medsight.data.datagen.diagseg_builder import build_diagseg
from medsight.data.datagen.records import triples_from_biomedparse
from medsight.data.datagen.templates import TemplateGenerator
from medsight.io_utils import atomic_write_json

VQA_SPLIT = {"CT": "vqa_rad", "X-Ray": "vqa_rad", "Pathology": "pathvqa"}  # the rest -> slake
OMNIMED_SPELLING = {
    "CT": "CT(Computed Tomography)", "MRI": "MR (Mag-netic Resonance Imaging)", "X-Ray": "X-Ray",
    "Ultrasound": "Ultrasound", "Dermoscopy": "Dermoscopy", "Pathology": "Microscopy Images",
}
SA_MED2D_PREFIX = {
    "CT": "ct_00", "MRI": "mr_t1", "X-Ray": "x_ray", "Ultrasound": "ultrasound_00",
    "Dermoscopy": "dermoscopy_00", "Pathology": "pathology_00",
}
_LESIONS = {m.name: m.lesions for m in SYNTHETIC_MODALITIES}
_LESION_KINDS = frozenset(kind for kinds in _LESIONS.values() for kind in kinds)
NO_FINDING = "no abnormality"


def _rank(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def _lesion_of(record: SegmentationRecord):
    # The synthetic world's lesion kinds: these files are written from synthetic data only.
    return next((r for r in record.regions if r.class_name in _LESION_KINDS), None)


def _xywh_fraction(bbox: tuple[float, float, float, float], size: tuple[int, int]) -> list[float]:
    height, width = size
    x, y, w, h = bbox
    return [round(x / width, 4), round(y / height, 4), round(w / width, 4), round(h / height, 4)]


# ---------------------------------------------------------------------------- VQA


def _vqa_rad_row(entry: dict[str, Any], number: int, phrase_type: str) -> dict[str, Any]:
    """A row of the original ``VQA_RAD Dataset Public.json`` (train and test in one file)."""
    question, answer = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
    return {"qid": number, "phrase_type": phrase_type, "qid_linked_id": f"syn{number}", "image_case_url": "",
            "image_name": Path(entry["image"]).name, "image_organ": "ABD", "evaluation": "given",
            "question": question.replace("<image>\n", ""), "question_rephrase": "NULL", "question_relation": "NULL",
            "question_frame": "NULL", "question_type": "PRES", "answer": answer, "answer_type": entry["answer_type"]}


def _parquet(rows: list[dict[str, Any]], target: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), target)


def write_vqa(data_root: Path, out: Path) -> list[dict[str, Any]]:
    entries = json.loads((data_root / "vqa" / "test.json").read_text())
    buckets: dict[str, list[dict[str, Any]]] = {"vqa_rad": [], "slake": [], "pathvqa": []}
    for entry in entries:
        buckets[VQA_SPLIT.get(entry.get("modality", ""), "slake")].append(entry)
    specs = []
    for name, items in buckets.items():
        folder = out / name
        rows = []
        for entry in items:
            image_rel = f"images/{Path(entry['image']).name}"
            question, answer = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
            if name == "slake":  # the original SLAKE schema, English and Chinese rows
                _copy(data_root / entry["image"], folder / image_rel)
                row = {"qid": entry["id"], "img_name": image_rel, "question": question.replace("<image>\n", ""),
                       "answer": answer, "answer_type": entry["answer_type"], "modality": entry["modality"], "q_lang": "en"}
                rows.append(row)
                if len(rows) == 1:
                    rows.append({**row, "qid": f"{entry['id']}_zh", "question": "图中有病变吗？", "q_lang": "zh"})
            elif name == "pathvqa":  # HF parquet: embedded image, no answer_type (yes/no = closed)
                image = {"bytes": (data_root / entry["image"]).read_bytes(), "path": Path(entry["image"]).name}
                rows.append({"image": image, "question": question.replace("<image>\n", ""), "answer": answer})
            else:  # the original VQA-RAD file; its images live in "VQA_RAD Image Folder"
                _copy(data_root / entry["image"], folder / "VQA_RAD Image Folder" / Path(entry["image"]).name)
                rows.append(_vqa_rad_row(entry, len(rows), "test_freeform" if len(rows) % 3 else "test_para"))
        if name == "pathvqa":
            _parquet(rows, folder / "data" / "test-00000-of-00001.parquet")
            _parquet(rows[:2], folder / "data" / "train-00000-of-00001.parquet")  # must not be read
            specs.append({"name": name, "reader": "vqa", "path": name})
        elif name == "vqa_rad":
            # Training questions share the file: the reader keeps only phrase_type test_*.
            rows += [_vqa_rad_row(entry, len(rows) + i, "freeform") for i, entry in enumerate(items[:3])]
            atomic_write_json(folder / "VQA_RAD Dataset Public.json", rows)
            specs.append({"name": name, "reader": "vqa", "path": f"{name}/VQA_RAD Dataset Public.json",
                          "image_root": f"{name}/VQA_RAD Image Folder"})
        else:
            atomic_write_json(folder / "test.json", rows)
            specs.append({"name": name, "reader": "vqa", "path": f"{name}/test.json", "image_root": name})
    return specs


# ---------------------------------------------------------------------------- multiple choice


def write_mmmu(records: list[SegmentationRecord], out: Path) -> dict[str, Any]:
    rows_by_subject: dict[str, list[dict[str, Any]]] = {s: [] for s in MMMU_MED_SUBJECTS}
    for index, record in enumerate(records):
        lesion = _lesion_of(record)
        options = list(_LESIONS[record.modality]) + [NO_FINDING]
        options.sort(key=lambda o: _rank(f"{record.image_id}:{o}"))
        truth = lesion.class_name if lesion else NO_FINDING
        subject = MMMU_MED_SUBJECTS[index % len(MMMU_MED_SUBJECTS)]
        rows = rows_by_subject[subject]
        rows.append({
            "id": f"validation_{subject}_{len(rows) + 1}",
            "question": f"<image 1> Which finding is shown in this {record.modality} image?",
            "options": str(options),
            "explanation": "",
            "image_1": {"bytes": record.image_path.read_bytes(), "path": record.image_path.name},
            "img_type": "['Medical Images']",
            "answer": chr(ord("A") + options.index(truth)),
            "topic_difficulty": "Medium",
            "question_type": "multiple-choice",
            "subfield": record.modality,
        })
    first = next((rows for rows in rows_by_subject.values() if len(rows) >= 2), None)
    if first is not None:  # a question over two images, as the release has
        first[0] = {**first[0], "question": "<image 1> <image 2> Which finding is shown in one of these images?",
                    "image_2": first[1]["image_1"]}
    for subject, rows in rows_by_subject.items():
        if rows:
            _parquet(rows, out / "mmmu" / subject / "validation-00000-of-00001.parquet")
            dev = [{**row, "id": row["id"].replace("validation_", "dev_")} for row in rows[:1]]
            _parquet(dev, out / "mmmu" / subject / "dev-00000-of-00001.parquet")  # must not be read
    return {"name": "mmmu_med", "reader": "mmmu", "path": "mmmu"}


def write_omnimedvqa(records: list[SegmentationRecord], out: Path) -> dict[str, Any]:
    root = out / "omnimedvqa"
    rows = []
    for index, record in enumerate(records):
        image_rel = f"Images/Synthetic/{record.image_path.name}"
        _copy(record.image_path, root / image_rel)
        truth = OMNIMED_SPELLING[record.modality]
        others = sorted((v for k, v in OMNIMED_SPELLING.items() if k != record.modality), key=lambda o: _rank(f"{record.image_id}:{o}"))
        options = sorted([truth] + others[:3], key=lambda o: _rank(f"o:{record.image_id}:{o}"))
        rows.append({
            "dataset": "Synthetic", "question_id": f"Synthetic_{index:04d}", "question_type": "Modality Recognition",
            "question": "What imaging modality is used for this image?", "gt_answer": truth, "image_path": image_rel,
            **{f"option_{chr(ord('A') + i)}": option for i, option in enumerate(options)},
            "modality_type": truth,
        })
    atomic_write_json(root / "QA information" / "Open-access" / "Synthetic.json", rows)
    return {"name": "omnimedvqa", "reader": "omnimedvqa", "path": "omnimedvqa"}


# ---------------------------------------------------------------------------- grounding


# Where the authors' released DiagSeg file points: their own BiomedParse copy.
FOREIGN_ROOT = "/authors/shared_data/BiomedParse"


def _authors_diagseg(entry: dict[str, Any], number: int) -> dict[str, Any]:
    """A grounding-stage DiagSeg question in the authors' release format."""
    answer = re.sub(r"\[[A-Z]+\d*_\d+\]|\[SEG\]", "<mask>", entry["conversations"][1]["value"])
    masks = [[number * 10 + i, f"{FOREIGN_ROOT}/{mask}"] for i, mask in enumerate(entry["mask_files"])]
    return {"qa_id": number, "question": entry["conversations"][0]["value"].replace("<image>\n", ""),
            "answer": answer, "short_answer": entry.get("diagnosis", ""), "image_file": f"{FOREIGN_ROOT}/{entry['image']}",
            "mask_ids": [m[0] for m in masks], "masks": masks, "answer_type": "open", "modality": entry.get("modality", "")}


def write_diagseg(data_root: Path, grounding_dir: Path | None, out: Path, taxonomy: Taxonomy) -> dict[str, Any]:
    """The grounding stage's diagseg_test.json when it wrote one, else template QA; written in
    the authors' release format."""
    folder = out / "diagseg"
    source = Path(grounding_dir) / "diagseg_test.json" if grounding_dir else None
    if source is not None and source.is_file():
        entries = json.loads(source.read_text())
    else:
        work = folder / "generated.json"
        build_diagseg(triples_from_biomedparse(data_root, "test", taxonomy), TemplateGenerator(), work, folder / "generated.work", progress=False)
        entries = json.loads(work.read_text())
    for entry in entries:
        for relative in [entry["image"], *entry.get("mask_files", [])]:
            _copy(data_root / relative, folder / "BiomedParse" / relative)
    released = [_authors_diagseg(entry, number) for number, entry in enumerate(entries)]
    atomic_write_json(folder / "SegVQA_Diagnostic_test_vqa.json", released)
    return {"name": "diagseg", "reader": "diagseg", "path": "diagseg/SegVQA_Diagnostic_test_vqa.json",
            "data_root": "diagseg/BiomedParse"}


def write_mecovqa(records: list[SegmentationRecord], out: Path, probe: bool = False) -> dict[str, Any]:
    folder = out / "mecovqa_g"
    rows = []
    for record in records:
        stem = f"{SA_MED2D_PREFIX[record.modality]}--Synthetic--{record.image_id}--2d"
        _copy(record.image_path, folder / "images" / f"{stem}.png")
        for region in record.regions:
            mask_rel = f"masks/{stem}_{region.class_name.replace(' ', '_')}.png"
            _copy(region.mask_path, folder / mask_rel)
            rows.append({
                "id": f"{stem}_{region.class_name.replace(' ', '_')}",
                "image": f"images/{stem}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\nPlease segment the {region.class_name} in this image."},
                    {"from": "gpt", "value": f"Sure, it is <SEG>.<mask>{mask_rel}</mask>"},
                ],
            })
    if rows and probe:  # the released set has entries whose mask is missing (MedPLIB issue #3): tests add one
        probe = json.loads(json.dumps(rows[0]))
        probe["id"] = "missing-mask-probe"
        probe["conversations"][1]["value"] = "Sure, it is <SEG>.<mask>masks/does_not_exist.png</mask>"
        rows.append(probe)
    atomic_write_json(folder / "MeCoVQA_Grounding_test.json", rows)
    return {"name": "mecovqa_g", "reader": "mecovqa_grounding", "path": "mecovqa_g/MeCoVQA_Grounding_test.json", "image_root": "mecovqa_g"}


def write_boxes(records: list[SegmentationRecord], out: Path) -> list[dict[str, Any]]:
    from medsight.data.image_io import image_size

    schain_rows, trinity_rows = [], []
    for index, record in enumerate(records):
        lesion = _lesion_of(record)
        if lesion is None or lesion.bbox is None:
            continue
        size = image_size(record.image_path)
        schain_rows.append({
            "Patient ID": f"SYN{index:04d}", "Slide": record.image_id, "Deliverable": "", "Notes": "",
            SCHAIN_BOX_COLUMN: json.dumps([_xywh_fraction(lesion.bbox, size)]),
            SCHAIN_MODALITY_COLUMN: record.modality,  # the image's own modality, not S-Chain's MRI
            "Q1": "Is there an abnormal region?", "A1": "yes", "Q2": "", "A2": "", "Q3": "", "A3": "", "Q4": "", "A4": "",
            "image": {"bytes": record.image_path.read_bytes(), "path": record.image_path.name},
        })
        x, y, w, h = lesion.bbox
        image_rel = f"images/{record.image_path.name}"
        _copy(record.image_path, out / "medtrinity" / image_rel)
        trinity_rows.append({"id": record.image_id, "image": image_rel, "modality": record.modality,
                             "caption": lesion.sentence, "bbox": [x, y, x + w, y + h]})
    specs = []
    if schain_rows:
        _parquet(schain_rows, out / "schain" / "English" / "test-00000-of-00001.parquet")
        specs.append({"name": "schain", "reader": "schain", "path": "schain/English"})
    atomic_write_json(out / "medtrinity" / "medtrinity_boxes.json", trinity_rows)
    specs.append({"name": "medtrinity", "reader": "box_json", "path": "medtrinity/medtrinity_boxes.json", "image_root": "medtrinity"})
    return specs


def write_synthetic_benchmarks(data_root: Path, out: Path, taxonomy: Taxonomy, grounding_dir: Path | None = None,
                               probes: bool = False) -> Path:
    """Write every benchmark under ``out`` and return the manifest path (``out/benchmarks.json``).

    ``probes``: add the malformed entries that check the readers' skip paths (tests only; a
    user's evaluation never sees them)."""
    data_root, out = Path(data_root), Path(out)
    records = read_split(data_root, "test", taxonomy)
    if not records:
        raise ValueError(f"{index_path(data_root, 'test')} has no images; generate data with test_images > 0")
    specs = write_vqa(data_root, out)
    specs += [write_mmmu(records, out), write_omnimedvqa(records, out), write_diagseg(data_root, grounding_dir, out, taxonomy), write_mecovqa(records, out, probes)]
    specs += write_boxes(records, out)
    manifest = out / "benchmarks.json"
    atomic_write_json(manifest, {"benchmarks": specs})
    return manifest
