"""Readers: the prepared index round trip of the generator's output, load-time checks of image
files, and LLaVA conversation files (JSON and JSON lines, multi-image rows)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config.schema import DataConfig
from medsight.data.biomedparse import (
    RegionRecord,
    SegmentationDataset,
    SegmentationRecord,
    collate_segmentation,
    read_split,
    target_from_mask_name,
)
from medsight.data.image_io import DataError, load_image, load_images, load_mask
from medsight.data.llava import Conversation, read_conversations, write_conversations
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import Taxonomy

SYNTHETIC = Taxonomy.synthetic()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readers") / "data"
    generate_dataset(root, DataConfig(image_size=64, train_images=24, val_images=6,
                                      test_images=6, seed=11))
    return root


def _disc(size: int = 32, radius: float = 6.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2).astype(np.uint8) * 255


def _records(root: Path, stem: str = "case1_CT_abdomen", targets: tuple[str, ...] = ("liver",),
             mask_pixels: np.ndarray | None = None) -> list[SegmentationRecord]:
    """One image with its masks on disk, as records (the load-time checks, without an index)."""
    root.mkdir(parents=True, exist_ok=True)
    image_path = root / f"{stem}.png"
    Image.new("L", (32, 32), 0).save(image_path)
    regions = []
    for target in targets:
        mask_path = root / f"{stem}_{target.replace(' ', '+')}.png"
        Image.fromarray(_disc() if mask_pixels is None else mask_pixels).save(mask_path)
        regions.append(RegionRecord(mask_path, target, SYNTHETIC.class_index(target), "", None))
    return [SegmentationRecord(image_path, stem, "CT", 0, regions)]


# --- BiomedParse round trip ---------------------------------------------------------------


def _release_coco(dataset: Path, split: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((dataset / "raw" / "biomedparse").rglob(f"{split}.json"))]


def test_biomedparse_round_trip(dataset: Path) -> None:
    released = _release_coco(dataset, "train")
    records = read_split(dataset, "train", SYNTHETIC) + read_split(dataset, "val", SYNTHETIC)
    assert len(records) == sum(len(c["images"]) for c in released) == 30  # val carved out of train
    assert sum(len(r.regions) for r in records) == sum(len(c["annotations"]) for c in released)
    spellings = set()
    for record in records:
        assert record.image_path.is_file()
        assert record.modality_id == SYNTHETIC.modality_index(record.modality)
        assert record.image_id == record.image_path.stem
        spellings.add(record.image_path.stem.split("_")[1])
        for region in record.regions:
            assert region.mask_path.is_file()
            assert SYNTHETIC.region_classes[region.class_id] == region.class_name
            assert region.sentence and region.bbox is not None
    assert {"MRI-FLAIR", "ultrasound", "pathology"} <= spellings  # the release's own spellings
    assert len(read_split(dataset, "test", SYNTHETIC)) == 6


def test_segmentation_dataset_items_and_collate(dataset: Path) -> None:
    records = read_split(dataset, "val", SYNTHETIC)
    data = SegmentationDataset(records, image_size=32)
    item = data[0]
    regions = records[0].regions
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["masks"].shape == (len(regions), 32, 32)
    assert set(item["masks"].unique().tolist()) <= {0.0, 1.0}
    assert (item["masks"].sum(dim=(1, 2)) > 0).all()
    assert item["labels"].tolist() == [r.class_id for r in regions]
    assert item["modality"].ndim == 0 and int(item["modality"]) == records[0].modality_id
    batch = collate_segmentation([data[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 32, 32) and batch["modality"].shape == (3,)
    assert len(batch["masks"]) == len(batch["labels"]) == len(batch["image_ids"]) == 3


def test_full_size_masks_match_the_files(dataset: Path) -> None:
    record = read_split(dataset, "test", SYNTHETIC)[0]
    item = SegmentationDataset([record], image_size=64)[0]
    for mask, region in zip(item["masks"], record.regions):
        on_disk = np.asarray(Image.open(region.mask_path)) > 0
        assert np.array_equal(mask.numpy() > 0.5, on_disk)


def test_too_many_masks_skip_or_raise(tmp_path: Path) -> None:
    records = _records(tmp_path, targets=("liver", "kidney", "tumor"))
    with pytest.warns(UserWarning, match="case1_CT_abdomen"):
        skipped = SegmentationDataset(records, image_size=16, max_masks=2)  # the authors' rule
    assert len(skipped) == 0
    with pytest.raises(DataError, match="case1_CT_abdomen"):
        SegmentationDataset(records, image_size=16, max_masks=2, on_too_many="error")


# --- files that went bad after prepare (checked again at load time) ---------------------------


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    records = _records(tmp_path)
    image_path = records[0].image_path
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8)).save(image_path)
    image_path.write_bytes(image_path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"case1_CT_abdomen\.png.*truncated"):
        SegmentationDataset(records, image_size=16)[0]


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    records = _records(tmp_path, mask_pixels=_disc(size=24))
    with pytest.raises(DataError, match=r"case1_CT_abdomen_liver\.png.*24x24"):
        SegmentationDataset(records, image_size=16)[0]


def test_empty_mask_names_the_mask(tmp_path: Path) -> None:
    records = _records(tmp_path, mask_pixels=np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match=r"case1_CT_abdomen_liver\.png.*empty"):
        SegmentationDataset(records, image_size=16)[0]


def test_class_with_space_is_read_from_plus_in_mask_name() -> None:
    assert target_from_mask_name("c_X-Ray_chest_left+lung.png", "c_X-Ray_chest.png") == "left lung"
    assert target_from_mask_name("other.png", "c_X-Ray_chest.png") is None


def test_unprepared_dataset_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\.jsonl: prepared index does not exist.*medsight data prepare biomedparse"):
        read_split(tmp_path, "train", SYNTHETIC)


# --- image_io --------------------------------------------------------------------------------


def test_grayscale_is_replicated_and_resized(tmp_path: Path) -> None:
    path = tmp_path / "g.png"
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(path)
    image = load_image(path)
    assert image.shape == (3, 20, 30)
    assert torch.equal(image[0], image[2]) and abs(float(image.mean()) - 128 / 255) < 1e-6
    assert load_image(path, size=8).shape == (3, 8, 8)


def test_sixteen_bit_png_is_scaled_to_unit_range(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    assert float(load_image(path).max()) == pytest.approx(1.0)


def test_wrong_channel_count_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "rgba_1.png"
    Image.new("RGBA", (8, 8)).save(path)
    with pytest.raises(DataError, match=r"rgba_1\.png.*4 channel"):
        load_image(path)


def test_missing_image_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing\.png.*does not exist"):
        load_image(tmp_path / "nothing.png")


def test_masks_zero_one_and_tiny_regions_survive_downscaling(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    pixels = np.zeros((64, 64), np.uint8)
    pixels[10, 13] = 1  # a single 0/1 pixel that nearest sampling at 8x8 would miss
    Image.fromarray(pixels).save(path)
    assert load_mask(path).sum() == 1
    assert load_mask(path, size=8).sum() == 1


# --- LLaVA conversations --------------------------------------------------------------------


def test_generator_conversation_files_read_back(dataset: Path) -> None:
    instruct = read_conversations(dataset / "pubmedvision" / "instruct_train.jsonl", dataset)
    assert instruct and all(path.is_file() for c in instruct for path in c.image_paths)
    first = instruct[0]
    assert first.turns[0][0] == "human" and first.turns[0][1].startswith("<image>\n")
    assert first.modality in ("Computed Tomography", "Magnetic Resonance Imaging", "X-Ray", "Ultrasound",
                              "Digital Photography", "Microscopy Images")  # free text, kept as metadata
    assert "body_part" in first.extra
    vqa = read_conversations(dataset / "vqa" / "test.json", dataset)
    assert {c.answer_type for c in vqa} == {"CLOSED", "OPEN"}
    alignment = read_conversations(dataset / "pubmedvision" / "alignment_train.jsonl", dataset)
    alignment += read_conversations(dataset / "pubmedvision" / "alignment_val.jsonl", dataset)
    assert len([c for c in alignment if len(c.image_paths) == 1]) == 30
    (pair,) = [c for c in alignment if len(c.image_paths) == 2]  # a multi-image row keeps both images
    assert pair.turns[0][1].startswith("<image>\n<image>\n")
    assert load_images(pair.image_paths, 16).shape == (3, 16, 16)


def test_conversations_round_trip(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "m1.png", "m2.png"):
        Image.new("L", (4, 4), 255).save(tmp_path / name)
    original = [
        Conversation("x1", [tmp_path / "a.png"], [("human", "<image>\nq"), ("gpt", "a")],
                     answer_type="open", modality="CT", extra={"source": "test"}),
        Conversation("x2", [tmp_path / "a.png", tmp_path / "b.png"],
                     [("human", "q1"), ("gpt", "[C0_1]"), ("human", "q2"), ("gpt", "no")],
                     mask_paths=[tmp_path / "m2.png", tmp_path / "m1.png"]),
    ]
    path = tmp_path / "out" / "conv.json"
    write_conversations(path, original, image_root=tmp_path)
    raw = json.loads(path.read_text())
    assert raw[0]["image"] == "a.png" and raw[1]["image"] == ["a.png", "b.png"]
    assert read_conversations(path, tmp_path) == original
    assert [p.name for p in path.parent.iterdir()] == ["conv.json"]


def _write_entries(tmp_path: Path, entries: list) -> Path:
    Image.new("L", (4, 4), 255).save(tmp_path / "img.png")
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(entries))
    return path


GOOD_TURNS = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": 1, "image": "img.png"}, r"conv\.json: entry 1: missing key 'conversations'"),
        ({"id": 1, "image": "img.png", "conversations": [{"from": "bot", "value": "x"}]},
         r"conv\.json: entry 1\.conversations\[0\]\.from"),
        ({"id": 1, "image": "nope.png", "conversations": GOOD_TURNS},
         r"conv\.json: entry 1\.image: .*nope\.png"),
        ({"id": 1, "image": "img.png", "mask_files": ["gone.png"], "conversations": GOOD_TURNS},
         r"conv\.json: entry 1\.mask_files: .*gone\.png"),
        ({"id": 1, "image": 5, "conversations": GOOD_TURNS}, r"entry 1\.image"),
    ],
)
def test_bad_conversation_entries_name_file_index_and_key(tmp_path: Path, entry: dict,
                                                          message: str) -> None:
    path = _write_entries(tmp_path, [{"id": 0, "image": "img.png", "conversations": GOOD_TURNS},
                                     entry])
    with pytest.raises(DataError, match=message):
        read_conversations(path, tmp_path)


def test_missing_files_can_be_skipped_with_a_warning(tmp_path: Path) -> None:
    path = _write_entries(tmp_path, [
        {"id": 0, "image": "img.png", "conversations": GOOD_TURNS},
        {"id": 1, "image": "img.png", "mask_files": ["gone.png"], "conversations": GOOD_TURNS},
    ])
    with pytest.warns(UserWarning, match="gone.png"):
        kept = read_conversations(path, tmp_path, on_missing="skip")
    assert [c.id for c in kept] == ["0"]
