"""The label space a dataset ships and a model is trained on: modalities and region classes.

Real BiomedParse data names modalities in image file names (``IMAGE_MODALITY_SITE.png``) and
targets in mask names; which names exist is a property of the release, so each dataset root
carries a ``taxonomy.json``::

    {"modalities": ["CT", "MRI", ...],            # order = modality ids = sub-codebooks
     "region_classes": ["liver", "kidney", ...],  # order = class ids (the perceiver adds no-object)
     "lesion_classes": ["tumor", "cyst", ...]}    # the region classes that are findings

Ids are list positions, so reordering a file changes what a trained checkpoint means: append
new names at the end. The synthetic generator writes its own file; for a real release the user
writes one (or points ``data.taxonomy`` at one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsight.data.synthetic_world import SYNTHETIC_MODALITIES
from medsight.io_utils import atomic_write_json, read_json

if TYPE_CHECKING:
    from medsight.config.schema import ExperimentConfig

TAXONOMY_FILE = "taxonomy.json"
_KEYS = ("modalities", "region_classes", "lesion_classes")


class TaxonomyError(ValueError):
    """A taxonomy file is missing or malformed; the message names the file and the key."""


def _names(value: Any, key: str, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise TaxonomyError(f"{where}: {key!r} must be a list of non-empty strings")
    if not value and not allow_empty:
        raise TaxonomyError(f"{where}: {key!r} is empty; list at least one name")
    duplicates = sorted({v for v in value if value.count(v) > 1})
    if duplicates:
        raise TaxonomyError(f"{where}: {key!r} lists {', '.join(map(repr, duplicates))} more than once")
    return tuple(value)


@dataclass(frozen=True)
class Taxonomy:
    modalities: tuple[str, ...]  # index = modality id
    region_classes: tuple[str, ...]  # index = class id
    lesion_classes: frozenset[str]  # subset of region_classes
    # Where it came from, for error messages; not part of the label space itself.
    source: str = field(default="synthetic", compare=False)

    @classmethod
    def synthetic(cls) -> Taxonomy:
        """The synthetic world's label space, in the order tiny checkpoints were trained with."""
        classes: list[str] = []
        for spec in SYNTHETIC_MODALITIES:
            classes += [name for name in spec.structures + spec.lesions if name not in classes]
        lesions = frozenset(name for spec in SYNTHETIC_MODALITIES for name in spec.lesions)
        return cls(tuple(spec.name for spec in SYNTHETIC_MODALITIES), tuple(classes), lesions)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Taxonomy:
        if not isinstance(data, dict):
            raise TaxonomyError(f"{where}: expected a JSON object with keys {', '.join(_KEYS)}")
        for key in _KEYS:
            if key not in data:
                raise TaxonomyError(f"{where}: missing key {key!r} (a taxonomy needs {', '.join(_KEYS)})")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise TaxonomyError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(_KEYS)}")
        modalities = _names(data["modalities"], "modalities", where)
        classes = _names(data["region_classes"], "region_classes", where)
        # A dataset may hold no findings at all (pure anatomy), so lesions may be empty.
        lesions = _names(data["lesion_classes"], "lesion_classes", where, allow_empty=True)
        stray = [name for name in lesions if name not in classes]
        if stray:
            raise TaxonomyError(
                f"{where}: 'lesion_classes' names {', '.join(map(repr, stray))}, not in 'region_classes'"
            )
        return cls(modalities, classes, frozenset(lesions), source=where)

    @classmethod
    def load(cls, path: Path) -> Taxonomy:
        data = read_json(path, TaxonomyError, "taxonomy file does not exist")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, list[str]]:
        # Lesions in region-class order so the file is stable and easy to read.
        lesions = [name for name in self.region_classes if name in self.lesion_classes]
        return {"modalities": list(self.modalities), "region_classes": list(self.region_classes),
                "lesion_classes": lesions}

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), self.to_dict())

    def _unknown(self, kind: str, name: str, known: Sequence[str], where: str) -> ValueError:
        prefix = f"{where}: " if where else ""
        return ValueError(
            f"{prefix}unknown {kind} {name!r}; known {'modalities' if kind == 'modality' else 'classes'}: "
            f"{', '.join(known)} (label space: {self.source}; list it in the dataset's "
            f"{TAXONOMY_FILE} or set data.taxonomy)"
        )

    def modality_index(self, name: str, where: str = "") -> int:
        """Index of a modality name; unknown names raise with the offending file or key."""
        try:
            return self.modalities.index(name)
        except ValueError:
            raise self._unknown("modality", name, self.modalities, where) from None

    def class_index(self, name: str, where: str = "") -> int:
        try:
            return self.region_classes.index(name)
        except ValueError:
            raise self._unknown("region class", name, self.region_classes, where) from None

    def is_lesion(self, class_name: str) -> bool:
        return class_name in self.lesion_classes


def taxonomy_path(data_root: Path, setting: str = "") -> Path | None:
    """The file ``resolve_taxonomy`` reads, or None for the built-in synthetic label space."""
    if setting:
        path = Path(setting)
        # Relative to the data root, so a dataset can ship alternatives (coarse/fine modalities)
        # and the setting stays valid wherever the data is mounted.
        return path if path.is_absolute() else Path(data_root) / path
    shipped = Path(data_root) / TAXONOMY_FILE
    return shipped if shipped.is_file() else None


def resolve_taxonomy(data_root: Path, setting: str = "") -> Taxonomy:
    """The label space of a run; ``setting`` is ``data.taxonomy``: a file if set, else the
    dataset's own taxonomy.json, else the synthetic one. Every stage and reader gets its
    taxonomy from here."""
    path = taxonomy_path(data_root, setting)
    if path is None:
        return Taxonomy.synthetic()
    if setting and not path.is_file():
        raise TaxonomyError(f"{path}: taxonomy file does not exist (data.taxonomy={setting!r}; "
                            "a relative path is read from the data root)")
    return Taxonomy.load(path)


def check_model_matches(config: ExperimentConfig, taxonomy: Taxonomy) -> None:
    """The perceiver's class head and the codebook's sub-codebooks are sized by config; a
    mismatch with the data's label space would mislabel silently or fail deep in a loss."""
    pairs = (
        ("model.perceiver.num_classes", config.model.perceiver.num_classes, "region_classes", len(taxonomy.region_classes)),
        ("model.codebook.num_modalities", config.model.codebook.num_modalities, "modalities", len(taxonomy.modalities)),
    )
    for key, configured, field_name, expected in pairs:
        if configured != expected:
            raise ValueError(
                f"{key}={configured} but the taxonomy ({taxonomy.source}) lists {expected} "
                f"{field_name}; set {key}={expected} (e.g. --set {key}={expected}) or use a "
                f"taxonomy with {configured} {field_name}"
            )
