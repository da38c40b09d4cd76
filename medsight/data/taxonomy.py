"""The label spaces every part agrees on: modalities and region classes.

Real BiomedParse data names modalities in file names (``IMAGE_MODALITY_SITE.png``) and targets
in mask names; the synthetic world uses a small subset with the same spelling so one reader
serves both. Class ids index ``REGION_CLASSES``; the perceiver adds one no-object class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModalitySpec:
    name: str  # as spelled in BiomedParse file names
    site: str  # body site used in file names
    structures: tuple[str, ...]  # anatomical structures drawn in every image
    lesions: tuple[str, ...]  # lesion kinds that may appear (at most one per image)
    color: bool  # RGB look (dermoscopy, pathology...) vs grayscale


SYNTHETIC_MODALITIES: tuple[ModalitySpec, ...] = (
    ModalitySpec("CT", "abdomen", ("liver", "kidney"), ("tumor", "cyst"), False),
    ModalitySpec("MRI", "brain", ("brain", "ventricle"), ("tumor", "edema"), False),
    ModalitySpec("X-Ray", "chest", ("left lung", "right lung"), ("nodule", "effusion"), False),
    ModalitySpec("Ultrasound", "breast", ("gland",), ("cyst", "tumor"), False),
    ModalitySpec("Dermoscopy", "skin", ("skin",), ("melanoma", "nevus"), True),
    ModalitySpec("Pathology", "colon", ("gland",), ("tumor", "inflammation"), True),
)

MODALITY_NAMES: tuple[str, ...] = tuple(m.name for m in SYNTHETIC_MODALITIES)


def _region_classes() -> tuple[str, ...]:
    names: list[str] = []
    for modality in SYNTHETIC_MODALITIES:
        for name in modality.structures + modality.lesions:
            if name not in names:
                names.append(name)
    return tuple(names)


REGION_CLASSES: tuple[str, ...] = _region_classes()
LESION_CLASSES: frozenset[str] = frozenset(
    name for modality in SYNTHETIC_MODALITIES for name in modality.lesions
)


def modality_index(name: str, where: str = "") -> int:
    """Index of a modality name; unknown names raise with the offending file or key."""
    try:
        return MODALITY_NAMES.index(name)
    except ValueError:
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}unknown modality {name!r}; known modalities: {', '.join(MODALITY_NAMES)}"
        ) from None


def class_index(name: str, where: str = "") -> int:
    try:
        return REGION_CLASSES.index(name)
    except ValueError:
        prefix = f"{where}: " if where else ""
        raise ValueError(
            f"{prefix}unknown region class {name!r}; known classes: {', '.join(REGION_CLASSES)}"
        ) from None
