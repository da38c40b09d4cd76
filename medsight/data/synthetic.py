"""Write the synthetic world to disk in the real formats (BiomedParse, LLaVA, LLaVA-Med VQA).

Because the synthetic set is stored exactly as the real datasets are, every tiny run goes
through the same readers the full-scale runs use. The whole tree is built under a temp name
and swapped in at the end, so a crash never leaves a half-written dataset behind.

Layout under ``out_dir``::

    biomedparse/{train,val,test}/NNNNN_MODALITY_SITE.png
    biomedparse/{train,val,test}_mask/NNNNN_MODALITY_SITE_TARGET.png   (spaces in TARGET -> +)
    biomedparse/{train,val,test}.json                                   (COCO-like)
    llava/alignment_train.json          captions as LLaVA conversations
    llava/instruct_{train,val,test}.json  one VQA question per entry
    vqa/test.json                       LLaVA-Med VQA-RAD/SLAKE test style
    corpus.txt                          training-split text, for the tokenizer
    taxonomy.json                       the label space (modalities, region and lesion classes)
    manifest.json                       counts, seeds, config hash
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsight.config.schema import DataConfig
from medsight.data.synthetic_images import SyntheticScene, render_scene
from medsight.data.synthetic_text import ALIGNMENT_PROMPTS, SceneText, describe_scene
from medsight.data.synthetic_world import SYNTHETIC_MODALITIES
from medsight.data.taxonomy import TAXONOMY_FILE, Taxonomy
from medsight.io_utils import atomic_directory

SPLITS: tuple[str, ...] = ("train", "val", "test")
FORMAT_VERSION = 1


def split_seed(seed: int, split: str) -> tuple[int, int]:
    """Seed words of a split; a SeedSequence of distinct words gives independent streams."""
    return (seed, SPLITS.index(split) + 1)


def split_plan(count: int, rng: np.random.Generator) -> list[tuple[int, bool]]:
    """(modality index, has lesion) per image: modalities round-robin, and within every
    modality half the images carry a lesion, so presence is balanced per modality too."""
    modalities = rng.permutation(np.arange(count) % len(SYNTHETIC_MODALITIES))
    lesion = np.zeros(count, dtype=bool)
    for modality in range(len(SYNTHETIC_MODALITIES)):
        members = np.flatnonzero(modalities == modality)
        flags = (np.arange(len(members)) + int(rng.integers(2))) % 2 == 0
        lesion[members] = rng.permutation(flags)
    return [(int(m), bool(flag)) for m, flag in zip(modalities, lesion)]


def mask_file_name(image_stem: str, target: str) -> str:
    return f"{image_stem}_{target.replace(' ', '+')}.png"


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] of a [H,W] bool mask (COCO convention)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


# The DataConfig fields the generator uses (synth-data's config view in the registry). Others,
# such as data.taxonomy (where readers find a label space; the generator always writes the
# synthetic one) or data.too_many_masks (a reader policy), leave existing datasets' hash alone.
GENERATION_FIELDS = ("source", "image_size", "train_images", "val_images", "test_images", "seed")


def config_sha256(config: DataConfig) -> str:
    fields = {k: getattr(config, k) for k in GENERATION_FIELDS}
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


@dataclass
class _SplitWriter:
    """Accumulates one split's JSON records while its PNGs are written."""

    root: Path  # dataset root (the temp dir while building)
    split: str
    taxonomy: Taxonomy
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    alignment: list[dict[str, Any]] = field(default_factory=list)
    instruct: list[dict[str, Any]] = field(default_factory=list)
    vqa: list[dict[str, Any]] = field(default_factory=list)
    corpus: list[str] = field(default_factory=list)
    per_modality: Counter = field(default_factory=Counter)
    with_lesion: int = 0

    def add(self, index: int, scene: SyntheticScene, text: SceneText, prompt: str) -> None:
        spec = scene.modality
        stem = f"{index:05d}_{spec.name}_{spec.site}"
        image_rel = f"biomedparse/{self.split}/{stem}.png"
        Image.fromarray(scene.pixels).save(self.root / image_rel, compress_level=1)
        height, width = scene.pixels.shape[:2]
        self.images.append({"id": index, "file_name": f"{stem}.png", "width": width,
                            "height": height})
        for region, sentences in zip(scene.regions, text.region_sentences):
            mask_name = mask_file_name(stem, region.name)
            mask_path = self.root / "biomedparse" / f"{self.split}_mask" / mask_name
            Image.fromarray(region.mask.astype(np.uint8) * 255).save(mask_path, compress_level=1)
            self.annotations.append({
                "id": len(self.annotations),
                "image_id": index,
                "file_name": f"{stem}.png",
                "mask_file": mask_name,
                "category_id": self.taxonomy.class_index(region.name) + 1,
                "bbox": bbox_xywh(region.mask),
                "area": int(region.mask.sum()),
                "iscrowd": 0,
                "sentences": [{"sent": sentence} for sentence in sentences],
            })
            self.corpus.extend(sentences)
        self.alignment.append({"id": stem, "image": image_rel, "modality": spec.name,
                               "conversations": _conversation(prompt, text.caption)})
        self.corpus.extend([prompt, text.caption])
        for number, item in enumerate(text.vqa):
            entry = {"id": f"{stem}_q{number}", "image": image_rel,
                     "conversations": _conversation(item.question, item.answer)}
            self.instruct.append({**entry, "answer_type": item.answer_type,
                                  "modality": spec.name, "question_kind": item.question_kind})
            self.vqa.append({**entry, "answer_type": item.answer_type.upper(),
                             "modality": spec.name})
            self.corpus.extend([item.question, item.answer])
        self.per_modality[spec.name] += 1
        self.with_lesion += scene.lesion_mask is not None

    def coco(self) -> dict[str, Any]:
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.taxonomy.region_classes)]
        return {"images": self.images, "annotations": self.annotations, "categories": categories}

    def summary(self, seed_words: tuple[int, int]) -> dict[str, Any]:
        return {
            "seed": list(seed_words),
            "images": len(self.images),
            "with_lesion": self.with_lesion,
            "annotations": len(self.annotations),
            "vqa_questions": len(self.instruct),
            "per_modality": dict(sorted(self.per_modality.items())),
        }


