"""What ``medsight data prepare biomedparse`` turns into a dataset's ``taxonomy.json``.

A template fixes the modalities (and the aliases that map file-name spellings onto them) and may
fix the region classes; when it does not, the classes are collected from the release's mask
names and categories, sorted by name so the same release always gives the same ids. Which
collected classes are findings is decided by ``lesion_keywords`` (whole words of the name).

Templates ship with the project (``medsight/data/taxonomies/*.json``, named by file stem, e.g.
``biomedparse-18``: the paper's 18 fine-grained modalities) or are any JSON file with the keys
of a taxonomy, where ``region_classes``/``lesion_classes`` are optional and ``lesion_keywords``
and ``description`` are allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsight.data.taxonomy import Taxonomy, TaxonomyError, _names, match_modality, parse_aliases
from medsight.io_utils import read_json

SHIPPED_DIR = Path(__file__).parent / "taxonomies"
_KEYS = ("modalities", "aliases", "region_classes", "lesion_classes", "lesion_keywords", "description")


def shipped_templates() -> list[str]:
    return sorted(path.stem for path in SHIPPED_DIR.glob("*.json"))


def template_path(name_or_path: str | Path) -> Path:
    """A shipped template's file (by name) or the given file; a clear error when neither exists."""
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate
    shipped = SHIPPED_DIR / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise TaxonomyError(
        f"{name_or_path}: no such taxonomy file, and not a shipped template "
        f"(shipped: {', '.join(shipped_templates())})"
    )


@dataclass(frozen=True)
class TaxonomyTemplate:
    modalities: tuple[str, ...]
    aliases: Mapping[str, str]
    region_classes: tuple[str, ...] | None  # None: collect from the release
    lesion_classes: frozenset[str]
    lesion_keywords: tuple[str, ...]
    source: str

    @classmethod
    def load(cls, name_or_path: str | Path) -> TaxonomyTemplate:
        path = template_path(name_or_path)
        return cls.from_dict(read_json(path, TaxonomyError, "taxonomy file does not exist"), str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TaxonomyTemplate:
        if not isinstance(data, dict) or "modalities" not in data:
            raise TaxonomyError(f"{where}: a taxonomy template is a JSON object with at least 'modalities'")
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise TaxonomyError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected {', '.join(_KEYS)}")
        modalities = _names(data["modalities"], "modalities", where)
        classes = _names(data["region_classes"], "region_classes", where) if "region_classes" in data else None
        lesions = _names(data.get("lesion_classes", []), "lesion_classes", where, allow_empty=True)
        if classes is not None and not set(lesions) <= set(classes):
            raise TaxonomyError(f"{where}: 'lesion_classes' names classes not in 'region_classes'")
        keywords = _names(data.get("lesion_keywords", []), "lesion_keywords", where, allow_empty=True)
        aliases = parse_aliases(data.get("aliases"), modalities, where)
        return cls(modalities, aliases, classes, frozenset(lesions), tuple(k.lower() for k in keywords), where)

    @classmethod
    def from_taxonomy(cls, taxonomy: Taxonomy) -> TaxonomyTemplate:
        """A complete taxonomy used as a template: every name fixed."""
        return cls(taxonomy.modalities, taxonomy.aliases, taxonomy.region_classes, taxonomy.lesion_classes, (),
                   taxonomy.source)

    def find_modality(self, spelling: str, site: str = "") -> str | None:
        return match_modality(self.modalities, self.aliases, spelling, site)

    def knows_class(self, name: str) -> bool:
        return self.region_classes is None or name in self.region_classes

    def is_lesion(self, name: str) -> bool:
        if name in self.lesion_classes:
            return True
        words = set(re.split(r"[^a-z0-9-]+", name.lower()))
        return any(keyword in words for keyword in self.lesion_keywords)

    def complete(self, collected: Iterable[str], source: str) -> Taxonomy:
        """The dataset's taxonomy: the template's classes, or the collected ones sorted by name."""
        classes = self.region_classes if self.region_classes is not None else tuple(sorted(set(collected)))
        if not classes:
            raise TaxonomyError(f"{source}: no region classes: the release holds no usable mask")
        lesions = frozenset(name for name in classes if self.is_lesion(name))
        return Taxonomy(self.modalities, classes, lesions, source=source, aliases=self.aliases)
