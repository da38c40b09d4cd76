"""DiagSeg-style diagnostic QA from image-mask-description triples (paper Sec. 3, App. B).

One question per finding: the question asks for the diagnosis without naming it, the answer
names it (consistent with the description) and grounds it with the finding's region token when
one is known. Output entries match the DiagSeg reader: ``{id, image, conversations,
mask_files, diagnosis, modality, description}``, paths relative to the dataset root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from medsight.data.datagen.llm_generator import GenerationRejected
from medsight.data.datagen.pipeline import GenerationReport, run_generation
from medsight.data.datagen.records import RegionInfo, Triple
from medsight.data.datagen.validation import validate_diagseg_qa


class DiagSegTextGenerator(Protocol):
    def diagseg_qa(self, triple: Triple, region: RegionInfo) -> tuple[str, str]: ...


def diagseg_entry(triple: Triple, region: RegionInfo, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": f"{triple.triple_id}__{region.class_name.replace(' ', '+')}",
        "image": triple.image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        "mask_files": [region.mask_file],
        "diagnosis": region.class_name,
        "modality": triple.modality,
        "description": region.description,
    }


def build_diagseg(
    triples: list[Triple],
    generator: DiagSegTextGenerator,
    output: Path,
    work_dir: Path | None = None,
    progress: bool = True,
) -> GenerationReport:
    """Write ``output`` (a JSON list); ``work_dir`` holds the resumable JSONL (default: beside it)."""
    output = Path(output)
    work_dir = Path(work_dir) if work_dir else output.with_suffix(".work")
    jobs = []
    for triple in triples:
        for region in triple.lesions:
            key = f"{triple.triple_id}__{region.mask_file}"

            def make(triple=triple, region=region) -> dict[str, Any]:
                question, answer = generator.diagseg_qa(triple, region)
                problems = validate_diagseg_qa(question, answer, region, triple)
                if problems:  # whatever wrote the text, an inconsistent item never gets through
                    raise GenerationRejected(f"{triple.triple_id}/{region.class_name}: {'; '.join(problems)}")
                return diagseg_entry(triple, region, question, answer)

            jobs.append((key, make))
    return run_generation(jobs, work_dir, output, "diagseg QA", progress)
