"""LLM generator: asks an OpenAI-compatible endpoint, validates, retries with feedback.

The prompts (written for this project) give the model the annotation only: modality, region
names, descriptions and region codes, and ask for JSON. A reply that fails validation is sent
back with its problems listed; after ``max_attempts`` the template generator's text is used
(``fallback``) or the item is rejected (``GenerationRejected``) and the caller records it.
"""

from __future__ import annotations

import json
import logging

from medsight.data.datagen.llm_client import ChatClient, parse_json_reply
from medsight.data.datagen.records import RegionInfo, Triple
from medsight.data.datagen.templates import TemplateGenerator
from medsight.data.datagen.validation import validate_conversation, validate_diagseg_qa

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You write training and evaluation data for a medical vision-language model. You never see "
    "the image: you only get its annotation (modality, annotated regions, their descriptions and "
    "region codes). Stay strictly within the annotation: do not add findings, sizes, sides or "
    "organs it does not state. Reply with one JSON object and nothing else."
)

DIAGSEG_INSTRUCTIONS = (
    "Write one diagnosis-then-segmentation question and its answer for this image.\n"
    "- The question asks what the abnormality is and to segment it. It must NOT name or hint at "
    "the finding ({finding}); the model has to infer it from the image.\n"
    "- The answer states the diagnosis ({finding}) consistently with the description, then "
    "grounds it by writing the region code {token} right after the finding.\n"
    "- Use no other region codes.\n"
    'Reply as {{"question": "...", "answer": "..."}}.'
)

CONVERSATION_INSTRUCTIONS = (
    "Write a natural multi-turn conversation (2 to 4 exchanges) between a user asking about this "
    "image and an assistant that answers and grounds what it mentions.\n"
    "- Whenever the assistant mentions an annotated region, it writes that region's code right "
    "after the region's name, e.g. 'the liver [C0_3]'. Use every code listed below at least once "
    "and no other code. The user never writes codes.\n"
    "- Only state what the annotation supports.\n"
    'Reply as {{"conversations": [{{"from": "human", "value": "..."}}, {{"from": "gpt", "value": "..."}}, ...]}}.'
)


class GenerationRejected(RuntimeError):
    """No valid text after all attempts and no fallback; the message lists the last problems."""


def describe_triple(triple: Triple) -> str:
    regions = [
        {
            "name": r.class_name,
            "kind": "finding" if r.is_lesion else "structure",
            "description": r.description,
            "region_code": r.region_token,
        }
        for r in triple.regions
    ]
    return json.dumps({"modality": triple.modality, "regions": regions}, indent=1)


class LLMGenerator:
    name = "llm"

    def __init__(self, client: ChatClient, max_attempts: int = 3, fallback: TemplateGenerator | None = None, temperature: float = 0.7):
        self.client = client
        self.max_attempts = max_attempts
        self.fallback = fallback
        self.temperature = temperature
        self.fallbacks_used = 0

    def _ask(self, task: str, triple: Triple, parse, validate) -> object:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Annotation:\n{describe_triple(triple)}\n\n{task}"},
        ]
        problems: list[str] = []
        for _ in range(self.max_attempts):
            reply = self.client.complete(messages, temperature=self.temperature)
            try:
                value = parse(parse_json_reply(reply))
            except (ValueError, KeyError, TypeError) as error:
                problems = [f"reply is not in the requested JSON shape ({error})"]
            else:
                problems = validate(value)
                if not problems:
                    return value
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "That reply has problems:\n- " + "\n- ".join(problems) + "\nWrite it again, fixing them."},
            ]
        raise GenerationRejected(f"{triple.triple_id}: {'; '.join(problems)}")

    def diagseg_qa(self, triple: Triple, region: RegionInfo) -> tuple[str, str]:
        task = DIAGSEG_INSTRUCTIONS.format(finding=region.class_name, token=region.region_token or "(none: write no code)")
        try:
            return self._ask(
                task,
                triple,
                lambda reply: (str(reply["question"]), str(reply["answer"])),
                lambda qa: validate_diagseg_qa(qa[0], qa[1], region, triple),
            )
        except GenerationRejected as error:
            if self.fallback is None:
                raise
            logger.warning("%s; using the template text instead", error)
            self.fallbacks_used += 1
            return self.fallback.diagseg_qa(triple, region)

    def conversation(self, triple: Triple) -> list[tuple[str, str]]:
        def parse(reply: dict) -> list[tuple[str, str]]:
            turns = reply["conversations"]
            return [(str(turn["from"]), str(turn["value"])) for turn in turns]

        try:
            return self._ask(CONVERSATION_INSTRUCTIONS, triple, parse, lambda turns: validate_conversation(turns, triple))
        except GenerationRejected as error:
            if self.fallback is None:
                raise
            logger.warning("%s; using the template text instead", error)
            self.fallbacks_used += 1
            return self.fallback.conversation(triple)
