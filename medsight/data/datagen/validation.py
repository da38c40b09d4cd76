"""Checks that a generated item stays consistent with its mask and description.

An LLM can drift: name a finding the image does not have, put a lesion on the wrong side,
invent a region code, or give the diagnosis away in a diagnosis-then-segment question. Each
check returns human-readable problems (empty = valid); generators retry or fall back on them.
"""

from __future__ import annotations

import re

from medsight.data.datagen.records import RegionInfo, Triple
from medsight.data.answer_text import answer_tokens
from medsight.data.region_tokens import find_region_tokens

# Words that locate a finding; naming one whose opposite is in the description contradicts it.
_OPPOSITES = {"left": "right", "right": "left", "upper": "lower", "lower": "upper"}


def _words(text: str) -> set[str]:
    return set(answer_tokens(text))


def _mentions(text: str, term: str) -> bool:
    wanted = answer_tokens(term)
    words = answer_tokens(text)
    return bool(wanted) and any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))


def _without_names(text: str, names: set[str]) -> str:
    """Text with structure names removed: 'left lung' names a structure, it places nothing."""
    lowered = text.lower()
    for name in sorted(names, key=len, reverse=True):
        lowered = re.sub(r"\b" + re.escape(name.lower()) + r"\b", " ", lowered)
    return lowered


def location_conflicts(text: str, description: str, names: set[str] = frozenset()) -> list[str]:
    said, known = _words(_without_names(text, names)), _words(_without_names(description, names))
    return [word for word, opposite in _OPPOSITES.items() if word in said and opposite in known and word not in known]


def foreign_findings(text: str, triple: Triple) -> list[str]:
    """Lesion kinds named in ``text`` that the image does not contain."""
    present = {r.class_name for r in triple.lesions}
    return sorted(kind for kind in set(triple.findings) - present if _mentions(text, kind))


def validate_diagseg_qa(question: str, answer: str, region: RegionInfo, triple: Triple) -> list[str]:
    problems = []
    if not question.strip() or not answer.strip():
        return ["question or answer is empty"]
    if _mentions(question, region.class_name):
        problems.append(f"question gives the diagnosis away ({region.class_name!r}); it must be inferred from the image")
    if not _mentions(answer, region.class_name):
        problems.append(f"answer does not name the diagnosis {region.class_name!r}")
    foreign = foreign_findings(answer, triple)
    if foreign:
        problems.append(f"answer names findings not in the image: {', '.join(foreign)}")
    names = {r.class_name for r in triple.regions}
    conflicts = location_conflicts(answer, region.description, names)
    if conflicts:
        problems.append(f"answer places the finding '{', '.join(conflicts)}' but the description says otherwise")
    other_structures = [r.class_name for r in triple.regions if not r.is_lesion and r.class_name != region.host]
    if region.host and not _mentions(answer, region.host) and any(_mentions(answer, s) for s in other_structures):
        problems.append(f"answer puts the finding outside its structure ({region.host!r})")
    tokens = find_region_tokens(answer)
    expected = [region.region_token] if region.region_token else []
    if tokens != expected:
        problems.append(f"answer must carry exactly the region token(s) {expected or 'none'}, found {tokens or 'none'}")
    if find_region_tokens(question):
        problems.append("question must not contain region tokens")
    return problems


def _last_mention(text: str, term: str) -> int:
    """Character offset of the last mention of ``term`` in ``text`` (-1 if none)."""
    best = -1
    for match in re.finditer(r"\b" + re.escape(term.lower()) + r"\b", text.lower()):
        best = match.start()
    return best


def token_occurrences(turns: list[tuple[str, str]], triple: Triple) -> list[tuple[int, str, RegionInfo | None]]:
    """(turn index, token, region) for each region token in the gpt turns, in order.

    A token unique to one region maps to it. A token several regions share (the one-[SEG]
    ablation) maps to the region named closest before it in the same turn.
    """
    owners: dict[str, list[RegionInfo]] = {}
    for region in triple.regions:
        if region.region_token:
            owners.setdefault(region.region_token, []).append(region)
    found = []
    for index, (role, text) in enumerate(turns):
        if role != "gpt":
            continue
        for match in re.finditer(r"\[C\d+_\d+\]|\[SEG\]", text):
            candidates = owners.get(match.group(0), [])
            region = candidates[0] if len(candidates) == 1 else None
            if len(candidates) > 1:
                before = text[: match.start()]
                scored = [(_last_mention(before, r.class_name), r) for r in candidates]
                position, best = max(scored, key=lambda pair: pair[0])
                region = best if position >= 0 else None
            found.append((index, match.group(0), region))
    return found


def validate_conversation(turns: list[tuple[str, str]], triple: Triple) -> list[str]:
    """A grounding conversation: alternating turns; every region code used, only known ones,
    each next to its region's name; nothing the annotation does not support."""
    problems = []
    if not turns or len(turns) % 2:
        return ["conversation must have an even number of turns (human, gpt, ...)"]
    for index, (role, text) in enumerate(turns):
        expected_role = "human" if index % 2 == 0 else "gpt"
        if role != expected_role:
            problems.append(f"turn {index} is from {role!r}, expected {expected_role!r}")
        if not text.strip():
            problems.append(f"turn {index} is empty")
        if role == "human" and find_region_tokens(text):
            problems.append(f"turn {index}: the user cannot know region codes ({', '.join(find_region_tokens(text))})")
    used: set[int] = set()
    for index, token, region in token_occurrences(turns, triple):
        if region is None:
            problems.append(f"turn {index}: region token {token} belongs to no region of this image (or names none)")
            continue
        used.add(id(region))
        if not _mentions(turns[index][1], region.class_name):
            problems.append(f"turn {index}: {token} is used without naming its region ({region.class_name!r})")
    for index, (role, text) in enumerate(turns):
        if role != "gpt":
            continue
        foreign = foreign_findings(text, triple)
        if foreign:
            problems.append(f"turn {index}: names findings not in the image: {', '.join(foreign)}")
        for region in triple.regions:
            if _mentions(text, region.class_name):
                names = {r.class_name for r in triple.regions}
                conflicts = location_conflicts(_sentence_with(text, region.class_name), region.description, names)
                if conflicts:
                    problems.append(f"turn {index}: places the {region.class_name} '{', '.join(conflicts)}' against its description")
    missing = sorted({r.region_token for r in triple.regions if r.region_token and id(r) not in used})
    if missing:
        problems.append(f"region token(s) never used: {', '.join(missing)}")
    return problems


def _sentence_with(text: str, term: str) -> str:
    """The sentence of ``text`` that names ``term`` (location words elsewhere may be about other regions)."""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if _mentions(sentence, term):
            return sentence
    return text


def mask_files_in_token_order(turns: list[tuple[str, str]], triple: Triple) -> list[str]:
    """One mask per region-token occurrence in the gpt turns, in order (how stages 4-5 read them)."""
    return [region.mask_file for _, _, region in token_occurrences(turns, triple) if region is not None]
