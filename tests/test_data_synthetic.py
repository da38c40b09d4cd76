"""The synthetic world: determinism, balance, mask geometry, distinct looks, atomic writes."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

from medsight.config.schema import DataConfig
from medsight.data import synthetic
from medsight.data.synthetic import generate_dataset, split_plan
from medsight.data.synthetic_images import render_scene
from medsight.data.synthetic_text import LESION_KIND_QUESTION, LESION_PRESENCE_QUESTION, describe_scene
from medsight.data.synthetic_world import SYNTHETIC_MODALITIES
from medsight.data.taxonomy import Taxonomy

SMALL = DataConfig(image_size=64, train_images=120, val_images=24, test_images=24, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_dataset(root, SMALL)
    return root


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _scenes(modality_name: str, count: int, seed: int = 0, size: int = 64, lesion: bool = True):
    spec = next(m for m in SYNTHETIC_MODALITIES if m.name == modality_name)
    rng = np.random.default_rng(seed)
    return [render_scene(spec, size, rng, lesion) for _ in range(count)]


def _lesion_per_image(root: Path, split: str) -> dict[str, set[str]]:
    """Image file name -> region classes annotated for it, read from the release's COCO files."""
    classes: dict[str, set[str]] = {}
    for path in (root / "raw" / "biomedparse").rglob(f"{split}.json"):
        coco = json.loads(path.read_text())
        names = {c["id"]: c["name"] for c in coco["categories"]}
        classes.update({image["file_name"]: set() for image in coco["images"]})
        for annotation in coco["annotations"]:
            classes[annotation["file_name"]].add(names[annotation["category_id"]])
    return classes


def test_generation_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    config = DataConfig(image_size=64, train_images=12, val_images=6, test_images=6, seed=7)
    generate_dataset(tmp_path / "a", config)
    generate_dataset(tmp_path / "b", config)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    other = DataConfig(image_size=64, train_images=12, val_images=6, test_images=6, seed=8)
    generate_dataset(tmp_path / "c", other)
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")


def _released_images(root: Path, split: str) -> list[Path]:
    return sorted((root / "raw" / "biomedparse").glob(f"**/{split}/*.png"))


