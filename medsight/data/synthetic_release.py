"""The synthetic world written as the public releases are published.

``raw/biomedparse/<sub-dataset>/{train,test}/IMAGE_MODALITY_SITE.png``, ``{train,test}_mask/
IMAGE_MODALITY_SITE_TARGET.png`` and ``{train,test}.json`` (one folder per sub-dataset, no val
split, modality spelled per sub-dataset: ``ultrasound``, ``MRI-FLAIR``...), and
``raw/pubmedvision/PubMedVision_{Alignment,InstructionTuning}_VQA.json`` + ``images/`` with
free-text ``modality``/``body_part`` fields, some multi-image rows and a row whose image was never
shipped, as in the real release. ``medsight data prepare`` then indexes both like real data.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medsight.data.synthetic_images import SyntheticScene
from medsight.data.synthetic_text import SceneText
from medsight.data.synthetic_world import SYNTHETIC_MODALITIES, ModalitySpec

BIOMEDPARSE_DIR = "raw/biomedparse"
PUBMEDVISION_DIR = "raw/pubmedvision"
ALIGNMENT_FILE = "PubMedVision_Alignment_VQA.json"
INSTRUCT_FILE = "PubMedVision_InstructionTuning_VQA.json"
# PubMedVision's modality field is free text written by a captioning model, not a label.
FREE_TEXT_MODALITY = {
    "CT": "Computed Tomography", "MRI": "Magnetic Resonance Imaging", "X-Ray": "X-Ray",
    "Ultrasound": "Ultrasound", "Dermoscopy": "Digital Photography", "Pathology": "Microscopy Images",
}
MULTI_IMAGE_EVERY = 20  # one two-image alignment row per this many images


def mask_file_name(image_stem: str, target: str) -> str:
    return f"{image_stem}_{target.replace(' ', '+')}.png"


def bbox_xywh(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] of a [H,W] bool mask (COCO convention)."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def conversation(question: str, answer: str, images: int = 1) -> list[dict[str, str]]:
    return [{"from": "human", "value": "<image>\n" * images + question}, {"from": "gpt", "value": answer}]


def _link(source: Path, target: Path) -> None:
    """PubMedVision ships its own image files: hard-link ours (copy where links are refused)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@dataclass
class _Subset:
    spec: ModalitySpec
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)

    def categories(self) -> list[dict[str, Any]]:
        names = list(self.spec.structures) + list(self.spec.lesions)
        return [{"id": i + 1, "name": name} for i, name in enumerate(names)]

    def category_id(self, name: str) -> int:
        return [c["name"] for c in self.categories()].index(name) + 1


