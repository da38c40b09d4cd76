"""Grounding instruction conversations built around region codes (paper App. C).

Input: triples whose regions carry the region token the stage-2 codebook assigned (the
grounding-data stage computes them). Output: LLaVA conversation entries ``{id, image,
conversations, mask_files, modality}`` whose gpt turns contain the tokens; ``mask_files``
lists one mask per token occurrence in order, the order stages 4-5 supervise them in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from medsight.data.datagen.llm_generator import GenerationRejected
from medsight.data.datagen.pipeline import GenerationReport, run_generation
from medsight.data.datagen.records import Triple
from medsight.data.datagen.validation import mask_files_in_token_order, validate_conversation


class ConversationGenerator(Protocol):
    def conversation(self, triple: Triple) -> list[tuple[str, str]]: ...


def conversation_entry(triple: Triple, turns: list[tuple[str, str]]) -> dict[str, Any]:
    conversations = []
    for index, (role, text) in enumerate(turns):
        value = f"<image>\n{text}" if index == 0 else text
        conversations.append({"from": role, "value": value})
    return {
        "id": triple.triple_id,
        "image": triple.image,
        "conversations": conversations,
        "mask_files": mask_files_in_token_order(turns, triple),
        "modality": triple.modality,
    }


def build_grounding_conversations(
    triples: list[Triple],
    generator: ConversationGenerator,
    output: Path,
    work_dir: Path | None = None,
    progress: bool = True,
) -> GenerationReport:
    """Write ``output`` (a JSON list of conversations); resumable through ``work_dir``."""
    output = Path(output)
    work_dir = Path(work_dir) if work_dir else output.with_suffix(".work")
    untokened = [t.triple_id for t in triples if any(r.region_token is None for r in t.regions)]
    if untokened:
        raise ValueError(
            f"{len(untokened)} triple(s) have regions without a region token (first: {untokened[0]}); "
            "assign tokens with the codebook first (grounding-data stage) or pass a token map"
        )
    jobs = []
    for triple in triples:

        def make(triple=triple) -> dict[str, Any]:
            turns = generator.conversation(triple)
            problems = validate_conversation(turns, triple)
            if problems:  # a generator without its own validation (or a buggy one) is caught here
                raise GenerationRejected(f"{triple.triple_id}: {'; '.join(problems)}")
            return conversation_entry(triple, turns)

        jobs.append((triple.triple_id, make))
    return run_generation(jobs, work_dir, output, "grounding conversations", progress)
