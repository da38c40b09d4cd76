"""Readers of the real formats: round trip of the generator's output and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsight.config.schema import DataConfig
from medsight.data.biomedparse import (
    SegmentationDataset,
    collate_segmentation,
    read_biomedparse,
)
from medsight.data.image_io import DataError, load_image, load_mask
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


def _write_biomedparse(root: Path, stem: str = "case1_CT_abdomen",
                       targets: tuple[str, ...] = ("liver",), image_mode: str = "L",
                       mask_pixels: np.ndarray | None = None) -> Path:
    """A one-image BiomedParse tree; returns the image path."""
    (root / "train").mkdir(parents=True)
    (root / "train_mask").mkdir()
    image_path = root / "train" / f"{stem}.png"
    Image.new(image_mode, (32, 32), 0).save(image_path)
    annotations = []
    for index, target in enumerate(targets):
        mask_name = f"{stem}_{target.replace(' ', '+')}.png"
        pixels = _disc() if mask_pixels is None else mask_pixels
        Image.fromarray(pixels).save(root / "train_mask" / mask_name)
        annotations.append({"id": index, "image_id": 0, "file_name": f"{stem}.png",
                            "mask_file": mask_name, "category_id": 1, "bbox": [0, 0, 1, 1],
                            "sentences": [{"sent": f"{target} in abdomen CT"}]})
    coco = {"images": [{"id": 0, "file_name": f"{stem}.png", "width": 32, "height": 32}],
            "annotations": annotations, "categories": [{"id": 1, "name": "liver"}]}
    (root / "train.json").write_text(json.dumps(coco))
    return image_path


# --- BiomedParse round trip ---------------------------------------------------------------


def test_biomedparse_round_trip(dataset: Path) -> None:
    coco = json.loads((dataset / "biomedparse" / "train.json").read_text())
    records = read_biomedparse(dataset / "biomedparse", "train", SYNTHETIC)
    assert len(records) == len(coco["images"]) == 24
    assert sum(len(r.regions) for r in records) == len(coco["annotations"])
    for record in records:
        assert record.image_path.is_file()
        assert record.modality_id == SYNTHETIC.modality_index(record.modality)
        assert record.image_id == record.image_path.stem
        assert f"_{record.modality}_" in record.image_path.name
        for region in record.regions:
            assert SYNTHETIC.region_classes[region.class_id] == region.class_name
            assert region.sentence and region.bbox is not None


def test_segmentation_dataset_items_and_collate(dataset: Path) -> None:
    records = read_biomedparse(dataset / "biomedparse", "val", SYNTHETIC)
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
    record = read_biomedparse(dataset / "biomedparse", "test", SYNTHETIC)[0]
    item = SegmentationDataset([record], image_size=64)[0]
    for mask, region in zip(item["masks"], record.regions):
        on_disk = np.asarray(Image.open(region.mask_path)) > 0
        assert np.array_equal(mask.numpy() > 0.5, on_disk)


def test_too_many_masks_raises_or_skips(tmp_path: Path) -> None:
    _write_biomedparse(tmp_path, targets=("liver", "kidney", "tumor"))
    records = read_biomedparse(tmp_path, "train", SYNTHETIC)
    with pytest.raises(DataError, match="case1_CT_abdomen"):
        SegmentationDataset(records, image_size=16, max_masks=2)
    with pytest.warns(UserWarning, match="case1_CT_abdomen"):
        skipped = SegmentationDataset(records, image_size=16, max_masks=2, on_too_many="skip")
    assert len(skipped) == 0


# --- bad BiomedParse inputs ---------------------------------------------------------------


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    image_path = _write_biomedparse(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8)).save(image_path)
    image_path.write_bytes(image_path.read_bytes()[:-200])
    record = read_biomedparse(tmp_path, "train", SYNTHETIC)
    with pytest.raises(DataError, match=r"case1_CT_abdomen\.png.*truncated"):
        SegmentationDataset(record, image_size=16)[0]


def test_mask_size_mismatch_names_the_mask(tmp_path: Path) -> None:
    _write_biomedparse(tmp_path, mask_pixels=_disc(size=24))
    records = read_biomedparse(tmp_path, "train", SYNTHETIC)
    with pytest.raises(DataError, match=r"case1_CT_abdomen_liver\.png.*24x24"):
        SegmentationDataset(records, image_size=16)[0]


def test_empty_mask_names_the_mask(tmp_path: Path) -> None:
    _write_biomedparse(tmp_path, mask_pixels=np.zeros((32, 32), np.uint8))
    records = read_biomedparse(tmp_path, "train", SYNTHETIC)
    with pytest.raises(DataError, match=r"case1_CT_abdomen_liver\.png.*empty"):
        SegmentationDataset(records, image_size=16)[0]


def test_unknown_modality_names_the_file(tmp_path: Path) -> None:
    _write_biomedparse(tmp_path, stem="eye7_Fundus_retina")
    with pytest.raises(DataError, match=r"eye7_Fundus_retina\.png.*Fundus"):
        read_biomedparse(tmp_path, "train", SYNTHETIC)


def test_unknown_class_names_the_mask(tmp_path: Path) -> None:
    _write_biomedparse(tmp_path, targets=("spleen",))
    with pytest.raises(DataError, match=r"case1_CT_abdomen_spleen\.png.*spleen"):
        read_biomedparse(tmp_path, "train", SYNTHETIC)


def test_class_with_space_is_read_from_plus_in_mask_name(tmp_path: Path) -> None:
    _write_biomedparse(tmp_path, stem="c_X-Ray_chest", targets=("left lung",))
    (region,) = read_biomedparse(tmp_path, "train", SYNTHETIC)[0].regions
    assert region.mask_path.name == "c_X-Ray_chest_left+lung.png"
    assert region.class_name == "left lung" and region.class_id == SYNTHETIC.class_index("left lung")


@pytest.mark.parametrize("folder", ["train", "train_mask"])
def test_missing_referenced_file_names_json_and_path(tmp_path: Path, folder: str) -> None:
    _write_biomedparse(tmp_path)
    victim = next((tmp_path / folder).iterdir())
    victim.unlink()
    with pytest.raises(DataError, match=rf"train\.json.*{victim.name}"):
        read_biomedparse(tmp_path, "train", SYNTHETIC)


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
    instruct = read_conversations(dataset / "llava" / "instruct_train.json", dataset)
    assert instruct and all(c.image_paths[0].is_file() for c in instruct)
    first = instruct[0]
    assert first.turns[0][0] == "human" and first.turns[0][1].startswith("<image>\n")
    assert first.answer_type in ("closed", "open") and first.modality is not None
    assert "question_kind" in first.extra
    vqa = read_conversations(dataset / "vqa" / "test.json", dataset)
    assert {c.answer_type for c in vqa} == {"CLOSED", "OPEN"}
    alignment = read_conversations(dataset / "llava" / "alignment_train.json", dataset)
    assert len(alignment) == 24


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
