"""The synthetic test split, written in each benchmark's own public format.

Every evaluation run of the tiny preset then goes through every reader, exactly as a real
release would: VQA-RAD (LLaVA-Med JSON), SLAKE (its original schema, with a Chinese duplicate
that the reader must drop), PathVQA (no answer_type), MMMU-Med (HF parquet, embedded images),
OmniMedVQA (``QA information/Open-access``), DiagSeg, MeCoVQA-G (SA-Med2D names, inline
``<mask>`` tags; with ``probes``, one entry with a missing mask that must be reported and skipped), S-Chain
(parquet, normalised XYWH strings) and MedTrinity-style JSON (pixel XYXY boxes).
Files are copied into each benchmark folder so the output stands alone (and is DVC-cacheable).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from medsight.data.biomedparse import SegmentationRecord, read_biomedparse
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
            _copy(data_root / entry["image"], folder / image_rel)
            question, answer = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
            if name == "slake":  # the original SLAKE schema, English and Chinese rows
                row = {"qid": entry["id"], "img_name": image_rel, "question": question.replace("<image>\n", ""),
                       "answer": answer, "answer_type": entry["answer_type"], "modality": entry["modality"], "q_lang": "en"}
                rows.append(row)
                if len(rows) == 1:
                    rows.append({**row, "qid": f"{entry['id']}_zh", "question": "图中有病变吗？", "q_lang": "zh"})
            elif name == "pathvqa":  # PathVQA carries no answer_type: yes/no answers are closed
                rows.append({"id": entry["id"], "image": image_rel, "conversations": entry["conversations"]})
            else:
                rows.append({**entry, "image": image_rel})
        atomic_write_json(folder / "test.json", rows)
        specs.append({"name": name, "reader": "vqa", "path": f"{name}/test.json", "image_root": name})
    return specs


# ---------------------------------------------------------------------------- multiple choice


def write_mmmu(records: list[SegmentationRecord], out: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    for subject, rows in rows_by_subject.items():
        if rows:
            target = out / "mmmu" / subject / "validation-00000-of-00001.parquet"
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows), target)
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


def write_diagseg(data_root: Path, grounding_dir: Path | None, out: Path, taxonomy: Taxonomy) -> dict[str, Any]:
    """The lead's diagseg_test.json when the grounding stage wrote one, else template QA."""
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
            _copy(data_root / relative, folder / relative)
    atomic_write_json(folder / "diagseg_test.json", entries)
    return {"name": "diagseg", "reader": "diagseg", "path": "diagseg/diagseg_test.json", "data_root": "diagseg"}


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
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        target = out / "schain" / "English" / "test-00000-of-00001.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(schain_rows), target)
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
    records = read_biomedparse(data_root / "biomedparse", "test", taxonomy)
    if not records:
        raise ValueError(f"{data_root}/biomedparse/test.json has no images; generate data with test_images > 0")
    specs = write_vqa(data_root, out)
    specs += [write_mmmu(records, out), write_omnimedvqa(records, out), write_diagseg(data_root, grounding_dir, out, taxonomy), write_mecovqa(records, out, probes)]
    specs += write_boxes(records, out)
    manifest = out / "benchmarks.json"
    atomic_write_json(manifest, {"benchmarks": specs})
    return manifest
