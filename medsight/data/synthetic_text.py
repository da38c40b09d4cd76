"""Text for synthetic scenes: region sentences, alignment captions and VQA pairs.

Every statement is derived from the scene's masks, so a model that ignores the image can only
guess: lesion presence is balanced by the generator, and the closed "is there a KIND in the
STRUCTURE" questions are balanced here with wrong-kind and wrong-structure negatives drawn
uniformly, so the question wording carries no hint of the answer. The vocabulary is kept small
and fixed so the tiny tokenizer and model can cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from medsight.data.synthetic_images import SyntheticScene
from medsight.data.synthetic_world import ModalitySpec

ALIGNMENT_PROMPTS: tuple[str, ...] = (
    "Describe this image.",
    "What does this image show?",
    "Give a short description of the image.",
)
LESION_PRESENCE_QUESTION = "Is there a lesion in this image?"
LESION_KIND_QUESTION = "What kind of lesion is present?"
LESION_STRUCTURE_QUESTION = "Which structure contains the lesion?"
MODALITY_QUESTION = "What imaging modality is this?"
# Share of lesion images asked about their true (kind, structure); with the share of lesion-free
# images asked at all below, yes and no come out equally often: 3/4 = 1/4 + 1/2.
_TRUE_PAIR_SHARE = 0.75
_LESION_FREE_ASK_SHARE = 0.5

T = TypeVar("T")


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str  # short and normalisable: "yes", "no", "tumor", "liver", "CT"
    answer_type: str  # "closed" (yes/no) or "open"
    question_kind: str  # lesion_presence | lesion_in_structure | lesion_kind | ...


@dataclass(frozen=True)
class SceneText:
    caption: str
    region_sentences: tuple[tuple[str, ...], ...]  # aligned with scene.regions
    vqa: tuple[VQAItem, ...]


def modality_word(modality: ModalitySpec) -> str:
    """How the modality is written in running text and in answers."""
    match modality.name:
        case "X-Ray":
            return "X-ray"
        case "CT" | "MRI" | "OCT":
            return modality.name
    return modality.name.lower()


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" or word.startswith(("MRI", "X-ray")) else "a"


def _with_article(word: str) -> str:
    return f"{_article(word)} {word}"


def appearance(modality: ModalitySpec, kind: str) -> str:
    """What the lesion looks like in this modality, matching how the renderer paints it."""
    match (modality.name, kind):
        case ("Ultrasound", "cyst"):
            return "an anechoic round area with posterior enhancement"
        case ("Ultrasound", "tumor"):
            return "a hypoechoic irregular mass with posterior shadowing"
        case ("MRI", "tumor"):
            return "a ring-enhancing mass with a dark core"
        case ("Pathology", "tumor"):
            return "crowded, enlarged dark nuclei"
        case (_, "tumor"):
            return "a bright, heterogeneous mass"
        case (_, "cyst"):
            return "a dark, smooth, round area with a thin bright wall"
        case (_, "edema"):
            return "a diffuse bright area with soft margins"
        case (_, "nodule"):
            return "a small, round, dense opacity"
        case (_, "effusion"):
            return "a homogeneous opacity at the lung base"
        case (_, "melanoma"):
            return "an irregular area with brown, black and blue-grey colours"
        case (_, "nevus"):
            return "a round, evenly brown spot"
        case (_, "inflammation"):
            return "dense clusters of small dark cells"
    return _with_article(kind)


def location_phrase(mask: np.ndarray) -> str:
    """Where a [S,S] bool mask's centroid lies, in thirds of the image."""
    ys, xs = np.nonzero(mask)
    size_y, size_x = mask.shape
    row = ("upper", "middle", "lower")[min(int(3 * ys.mean() / size_y), 2)]
    col = ("left", "centre", "right")[min(int(3 * xs.mean() / size_x), 2)]
    if (row, col) == ("middle", "centre"):
        return "in the centre of the image"
    if row == "middle":
        return f"on the {col} of the image"
    if col == "centre":
        return f"in the {row} part of the image"
    return f"in the {row} {col} of the image"


def modality_phrase(modality: ModalitySpec) -> str:
    """E.g. 'a CT image of the abdomen'."""
    word = modality_word(modality)
    return f"{_with_article(word)} image of the {modality.site}"


