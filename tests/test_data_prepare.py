"""``medsight data prepare biomedparse``: a hand-made release in the published layout (two
sub-datasets, one nested; lower-case and fine-grained modality spellings; an image with 20
masks, a missing mask, a truncated PNG, an empty mask, a mask of the wrong size, an unknown
modality) is indexed without copying images, and every bad case is reported with its file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medsight.data.biomedparse import SegmentationDataset
from medsight.data.cli import data_app
from medsight.data.prepare.biomedparse import BiomedParseOptions, prepare_biomedparse
from medsight.data.prepare.report import PrepareError
from medsight.data.prepared_index import read_split
from medsight.data.taxonomy import Taxonomy, resolve_taxonomy

SIZE = 32


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE), dtype=np.uint8)


def _mask(x: int, size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[2:10, x : x + 6] = 255
    return mask


def _subset(root: Path, split: str, images: list[dict], categories: list[str]) -> None:
    """Write one split of a sub-dataset: ``images`` = [{stem, targets: [(name, mask array|None)]}]."""
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}
    for image_id, spec in enumerate(images):
        file_name = f"{spec['stem']}.png"
        if spec.get("pixels", True) is not False:
            _png(root / split / file_name, _image(image_id))
        coco["images"].append({"id": image_id, "file_name": file_name, "height": SIZE, "width": SIZE})
        for name, mask in spec["targets"]:
            mask_file = f"{spec['stem']}_{name.replace(' ', '+')}.png"
            if mask is not None:
                _png(root / f"{split}_mask" / mask_file, mask)
            coco["annotations"].append({
                "id": len(coco["annotations"]), "image_id": image_id, "file_name": file_name, "mask_file": mask_file,
                "category_id": categories.index(name) + 1 if name in categories else 99, "bbox": [2, 2, 6, 8],
                "area": 48, "iscrowd": 0, "sentences": [{"sent": f"{name} in {spec['stem']}"}],
            })
    (root / f"{split}.json").write_text(json.dumps(coco))


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    src = tmp_path / "BiomedParse"
    ct = src / "amos22" / "CT"  # a nested sub-dataset folder, as amos22/CT and MSD/Task01 are
    good = [{"stem": f"case{i}_CT_abdomen", "targets": [("liver", _mask(2)), ("liver tumor", _mask(12))]} for i in range(6)]
    bad = [
        {"stem": "many_CT_abdomen", "targets": [(f"organ {k}", _mask(k % 20)) for k in range(20)]},
        {"stem": "nomask_CT_abdomen", "targets": [("liver", _mask(2)), ("kidney", None)]},
        {"stem": "trunc_CT_abdomen", "targets": [("liver", _mask(2))]},
        {"stem": "empty_CT_abdomen", "targets": [("liver", _mask(2)), ("kidney", np.zeros((SIZE, SIZE), np.uint8))]},
        {"stem": "small_CT_abdomen", "targets": [("liver", _mask(2, size=16))]},
    ]
    _subset(ct, "train", good + bad, ["liver", "liver tumor", "kidney"] + [f"organ {k}" for k in range(20)])
    truncated = ct / "train" / "trunc_CT_abdomen.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    _subset(ct, "test", [{"stem": "t1_CT_abdomen", "targets": [("liver", _mask(2))]}], ["liver"])
    mixed = src / "MixedDemo"
    _subset(mixed, "train", [
        {"stem": "g1_pathology_colon", "targets": [("colon gland", _mask(4))]},  # lower-case spelling
        {"stem": "g2_pathology_colon", "targets": [("colon gland", _mask(6))]},
        {"stem": "b1_MRI-FLAIR_brain", "targets": [("edema", _mask(8))]},  # finer than the 9 modalities
        {"stem": "b2_MRI-FLAIR_brain", "targets": [("edema", _mask(9))]},
        {"stem": "x1_Xylography_hand", "targets": [("bone", _mask(3))]},  # no such modality anywhere
    ], ["colon gland", "edema", "bone"])
    return src


def _prepare(src: Path, dest: Path, **overrides) -> object:
    options = BiomedParseOptions(**{"val_fraction": 0.25, "workers": 1, "max_bad_fraction": 1.0, **overrides})
    return prepare_biomedparse(src, dest, options, progress=False)


def _report(dest: Path) -> dict:
    return json.loads((dest / "reports" / "biomedparse.json").read_text())


def test_release_is_indexed_with_every_problem_reported(release: Path, tmp_path: Path) -> None:
    dest = tmp_path / "prepared"
    summary = _prepare(release, dest)
    assert not list(dest.rglob("*.png")), "prepare must not copy images"
    taxonomy = resolve_taxonomy(dest)
    assert len(taxonomy.modalities) == 18  # the shipped biomedparse-18 template
    assert taxonomy.region_classes == tuple(sorted(taxonomy.region_classes))  # collected, sorted
    assert {"liver", "liver tumor", "colon gland", "edema"} <= set(taxonomy.region_classes)
    assert "kidney" not in taxonomy.region_classes  # its only masks were missing or empty
    assert {"liver tumor", "edema"} <= taxonomy.lesion_classes and "liver" not in taxonomy.lesion_classes
    records = {r.image_id: r for split in ("train", "val", "test") for r in read_split(dest, split, taxonomy)}
    assert records["g1_pathology_colon"].modality == "Pathology"
    assert records["b1_MRI-FLAIR_brain"].modality == "MRI-FLAIR-Brain"
    assert records["case0_CT_abdomen"].modality == "CT-Abdomen"
    assert [r.class_name for r in records["empty_CT_abdomen"].regions] == ["liver"]  # only the empty region went
    assert all(r.image_path.is_file() and all(m.mask_path.is_file() for m in r.regions) for r in records.values())
    for dropped in ("many_CT_abdomen", "nomask_CT_abdomen", "trunc_CT_abdomen", "small_CT_abdomen", "x1_Xylography_hand"):
        assert dropped not in records
    report = _report(dest)
    found = {(Path(p["file"]).name, p["kind"], p["action"]) for p in report["problems"]}
    assert ("nomask_CT_abdomen_kidney.png", "missing file", "image dropped") in found
    assert ("trunc_CT_abdomen.png", "unreadable file", "image dropped") in found
    assert ("empty_CT_abdomen_kidney.png", "empty mask", "region dropped") in found
    assert ("small_CT_abdomen_liver.png", "size mismatch", "image dropped") in found
    assert ("x1_Xylography_hand.png", "unknown modality", "image dropped") in found
    (skip,) = report["skipped_files"]
    assert Path(skip["file"]).name == "many_CT_abdomen.png" and "20 masks" in skip["reason"]
    assert all(p["reason"] for p in report["problems"])
    problems = (dest / "reports" / "biomedparse.problems.jsonl").read_text().splitlines()
    assert len(problems) == len(report["problems"]) + len(report["skipped_files"])
    assert report["seen"] == 17 and report["bad"] == 4 and report["skipped"] == 1 and summary.bad == 4
    assert summary.images["test"] == 1 and summary.images["val"] >= 2  # one per sub-dataset at least
    assert "CT-Abdomen" in summary.table() and "liver tumor" in summary.table()


def test_val_split_is_deterministic_disjoint_and_seeded(release: Path, tmp_path: Path) -> None:
    _prepare(release, tmp_path / "a")
    _prepare(release, tmp_path / "b")
    _prepare(release, tmp_path / "c", seed=7)
    read = lambda root, split: (root / "biomedparse" / f"{split}.jsonl").read_text()  # noqa: E731
    assert read(tmp_path / "a", "val") == read(tmp_path / "b", "val")
    train = {json.loads(line)["id"] for line in read(tmp_path / "a", "train").splitlines()}
    val = {json.loads(line)["id"] for line in read(tmp_path / "a", "val").splitlines()}
    assert val and not train & val
    seeds = [{json.loads(line)["id"] for line in read(tmp_path / r, "val").splitlines()} for r in ("a", "c")]
    assert seeds[0] != seeds[1] or len(val) == len(train | val) - len(train)


def test_over_the_limit_stops_and_leaves_only_the_report(release: Path, tmp_path: Path) -> None:
    dest = tmp_path / "prepared"
    _prepare(release, dest)
    before = (dest / "biomedparse" / "train.jsonl").read_text()
    with pytest.raises(PrepareError, match=r"4 of 17 entries are bad .*max_bad_fraction"):
        _prepare(release, dest, max_bad_fraction=0.1, seed=3)
    assert (dest / "biomedparse" / "train.jsonl").read_text() == before, "a failed run damaged the old index"
    assert _report(dest)["status"] == "failed"
    fresh = tmp_path / "fresh"
    with pytest.raises(PrepareError):
        _prepare(release, fresh, max_bad_fraction=0.1)
    assert not (fresh / "biomedparse").exists() and not (fresh / "taxonomy.json").exists()
    assert not list((fresh / "reports").glob("*.tmp"))


def test_a_taxonomy_file_fixes_the_classes(release: Path, tmp_path: Path) -> None:
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({"modalities": ["CT", "MRI", "Pathology"], "region_classes": ["liver", "liver tumor", "kidney"],
                                 "lesion_classes": ["liver tumor"], "aliases": {"MRI-FLAIR": "MRI"}}))
    dest = tmp_path / "prepared"
    _prepare(release, dest, taxonomy=str(fixed), subsets=("amos22/CT",))
    assert resolve_taxonomy(dest).region_classes == ("liver", "liver tumor", "kidney")
    kinds = {(Path(p["file"]).name, p["kind"]) for p in _report(dest)["problems"]}
    assert ("empty_CT_abdomen_kidney.png", "empty mask") in kinds
    assert _report(dest)["subsets"] == ["amos22/CT"]


def test_stage_reader_skips_images_over_the_stage_limit(release: Path, tmp_path: Path) -> None:
    dest = tmp_path / "prepared"
    _prepare(release, dest, max_masks_per_image=30)
    taxonomy = resolve_taxonomy(dest)
    records = read_split(dest, "train", taxonomy) + read_split(dest, "val", taxonomy)
    assert any(len(r.regions) == 20 for r in records)
    with pytest.warns(UserWarning, match="more than 16 masks"):
        dataset = SegmentationDataset(records, image_size=SIZE, max_masks=16)
    assert all(len(r.regions) <= 16 for r in dataset.records) and len(dataset) == len(records) - 1


def test_cli_prints_counts_and_uses_exit_codes(release: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    dest = tmp_path / "prepared"
    ok = runner.invoke(data_app, ["prepare", "biomedparse", str(release), str(dest), "--workers", "1",
                                  "--max-bad-fraction", "0.5", "--quiet", "--taxonomy", "biomedparse-9"])
    assert ok.exit_code == 0, ok.output
    assert "Pathology" in ok.output and "colon gland" in ok.output and "medsight data check" in ok.output
    assert resolve_taxonomy(dest).modalities[:2] == ("CT", "MRI")
    over = runner.invoke(data_app, ["prepare", "biomedparse", str(release), str(tmp_path / "x"), "--workers", "1", "--quiet"])
    assert over.exit_code == 1 and "entries are bad" in over.output and "Traceback" not in over.output
    missing = runner.invoke(data_app, ["prepare", "biomedparse", str(tmp_path / "nowhere"), str(tmp_path / "y")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    unknown = runner.invoke(data_app, ["prepare", "biomedparse", str(release), str(tmp_path / "z"), "--taxonomy", "nope"])
    assert unknown.exit_code == 2 and "shipped" in unknown.output


def test_worker_processes_give_the_same_index(release: Path, tmp_path: Path) -> None:
    _prepare(release, tmp_path / "one")
    _prepare(release, tmp_path / "two", workers=2)
    for split in ("train", "val", "test"):
        assert (tmp_path / "one" / "biomedparse" / f"{split}.jsonl").read_text() == \
            (tmp_path / "two" / "biomedparse" / f"{split}.jsonl").read_text()


def test_synthetic_taxonomy_reads_lower_case_and_fine_spellings() -> None:
    taxonomy = Taxonomy.synthetic()
    assert taxonomy.find_modality("ultrasound") == "Ultrasound"
    assert taxonomy.find_modality("MRI-FLAIR") == "MRI"
    assert taxonomy.find_modality("Computed Tomography") is None


def test_header_level_checks_names_and_sizes_without_decoding(release: Path, tmp_path: Path) -> None:
    dest = tmp_path / "quick"
    _prepare(release, dest, verify="header")
    kinds = {(Path(p["file"]).name, p["kind"]) for p in _report(dest)["problems"]}
    assert ("nomask_CT_abdomen_kidney.png", "missing file") in kinds
    assert ("small_CT_abdomen_liver.png", "size mismatch") in kinds
    # Truncation and empty masks need the full decode (the default): documented, not hidden.
    assert not any(name == "trunc_CT_abdomen.png" for name, _ in kinds)
