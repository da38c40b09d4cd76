"""What the synthetic world draws: per modality, its body site, structures, lesion kinds, look.

This describes the generator's scenes, not the label space: the label space a model trains on
is a ``Taxonomy`` (``medsight/data/taxonomy.py``), and ``Taxonomy.synthetic()`` is derived from
these specs so the generated data and its ``taxonomy.json`` always agree.
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
    # How the release spells the modality in file names (case and grain vary, as in BiomedParse:
    # "ultrasound", "MRI-FLAIR"), and the sub-dataset folder its images are published in.
    spelling: str = ""
    subset: str = ""

    def __post_init__(self) -> None:
        if not self.spelling:
            object.__setattr__(self, "spelling", self.name)
        if not self.subset:
            object.__setattr__(self, "subset", f"Synth{self.name.replace('-', '')}")


SYNTHETIC_MODALITIES: tuple[ModalitySpec, ...] = (
    ModalitySpec("CT", "abdomen", ("liver", "kidney"), ("tumor", "cyst"), False, subset="SynthAbdomen/CT"),
    ModalitySpec("MRI", "brain", ("brain", "ventricle"), ("tumor", "edema"), False, "MRI-FLAIR", "SynthBrain"),
    ModalitySpec("X-Ray", "chest", ("left lung", "right lung"), ("nodule", "effusion"), False),
    ModalitySpec("Ultrasound", "breast", ("gland",), ("cyst", "tumor"), False, "ultrasound", "SynthBreastUS"),
    ModalitySpec("Dermoscopy", "skin", ("skin",), ("melanoma", "nevus"), True, "dermoscopy"),
    ModalitySpec("Pathology", "colon", ("gland",), ("tumor", "inflammation"), True, "pathology"),
)