def test_splits_are_disjoint(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    seeds = [tuple(s) for s in manifest["release"]["train"]["seed"]] + [tuple(s) for s in manifest["release"]["test"]["seed"]]
    assert len(set(seeds)) == 3  # train, val and test streams
    names = {split: {p.name for p in _released_images(dataset, split)} for split in ("train", "test")}
    assert not names["train"] & names["test"]
    digests = {split: {hashlib.sha256(p.read_bytes()).hexdigest() for p in _released_images(dataset, split)}
               for split in ("train", "test")}
    assert not digests["train"] & digests["test"]
    prepared = {split: {json.loads(line)["id"] for line in (dataset / "biomedparse" / f"{split}.jsonl").read_text().splitlines()}
                for split in ("train", "val", "test")}
    assert not prepared["train"] & prepared["val"] and not prepared["val"] & prepared["test"]


def test_layout_and_manifest(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["release"]["train"]["images"] == SMALL.train_images + SMALL.val_images
    assert manifest["config_sha256"] == synthetic.config_sha256(SMALL)
    raw = dataset / "raw" / "biomedparse"
    subsets = sorted(p.parent.relative_to(raw).as_posix() for p in raw.rglob("train.json"))
    assert subsets == sorted(spec.subset for spec in SYNTHETIC_MODALITIES)  # one folder per sub-dataset
    for subset in subsets:
        for folder in ("train", "train_mask", "test", "test_mask"):
            assert (raw / subset / folder).is_dir()
        assert (raw / subset / "test.json").is_file() and not (raw / subset / "val.json").exists()
    assert any("+" in p.name for p in raw.rglob("train_mask/*lung.png"))
    coco = json.loads(next(raw.rglob("train.json")).read_text())
    annotation = coco["annotations"][0]
    assert {"id", "image_id", "file_name", "mask_file", "category_id", "bbox", "sentences"} <= set(annotation)
    assert annotation["sentences"][0]["sent"]
    for split in ("train", "val", "test"):
        assert (dataset / "biomedparse" / f"{split}.jsonl").stat().st_size > 0
    assert sum(manifest["prepared"]["biomedparse"][s] for s in ("train", "val")) == SMALL.train_images + SMALL.val_images
    vqa = json.loads((dataset / "vqa" / "test.json").read_text())
    assert {entry["answer_type"] for entry in vqa} == {"CLOSED", "OPEN"}
    assert vqa[0]["conversations"][0]["value"].startswith("<image>\n")
    alignment = json.loads((dataset / "raw" / "pubmedvision" / "PubMedVision_Alignment_VQA.json").read_text())
    assert all(isinstance(row["image"], list) and row["modality"] and row["body_part"] for row in alignment)
    assert any(len(row["image"]) == 2 for row in alignment)
    for name in ("alignment_train", "alignment_val", "instruct_train", "instruct_val"):
        assert (dataset / "pubmedvision" / f"{name}.jsonl").stat().st_size > 0
    report = json.loads((dataset / "reports" / "pubmedvision.json").read_text())
    assert report["problems_by_kind"] == {"missing image": 2}  # one per file, as planted
    assert len((dataset / "corpus.txt").read_text().splitlines()) > SMALL.train_images


def test_lesion_presence_is_balanced_per_modality() -> None:
    plan = split_plan(600, np.random.default_rng(0))
    per_modality = Counter(m for m, _ in plan)
    with_lesion = Counter(m for m, lesion in plan if lesion)
    for modality, count in per_modality.items():
        assert count == 100
        assert abs(with_lesion[modality] - count / 2) <= 1


def test_masks_non_empty_and_lesion_inside_its_structure() -> None:
    min_area = 50
    for spec in SYNTHETIC_MODALITIES:
        hosts, kinds = Counter(), Counter()
        for scene in _scenes(spec.name, 30, seed=1):
            assert [r.name for r in scene.regions[:-1]] == list(spec.structures)
            assert all(region.mask.sum() > 0 for region in scene.regions)
            assert scene.lesion is not None and scene.lesion_mask is not None
            host = next(r for r in scene.regions if r.name == scene.lesion.structure)
            assert not np.any(scene.lesion_mask & ~host.mask), "lesion leaks out of its structure"
            assert scene.lesion_mask.sum() >= min_area
            hosts[scene.lesion.structure] += 1
            kinds[scene.lesion.kind] += 1
        assert set(hosts) == set(spec.structures), f"{spec.name}: host structure never varies"
        assert set(kinds) == set(spec.lesions), f"{spec.name}: some lesion kind never drawn"


def test_lesion_free_scene_has_no_lesion_region() -> None:
    for scene in _scenes("CT", 5, lesion=False):
        assert scene.lesion is None and scene.lesion_mask is None
        assert not any(region.is_lesion for region in scene.regions)


def test_lesions_scale_with_image_size() -> None:
    small = np.mean([s.lesion_mask.sum() for s in _scenes("MRI", 20, seed=2, size=64)])
    large = np.mean([s.lesion_mask.sum() for s in _scenes("MRI", 20, seed=2, size=128)])
    assert 3.0 < large / small < 5.0


def _look_features(pixels: np.ndarray) -> np.ndarray:
    rgb = pixels.astype(np.float32) / 255.0
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    gray = rgb.mean(axis=2)
    roughness = np.abs(np.diff(gray, axis=0)).mean() + np.abs(np.diff(gray, axis=1)).mean()
    return np.array([*rgb.mean(axis=(0, 1)), gray.std(), (gray < 0.05).mean(), 3 * roughness,
                     np.abs(rgb[:, :, 0] - rgb[:, :, 2]).mean()])


def test_modalities_look_distinct() -> None:
    """A nearest-centroid classifier on six global statistics tells the modalities apart."""
    train, held_out = {}, []
    for index, spec in enumerate(SYNTHETIC_MODALITIES):
        scenes = _scenes(spec.name, 20, seed=4, lesion=False) + _scenes(spec.name, 20, seed=5)
        features = np.stack([_look_features(scene.pixels) for scene in scenes])
        train[index] = features[::2].mean(axis=0)
        held_out += [(index, f) for f in features[1::2]]
    centroids = np.stack([train[i] for i in range(len(SYNTHETIC_MODALITIES))])
    correct = [int(np.argmin(((centroids - f) ** 2).sum(axis=1)) == i) for i, f in held_out]
    assert np.mean(correct) >= 0.95
    for spec in SYNTHETIC_MODALITIES:
        pixels = _scenes(spec.name, 1)[0].pixels
        assert (pixels.ndim == 3) == spec.color


def test_lesion_kinds_look_distinct() -> None:
    """CT cysts are dark inside, CT tumors bright: the kind is visible in the pixels."""
    means: dict[str, list[float]] = {"tumor": [], "cyst": []}
    for scene in _scenes("CT", 40, seed=6):
        interior = binary_erosion(scene.lesion_mask, iterations=2)  # skip the cyst wall
        means[scene.lesion.kind].append(float(scene.pixels[interior].mean()) / 255.0)
    assert max(means["cyst"]) < 0.35 < 0.6 < min(means["tumor"])


def test_yes_no_answers_follow_the_masks(dataset: Path) -> None:
    classes = _lesion_per_image(dataset, "train")
    entries = json.loads((dataset / "raw" / "pubmedvision" / "PubMedVision_InstructionTuning_VQA.json").read_text())
    entries = [e for e in entries if Path(e["image"][0]).name in classes]  # not the planted missing one
    presence = [e for e in entries
                if e["conversations"][0]["value"].endswith(LESION_PRESENCE_QUESTION)]
    assert len(presence) == SMALL.train_images + SMALL.val_images
    for entry in presence:
        has_lesion_mask = bool(classes[Path(entry["image"][0]).name] & Taxonomy.synthetic().lesion_classes)
        assert entry["conversations"][1]["value"] == ("yes" if has_lesion_mask else "no")
    answers = Counter(e["conversations"][1]["value"] for e in presence)
    assert abs(answers["yes"] - answers["no"]) <= len(SYNTHETIC_MODALITIES)  # balanced within each stream
    kinds = [e for e in entries if e["conversations"][0]["value"].endswith(LESION_KIND_QUESTION)]
    assert kinds
    for entry in kinds:
        assert entry["conversations"][1]["value"] in classes[Path(entry["image"][0]).name]


def test_kind_in_structure_questions_are_balanced_with_hard_negatives() -> None:
    rng = np.random.default_rng(0)
    answers, negatives_on_lesion_images = Counter(), 0
    for spec in SYNTHETIC_MODALITIES:
        for index in range(80):
            scene = render_scene(spec, 64, rng, with_lesion=index % 2 == 0)
            for item in describe_scene(scene, rng).vqa:
                if item.question_kind != "lesion_in_structure":
                    continue
                answers[item.answer] += 1
                negatives_on_lesion_images += scene.lesion is not None and item.answer == "no"
                if item.answer == "yes":
                    assert scene.lesion is not None
                    assert item.question.endswith(
                        f" {scene.lesion.kind} in the {scene.lesion.structure}?")
    share_yes = answers["yes"] / (answers["yes"] + answers["no"])
    assert 0.42 < share_yes < 0.58
    assert negatives_on_lesion_images > 0.1 * answers["no"]


def test_failure_midway_leaves_nothing_half_written(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_render = synthetic.render_scene

    def failing_render(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("renderer crashed")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_scene", failing_render)
    config = DataConfig(image_size=64, train_images=8, val_images=2, test_images=2, seed=0)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        generate_dataset(tmp_path / "data", config)
    assert not (tmp_path / "data").exists()
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(synthetic, "render_scene", real_render)
    generate_dataset(tmp_path / "data", config)
    before = _tree_digest(tmp_path / "data")
    calls["n"] = 0
    monkeypatch.setattr(synthetic, "render_scene", failing_render)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path / "data", config)
    assert _tree_digest(tmp_path / "data") == before, "a failed rerun damaged the old dataset"
