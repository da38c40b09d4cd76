"""The label space a dataset ships and a model is trained on: modalities and region classes.

Real BiomedParse data names modalities in image file names (``IMAGE_MODALITY_SITE.png``) and
targets in mask names; which names exist is a property of the release, so each dataset root
carries a ``taxonomy.json``::

    {"modalities": ["CT", "MRI", ...],            # order = modality ids = sub-codebooks
     "region_classes": ["liver", "kidney", ...],  # order = class ids (the perceiver adds no-object)
     "lesion_classes": ["tumor", "cyst", ...],    # the region classes that are findings
     "aliases": {"MRI-FLAIR": "MRI", "CT_lung": "CT-Chest"}}  # optional: file-name spellings

Ids are list positions, so reordering a file changes what a trained checkpoint means: append
new names at the end. ``medsight data prepare biomedparse`` writes the file of a prepared
release (from a template such as the shipped ``biomedparse-18``, see ``taxonomy_template.py``);
the synthetic generator's data goes through the same command.

Modality names in file names vary in case and grain (``pathology``, ``MRI-FLAIR``): a spelling
is matched case-insensitively, first as ``MODALITY_SITE`` then as ``MODALITY`` against the
aliases, then against the modality names themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsight.data.synthetic_world import SYNTHETIC_MODALITIES
from medsight.io_utils import atomic_write_json, read_json

if TYPE_CHECKING:
    from medsight.config.schema import ExperimentConfig

TAXONOMY_FILE = "taxonomy.json"
_KEYS = ("modalities", "region_classes", "lesion_classes")
_OPTIONAL_KEYS = ("aliases",)
# model.perceiver.num_classes / model.codebook.num_modalities = 0: take the count from the data.
FROM_DATA = 0


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


def parse_aliases(value: Any, modalities: Sequence[str], where: str) -> Mapping[str, str]:
    """``{"spelling": "Modality"}`` -> read-only map keyed by the lower-cased spelling."""
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TaxonomyError(f"{where}: 'aliases' must map file-name spellings to modality names")
    stray = sorted({v for v in value.values() if v not in modalities})
    if stray:
        raise TaxonomyError(f"{where}: 'aliases' maps to {', '.join(map(repr, stray))}, not in 'modalities'")
    return MappingProxyType({k.lower(): v for k, v in value.items()})


def match_modality(modalities: Sequence[str], aliases: Mapping[str, str], spelling: str, site: str = "") -> str | None:
    """``MODALITY_SITE`` alias, then ``MODALITY`` alias, then a modality name; case-insensitive."""
    key = spelling.strip().lower()
    with_site = f"{key}_{site.strip().lower()}"
    if site and with_site in aliases:
        return aliases[with_site]
    if key in aliases:
        return aliases[key]
    for name in modalities:
        if name.lower() == key:
            return name
    return None


@dataclass(frozen=True)
class Taxonomy:
    modalities: tuple[str, ...]  # index = modality id
    region_classes: tuple[str, ...]  # index = class id
    lesion_classes: frozenset[str]  # subset of region_classes
    # Where it came from, for error messages; not part of the label space itself.
    source: str = field(default="synthetic", compare=False)
    # Lower-cased file-name spelling -> modality name; how names are read, not what ids mean.
    aliases: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    @classmethod
    def synthetic(cls) -> Taxonomy:
        """The synthetic world's label space, in the order tiny checkpoints were trained with."""
        classes: list[str] = []
        for spec in SYNTHETIC_MODALITIES:
            classes += [name for name in spec.structures + spec.lesions if name not in classes]
        lesions = frozenset(name for spec in SYNTHETIC_MODALITIES for name in spec.lesions)
        aliases = {spec.spelling.lower(): spec.name for spec in SYNTHETIC_MODALITIES if spec.spelling.lower() != spec.name.lower()}
        return cls(tuple(spec.name for spec in SYNTHETIC_MODALITIES), tuple(classes), lesions,
                   aliases=MappingProxyType(aliases))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Taxonomy:
        if not isinstance(data, dict):
            raise TaxonomyError(f"{where}: expected a JSON object with keys {', '.join(_KEYS)}")
        if "region_classes" not in data and "modalities" in data:
            raise TaxonomyError(
                f"{where}: no 'region_classes': this is a taxonomy template; complete it from a release "
                "with `medsight data prepare biomedparse SRC DEST --taxonomy FILE`"
            )
        for key in _KEYS:
            if key not in data:
                raise TaxonomyError(f"{where}: missing key {key!r} (a taxonomy needs {', '.join(_KEYS)})")
        unknown = sorted(set(data) - set(_KEYS) - set(_OPTIONAL_KEYS))
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
        aliases = parse_aliases(data.get("aliases"), modalities, where)
        return cls(modalities, classes, frozenset(lesions), source=where, aliases=aliases)

    @classmethod
    def load(cls, path: Path) -> Taxonomy:
        data = read_json(path, TaxonomyError, "taxonomy file does not exist")
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        # Lesions in region-class order so the file is stable and easy to read.
        lesions = [name for name in self.region_classes if name in self.lesion_classes]
        data: dict[str, Any] = {"modalities": list(self.modalities), "region_classes": list(self.region_classes),
                                "lesion_classes": lesions}
        if self.aliases:
            data["aliases"] = dict(sorted(self.aliases.items()))
        return data

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), self.to_dict())

    def _unknown(self, kind: str, name: str, known: Sequence[str], where: str) -> ValueError:
        prefix = f"{where}: " if where else ""
        return ValueError(
            f"{prefix}unknown {kind} {name!r}; known {'modalities' if kind == 'modality' else 'classes'}: "
            f"{', '.join(known)} (label space: {self.source}; list it in the dataset's "
            f"{TAXONOMY_FILE} or set data.taxonomy)"
        )

    def find_modality(self, spelling: str, site: str = "") -> str | None:
        """The modality a file-name spelling names (see the module docstring), or None."""
        return match_modality(self.modalities, self.aliases, spelling, site)

    def modality_index(self, name: str, where: str = "") -> int:
        """Index of a modality name or alias; unknown names raise with the offending file or key."""
        found = self.find_modality(name)
        if found is None:
            raise self._unknown("modality", name, self.modalities, where)
        return self.modalities.index(found)

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
    """Size the perceiver's class head and the codebook's sub-codebooks from the data.

    A count left at ``FROM_DATA`` (0, the default) is filled in from the taxonomy, in place, so
    a stage runs on any prepared release without ``--set``; an explicit count that disagrees
    would mislabel silently or fail deep in a loss, so it is refused naming both numbers.
    """
    sections = (
        (config.model.perceiver, "num_classes", "region_classes", len(taxonomy.region_classes)),
        (config.model.codebook, "num_modalities", "modalities", len(taxonomy.modalities)),
    )
    for section, attribute, field_name, expected in sections:
        key = f"model.{'perceiver' if attribute == 'num_classes' else 'codebook'}.{attribute}"
        configured = getattr(section, attribute)
        if configured == FROM_DATA:
            setattr(section, attribute, expected)
        elif configured != expected:
            raise ValueError(
                f"{key}={configured} but the taxonomy ({taxonomy.source}) lists {expected} "
                f"{field_name}; set {key}={expected} or {key}={FROM_DATA} (take it from the data), "
                f"or use a taxonomy with {configured} {field_name}"
            )
