"""Image-mask-description triples: the input of both data generators.

A triple is one image with its annotated regions; each region has a mask, a class, a
referring description and, for grounding conversations, the region token the stage-2 codebook
assigned to it (App. C: Hungarian matching of ground-truth masks to quantised queries).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medsight.data.biomedparse import read_biomedparse
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


def triples_from_biomedparse(
    data_root: Path, split: str, taxonomy: Taxonomy, region_tokens: dict[str, str] | None = None
) -> list[Triple]:
    """Triples from ``data_root/biomedparse/{split}.json``; paths stay relative to ``data_root``.

    ``region_tokens`` maps a mask path (relative to ``data_root``) to the token the codebook
    assigned to that region.
    """
    data_root = Path(data_root)
    bmp_root = data_root / "biomedparse"
    records = read_biomedparse(bmp_root, split, taxonomy)
    tokens = region_tokens or {}
    findings = tuple(name for name in taxonomy.region_classes if taxonomy.is_lesion(name))
    triples = []
    for record in records:
        structures = {r.class_name for r in record.regions if not taxonomy.is_lesion(r.class_name)}
        regions = []
        for region in record.regions:
            mask_rel = str(region.mask_path.relative_to(data_root))
            regions.append(
                RegionInfo(
                    class_name=region.class_name,
                    description=region.sentence,
                    mask_file=mask_rel,
                    is_lesion=taxonomy.is_lesion(region.class_name),
                    region_token=tokens.get(mask_rel),
                    host=_host_from_description(region.sentence, structures) if taxonomy.is_lesion(region.class_name) else None,
                )
            )
        triples.append(
            Triple(
                triple_id=record.image_id,
                image=str(record.image_path.relative_to(data_root)),
                modality=record.modality,
                regions=tuple(regions),
                findings=findings,
            )
        )
    return triples


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
    triples = triples_from_biomedparse(data_root, split, taxonomy, tokens)
    unmatched = [t.triple_id for t in triples if any(r.region_token is None for r in t.regions)]
    if len(unmatched) == len(triples):
        raise ValueError(f"{codes_path}: no mask_file matches the {split} split of {data_root}; wrong split or dataset?")
    # The stage decides hosts by mask overlap, which beats parsing descriptions.
    return [
        Triple(t.triple_id, t.image, t.modality, tuple(
            RegionInfo(r.class_name, r.description, r.mask_file, r.is_lesion, r.region_token, hosts.get(r.mask_file, r.host))
            for r in t.regions
        ), t.findings)
        for t in triples
    ]