@dataclass
class ReleaseWriter:
    """Writes one release split (train or test) while scenes are rendered."""

    root: Path  # the dataset root being built
    split: str  # release split: train | test
    subsets: dict[str, _Subset] = field(default_factory=dict)
    alignment: list[dict[str, Any]] = field(default_factory=list)
    instruct: list[dict[str, Any]] = field(default_factory=list)
    vqa: list[dict[str, Any]] = field(default_factory=list)  # LLaVA-Med style test questions
    corpus: list[str] = field(default_factory=list)
    per_modality: Counter = field(default_factory=Counter)
    with_lesion: int = 0
    _previous: tuple[str, str] | None = None  # (image, caption) for the next two-image row

    def _folder(self, spec: ModalitySpec) -> Path:
        return self.root / BIOMEDPARSE_DIR / spec.subset

    def add(self, index: int, scene: SyntheticScene, text: SceneText, prompt: str) -> None:
        spec = scene.modality
        subset = self.subsets.setdefault(spec.subset, _Subset(spec))
        stem = f"{index:05d}_{spec.spelling}_{spec.site}"
        image_path = self._folder(spec) / self.split / f"{stem}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(scene.pixels).save(image_path, compress_level=1)
        height, width = scene.pixels.shape[:2]
        subset.images.append({"id": index, "file_name": f"{stem}.png", "width": width, "height": height})
        for region, sentences in zip(scene.regions, text.region_sentences):
            mask_name = mask_file_name(stem, region.name)
            mask_path = self._folder(spec) / f"{self.split}_mask" / mask_name
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(region.mask.astype(np.uint8) * 255).save(mask_path, compress_level=1)
            subset.annotations.append({
                "id": len(subset.annotations), "image_id": index, "file_name": f"{stem}.png", "mask_file": mask_name,
                "category_id": subset.category_id(region.name), "bbox": bbox_xywh(region.mask),
                "area": int(region.mask.sum()), "iscrowd": 0, "sentences": [{"sent": s} for s in sentences],
            })
            self.corpus.extend(sentences)
        self.per_modality[spec.name] += 1
        self.with_lesion += scene.lesion_mask is not None
        self._add_text(stem, image_path, spec, text, prompt)

    def _add_text(self, stem: str, image_path: Path, spec: ModalitySpec, text: SceneText, prompt: str) -> None:
        meta = {"modality": FREE_TEXT_MODALITY[spec.name], "body_part": spec.site.capitalize()}
        if self.split == "test":  # test images feed the benchmarks, never training text
            image_rel = image_path.relative_to(self.root).as_posix()
            for number, item in enumerate(text.vqa):
                self.vqa.append({"id": f"{stem}_q{number}", "image": image_rel, "answer_type": item.answer_type.upper(),
                                 "modality": spec.name, "conversations": conversation(item.question, item.answer)})
            return
        image = f"images/{stem}.png"
        _link(image_path, self.root / PUBMEDVISION_DIR / image)
        self.alignment.append({"id": f"Alignment_VQA_{len(self.alignment)}", "image": [image],
                               "conversations": conversation(prompt, text.caption), **meta})
        if self._previous is not None and len(self.alignment) % MULTI_IMAGE_EVERY == 0:
            other, other_caption = self._previous
            self.alignment.append({"id": f"Alignment_VQA_{len(self.alignment)}", "image": [other, image],
                                   "conversations": conversation("Describe these images.", f"Image 1: {other_caption} "
                                                                 f"Image 2: {text.caption}", images=2), **meta})
        self._previous = (image, text.caption)
        self.corpus.extend([prompt, text.caption])
        for item in text.vqa:
            self.instruct.append({"id": f"InstructionTuning_VQA_{len(self.instruct)}", "image": [image],
                                  "conversations": conversation(item.question, item.answer), **meta})
            self.corpus.extend([item.question, item.answer])

    def finish(self) -> None:
        """The sub-datasets' annotation files (every sub-dataset gets one, even if empty)."""
        for spec in SYNTHETIC_MODALITIES:
            subset = self.subsets.get(spec.subset, _Subset(spec))
            coco = {"images": subset.images, "annotations": subset.annotations, "categories": subset.categories()}
            path = self._folder(spec) / f"{self.split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(coco) + "\n")

    def summary(self, seed_words: list[list[int]]) -> dict[str, Any]:
        return {"seed": seed_words, "images": sum(self.per_modality.values()), "with_lesion": self.with_lesion,
                "annotations": sum(len(s.annotations) for s in self.subsets.values()),
                "per_modality": dict(sorted(self.per_modality.items()))}


def write_pubmedvision(root: Path, train: ReleaseWriter) -> None:
    """The two PubMedVision files; each gets one row whose image was never shipped."""
    folder = root / PUBMEDVISION_DIR
    missing = {"image": ["images/pmc_missing_0.jpg"], "modality": "Computed Tomography", "body_part": "Chest",
               "conversations": conversation("What does this image show?", "A chest CT.")}
    alignment = train.alignment + [{"id": f"Alignment_VQA_{len(train.alignment)}", **missing}]
    instruct = train.instruct + [{"id": f"InstructionTuning_VQA_{len(train.instruct)}", **missing}]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ALIGNMENT_FILE).write_text(json.dumps(alignment) + "\n")
    (folder / INSTRUCT_FILE).write_text(json.dumps(instruct) + "\n")
