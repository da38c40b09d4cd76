"""Deterministic template generator: offline, in tests and for the tiny preset.

The same triple and seed always give the same text (phrasings are picked by a hash of the id,
not by global random state), so generated datasets are reproducible and cacheable by content.
"""

from __future__ import annotations

import hashlib

from medsight.data.phrasing import stable_choice
from medsight.data.datagen.records import RegionInfo, Triple

DIAGSEG_QUESTIONS = (
    "What abnormality is observed in this image? Please provide the diagnosis and then segment it.",
    "Is there an abnormal finding in this {modality} image? Give the diagnosis and segment the affected region.",
    "What is the most likely diagnosis for the abnormal region in this image? Please segment it as well.",
)
OVERVIEW_QUESTIONS = (
    "What structures can you identify in this {modality} image?",
    "Please describe the regions visible in this image and segment them.",
    "Which anatomical structures are shown here?",
)
LESION_QUESTIONS = (
    "Is there any lesion? If so, where is it?",
    "Do you see anything abnormal in this image?",
    "Please find and segment any abnormal region.",
)
SEGMENT_QUESTIONS = ("Please segment the {name}.", "Where is the {name}?", "Can you outline the {name}?")
NO_LESION_ANSWERS = ("No lesion is seen in this image.", "No, the image looks normal.")


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _grounded(name: str, region: RegionInfo) -> str:
    """'the liver [C0_3]' (or just 'the liver' when the region has no token yet)."""
    return f"the {name} {region.region_token}" if region.region_token else f"the {name}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class TemplateGenerator:
    name = "template"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _pick(self, options: tuple[str, ...], key: str) -> str:
        return stable_choice(options, key, self.seed)

    def diagseg_qa(self, triple: Triple, region: RegionInfo) -> tuple[str, str]:
        modality = triple.modality if triple.modality in ("CT", "MRI", "OCT") else triple.modality.lower()
        question = self._pick(DIAGSEG_QUESTIONS, f"dq:{triple.triple_id}:{region.mask_file}").format(modality=modality)
        host = f" in the {region.host}" if region.host else ""
        token = f" {region.region_token}" if region.region_token else ""
        answer = f"The diagnosis is {_article(region.class_name)}{host}{token}."
        return question, answer

    def conversation(self, triple: Triple) -> list[tuple[str, str]]:
        modality = triple.modality if triple.modality in ("CT", "MRI", "OCT") else triple.modality.lower()
        structures = [r for r in triple.regions if not r.is_lesion]
        lesions = list(triple.lesions)
        key = triple.triple_id
        turns: list[tuple[str, str]] = []
        if structures:
            turns.append(("human", self._pick(OVERVIEW_QUESTIONS, f"o:{key}").format(modality=modality)))
            turns.append(("gpt", f"This {modality} image shows {_join([_grounded(r.class_name, r) for r in structures])}."))
        turns.append(("human", self._pick(LESION_QUESTIONS, f"l:{key}")))
        if lesions:
            sentences = []
            for lesion in lesions:
                host = f" in the {lesion.host}" if lesion.host else ""
                token = f" {lesion.region_token}" if lesion.region_token else ""
                sentences.append(f"There is {_article(lesion.class_name)}{token}{host}.")
            turns.append(("gpt", "Yes. " + " ".join(sentences)))
        else:
            turns.append(("gpt", self._pick(NO_LESION_ANSWERS, f"n:{key}")))
        if structures:
            target = structures[int(hashlib.sha256(f"{self.seed}:s:{key}".encode()).digest()[0]) % len(structures)]
            turns.append(("human", self._pick(SEGMENT_QUESTIONS, f"s:{key}").format(name=target.class_name)))
            turns.append(("gpt", f"Sure, here is {_grounded(target.class_name, target)}."))
        return turns