def _dump(path: Path, data: Any, indent: int | None = None) -> None:
    # Plain write: the whole tree is already under a temp name until it is swapped in.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def _write_split(root: Path, split: str, first_index: int, count: int, config: DataConfig,
                 taxonomy: Taxonomy) -> _SplitWriter:
    for folder in (split, f"{split}_mask"):
        (root / "biomedparse" / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence(split_seed(config.seed, split)))
    writer = _SplitWriter(root, split, taxonomy)
    for offset, (modality_id, has_lesion) in enumerate(split_plan(count, rng)):
        modality = SYNTHETIC_MODALITIES[modality_id]
        scene = render_scene(modality, config.image_size, rng, has_lesion)
        text = describe_scene(scene, rng)
        prompt = ALIGNMENT_PROMPTS[int(rng.integers(len(ALIGNMENT_PROMPTS)))]
        writer.add(first_index + offset, scene, text, prompt)
    _dump(root / "biomedparse" / f"{split}.json", writer.coco())
    _dump(root / "llava" / f"instruct_{split}.json", writer.instruct)
    return writer


def generate_dataset(out_dir: Path, config: DataConfig) -> dict:
    """Render train/val/test from disjoint seeds and write them under ``out_dir`` atomically.

    Returns the manifest (also written to ``manifest.json``). An existing ``out_dir`` is
    replaced only once the new tree is complete.
    """
    counts = {"train": config.train_images, "val": config.val_images, "test": config.test_images}
    for split, count in counts.items():
        if count < 0:
            raise ValueError(f"data.{split}_images must be >= 0, got {count}")
    if config.image_size < 32:
        raise ValueError(f"data.image_size must be >= 32 to hold lesions, got {config.image_size}")
    out_dir = Path(out_dir)
    taxonomy = Taxonomy.synthetic()
    with atomic_directory(out_dir) as root:
        summaries: dict[str, Any] = {}
        first_index = 0
        for split in SPLITS:
            writer = _write_split(root, split, first_index, counts[split], config, taxonomy)
            summaries[split] = writer.summary(split_seed(config.seed, split))
            first_index += counts[split]
            if split == "train":
                _dump(root / "llava" / "alignment_train.json", writer.alignment)
                (root / "corpus.txt").write_text("\n".join(writer.corpus) + "\n")
            if split == "test":
                _dump(root / "vqa" / "test.json", writer.vqa)
        manifest = {
            "format_version": FORMAT_VERSION,
            "generator": "medsight.data.synthetic",
            "seed": config.seed,
            "image_size": config.image_size,
            "config_sha256": config_sha256(config),
            "modalities": list(taxonomy.modalities),
            "region_classes": list(taxonomy.region_classes),
            "splits": summaries,
        }
        taxonomy.save(root / TAXONOMY_FILE)
        _dump(root / "manifest.json", manifest, indent=2)
    return manifest
