"""Image-mask-description triples: the input of both data generators.

A triple is one image with its annotated regions; each region has a mask, a class, a
referring description and, for grounding conversations, the region token the stage-2 codebook
assigned to it (App. C: Hungarian matching of ground-truth masks to quantised queries).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import os

from medsight.data.prepared_index import SegmentationRecord, read_split
from medsight.data.taxonomy import Taxonomy
from medsight.io_utils import read_json


@dataclass(frozen=True)
class RegionInfo:
    class_name: str  # "tumor", "liver"
    description: str  # referring sentence(s) from the annotation
    mask_file: str  # relative to the dataset root
    is_lesion: bool
    region_token: str | None = None  # "[C0_3]"; None until the codebook has assigned one
    host: str | None = None  # structure that holds a lesion, when the description says


@dataclass(frozen=True)
class Triple:
    triple_id: str
    image: str  # relative to the dataset root
    modality: str
    regions: tuple[RegionInfo, ...] = field(default_factory=tuple)
    # Every lesion kind of the dataset's taxonomy: the findings a generated answer must not name
    # unless the image holds them (an LLM drifts towards common diagnoses).
    findings: tuple[str, ...] = ()

    @property
    def lesions(self) -> tuple[RegionInfo, ...]:
        return tuple(r for r in self.regions if r.is_lesion)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _host_from_description(description: str, structures: set[str]) -> str | None:
    """'tumor in kidney in abdomen CT' -> 'kidney' (first structure named after ' in ')."""
    lowered = description.lower()
    for structure in sorted(structures, key=len, reverse=True):
        if f" in {structure}" in lowered or f" in the {structure}" in lowered:
            return structure
    return None


def _relative(path: Path, data_root: Path) -> str:
    return os.path.relpath(path, data_root)


def triples_from_records(
    records: list[SegmentationRecord], data_root: Path, taxonomy: Taxonomy,
    region_tokens: dict[str, str] | None = None, hosts: dict[str, str] | None = None,
) -> list[Triple]:
    """Triples of prepared records; paths relative to ``data_root``. ``region_tokens``/``hosts``
    map a mask path (relative to ``data_root``) to its codebook token / host structure."""
    tokens, hosts = region_tokens or {}, hosts or {}
    findings = tuple(name for name in taxonomy.region_classes if taxonomy.is_lesion(name))
    triples = []
    for record in records:
        structures = {r.class_name for r in record.regions if not taxonomy.is_lesion(r.class_name)}
        regions = []
        for region in record.regions:
            mask_rel = _relative(region.mask_path, data_root)
            lesion = taxonomy.is_lesion(region.class_name)
            regions.append(RegionInfo(
                class_name=region.class_name, description=region.sentence, mask_file=mask_rel, is_lesion=lesion,
                region_token=tokens.get(mask_rel),
                host=hosts.get(mask_rel, _host_from_description(region.sentence, structures)) if lesion else None,
            ))
        triples.append(Triple(record.image_id, _relative(record.image_path, data_root), record.modality,
                              tuple(regions), findings))
    return triples


def triples_from_biomedparse(
    data_root: Path, split: str, taxonomy: Taxonomy, region_tokens: dict[str, str] | None = None
) -> list[Triple]:
    """Triples of a prepared split (``data_root/biomedparse/{split}.jsonl``)."""
    return triples_from_records(read_split(Path(data_root), split, taxonomy), Path(data_root), taxonomy, region_tokens)


def triples_from_region_codes(codes_path: Path, data_root: Path, split: str, taxonomy: Taxonomy) -> list[Triple]:
    """Triples with region tokens from the grounding-data stage's ``region_codes/<split>.json``
    (``[{image, modality, regions: [{class_name, mask_file, token, host}]}]``); descriptions come
    from the BiomedParse annotations of the same split."""
    codes_path = Path(codes_path)
    entries = read_json(codes_path, ValueError, "region codes file not found (written by the grounding-data stage)")
    tokens: dict[str, str] = {}
    hosts: dict[str, str] = {}
    for index, entry in enumerate(entries):
        for region in entry.get("regions", []):
            if "mask_file" not in region or "token" not in region:
                raise ValueError(f"{codes_path}: entry {index} has a region without 'mask_file' and 'token'")
            tokens[str(region["mask_file"])] = str(region["token"])
            if region.get("host"):
                hosts[str(region["mask_file"])] = str(region["host"])
    images = {str(entry.get("image")) for entry in entries}
    records = [r for r in read_split(Path(data_root), split, taxonomy) if _relative(r.image_path, data_root) in images]
    if not records:
        raise ValueError(f"{codes_path}: no image matches the {split} split of {data_root}; wrong split or dataset?")
    # The stage decides hosts by mask overlap, which beats parsing descriptions.
    return triples_from_records(records, Path(data_root), taxonomy, tokens, hosts)