def region_sentences(scene: SyntheticScene, index: int) -> tuple[str, ...]:
    """BiomedParse-style referring sentences for ``scene.regions[index]``."""
    region = scene.regions[index]
    word = modality_word(scene.modality)
    site = scene.modality.site
    if not region.is_lesion:
        return (
            f"{region.name} in {site} {word}",
            f"the {region.name} in {modality_phrase(scene.modality)}",
        )
    assert scene.lesion is not None
    host = scene.lesion.structure
    return (
        f"{region.name} in {host} in {site} {word}",
        f"{_with_article(region.name)} in the {host}, "
        f"seen as {appearance(scene.modality, region.name)}",
    )


def _join(names: tuple[str, ...]) -> str:
    named = [f"the {name}" for name in names]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def caption(scene: SyntheticScene) -> str:
    """Alignment caption: modality, site, structures and the lesion with where/how it shows."""
    opening = modality_phrase(scene.modality)
    text = f"{opening[0].upper()}{opening[1:]} showing {_join(scene.modality.structures)}."
    lesion_mask = scene.lesion_mask
    if lesion_mask is None or scene.lesion is None:
        return text + " No lesion is seen."
    kind, host = scene.lesion.kind, scene.lesion.structure
    return (
        f"{text} {_with_article(kind).capitalize()} is present in the {host}, "
        f"{location_phrase(lesion_mask)}, seen as {appearance(scene.modality, kind)}."
    )


def _pick(options: Sequence[T], rng: np.random.Generator) -> T:
    return options[int(rng.integers(len(options)))]


def _lesion_in_structure_item(scene: SyntheticScene, rng: np.random.Generator) -> VQAItem | None:
    """Balanced yes/no about a (kind, structure) pair; None when this image is not asked."""
    spec = scene.modality
    has_lesion = scene.lesion_mask is not None and scene.lesion is not None
    if has_lesion:
        assert scene.lesion is not None
        kind, structure = scene.lesion.kind, scene.lesion.structure
        if rng.random() >= _TRUE_PAIR_SHARE:
            wrong_kinds = [k for k in spec.lesions if k != kind]
            wrong_structures = [s for s in spec.structures if s != structure]
            if wrong_structures and (not wrong_kinds or rng.random() < 0.5):
                structure = _pick(wrong_structures, rng)
            elif wrong_kinds:
                kind = _pick(wrong_kinds, rng)
            else:  # a modality with one lesion kind and one structure has no true negative
                return None
    elif rng.random() < _LESION_FREE_ASK_SHARE:
        kind, structure = _pick(spec.lesions, rng), _pick(spec.structures, rng)
    else:
        return None
    truth = has_lesion and (kind, structure) == (scene.lesion.kind, scene.lesion.structure)
    return VQAItem(
        f"Is there {_with_article(kind)} in the {structure}?",
        "yes" if truth else "no",
        "closed",
        "lesion_in_structure",
    )


def vqa_items(scene: SyntheticScene, rng: np.random.Generator) -> tuple[VQAItem, ...]:
    """Questions whose answers are read off the scene's masks (see module docstring)."""
    lesion_present = scene.lesion_mask is not None
    items = [
        VQAItem(LESION_PRESENCE_QUESTION, "yes" if lesion_present else "no", "closed",
                "lesion_presence"),
    ]
    paired = _lesion_in_structure_item(scene, rng)
    if paired is not None:
        items.append(paired)
    if lesion_present and scene.lesion is not None:
        items.append(VQAItem(LESION_KIND_QUESTION, scene.lesion.kind, "open", "lesion_kind"))
        items.append(
            VQAItem(LESION_STRUCTURE_QUESTION, scene.lesion.structure, "open", "lesion_structure")
        )
    items.append(VQAItem(MODALITY_QUESTION, modality_word(scene.modality), "open", "modality"))
    return tuple(items)


def describe_scene(scene: SyntheticScene, rng: np.random.Generator) -> SceneText:
    sentences = tuple(region_sentences(scene, i) for i in range(len(scene.regions)))
    return SceneText(caption(scene), sentences, vqa_items(scene, rng))
