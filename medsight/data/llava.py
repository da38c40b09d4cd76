"""LLaVA conversation JSON: PubMedVision alignment/instruct, grounding data, LLaVA-Med VQA tests.

Format: a list of ``{id, image (path or list of paths), conversations: [{from, value}, ...]}``,
optionally with ``mask_files`` (masks of the answer's region tokens, in token order),
``answer_type`` and ``modality`` (free text in PubMedVision: metadata, not a label); any other
key is kept in ``extra`` and written back. ``.jsonl`` files (one entry a line, as ``medsight data
prepare pubmedvision`` writes) are read line by line. Multi-image entries keep every image.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsight.data.image_io import DataError
from medsight.data.safe_paths import prepared_roots, resolve_under
from medsight.io_utils import atomic_write_json, missing_reason, read_json

HUMAN, GPT = "human", "gpt"
# Other spellings of the two roles seen in public conversation files.
_ROLE_ALIASES = (("human", HUMAN), ("user", HUMAN), ("gpt", GPT), ("assistant", GPT))
_KNOWN_KEYS = frozenset({"id", "image", "conversations", "mask_files", "answer_type", "modality"})


@dataclass
class Conversation:
    id: str
    image_paths: list[Path]
    turns: list[tuple[str, str]]  # (role, text); role "human" or "gpt", alternating from human
    mask_paths: list[Path] = field(default_factory=list)  # in region-token order
    answer_type: str | None = None  # as written in the file ("closed"/"CLOSED"/"open"...)
    modality: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The file it was read from, for messages; not written back and not part of equality.
    source: Path | None = field(default=None, compare=False)


def _role(raw: Any, where: str) -> str:
    for alias, role in _ROLE_ALIASES:
        if raw == alias:
            return role
    raise DataError(f"{where}: unknown role {raw!r}; expected 'human' or 'gpt'")


def _path_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise DataError(f"{where}: expected a path or a list of paths, got {type(value).__name__}")


def _turns(value: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of turns")
    turns: list[tuple[str, str]] = []
    for t, turn in enumerate(value):
        here = f"{where}[{t}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{here}: a turn needs keys 'from' and 'value'")
        if not isinstance(turn["value"], str):
            raise DataError(f"{here}.value: expected a string")
        role = _role(turn["from"], f"{here}.from")
        expected = HUMAN if t % 2 == 0 else GPT
        if role != expected:
            raise DataError(f"{here}.from: expected {expected!r} (turns alternate, human first)")
        turns.append((role, turn["value"]))
    return turns


def _optional_str(entry: dict[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}.{key}: expected a string, got {type(value).__name__}")
    return value


def _parse_entry(entry: Any, where: str, image_root: Path, source: Path | None = None,
                 allowed: tuple[Path, ...] = ()) -> Conversation:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    if "id" not in entry:
        raise DataError(f"{where}: missing key 'id'")
    if "conversations" not in entry:
        raise DataError(f"{where}: missing key 'conversations'")
    images = _path_list(entry["image"], f"{where}.image") if "image" in entry else []
    masks = _path_list(entry["mask_files"], f"{where}.mask_files") if "mask_files" in entry else []
    return Conversation(
        id=str(entry["id"]),
        image_paths=[resolve_under(image_root, image, f"{where}.image", allowed) for image in images],
        turns=_turns(entry["conversations"], f"{where}.conversations"),
        mask_paths=[resolve_under(image_root, mask, f"{where}.mask_files", allowed) for mask in masks],
        answer_type=_optional_str(entry, "answer_type", where),
        modality=_optional_str(entry, "modality", where),
        extra={key: value for key, value in entry.items() if key not in _KNOWN_KEYS},
        source=source,
    )


def _missing_file(conversation: Conversation, where: str) -> str | None:
    references = (("image", conversation.image_paths), ("mask_files", conversation.mask_paths))
    for key, paths in references:
        for path in paths:
            if not path.is_file():
                return f"{where}.{key}: referenced file {missing_reason(path)}: {path}"
    return None


def read_conversations(json_path: Path, image_root: Path,
                       on_missing: str = "error") -> list[Conversation]:
    """Parse and validate a conversation file; image/mask paths are resolved under image_root
    (or the release folders a prepared dataset there indexes in place).

    A referenced file that does not exist raises (``on_missing="error"``) or drops that entry
    with one warning (``"skip"``; MeCoVQA-G references some masks that were never released).
    """
    if on_missing not in ("error", "skip"):
        raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
    json_path, image_root = Path(json_path), Path(image_root)
    allowed = prepared_roots(image_root)
    conversations: list[Conversation] = []
    dropped: list[str] = []
    for index, entry in _entries(json_path):
        where = f"{json_path}: entry {index}"
        conversation = _parse_entry(entry, where, image_root, json_path, allowed)
        problem = _missing_file(conversation, where)
        if problem is None:
            conversations.append(conversation)
        elif on_missing == "skip":
            dropped.append(problem)
        else:
            raise DataError(problem)
    if dropped:
        warnings.warn(f"dropped {len(dropped)} conversation(s) with missing files; first: "
                      f"{dropped[0]}", stacklevel=2)
    return conversations


def _entries(json_path: Path) -> Iterator[tuple[int, object]]:
    if json_path.suffix != ".jsonl":
        entries = read_json(json_path, DataError, "conversation file does not exist")
        if not isinstance(entries, list):
            raise DataError(f"{json_path}: expected a JSON list of conversations")
        yield from enumerate(entries)
        return
    if not json_path.is_file():
        raise DataError(f"{json_path}: conversation file does not exist")
    with open(json_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{json_path}:{number + 1}: invalid JSON ({error})") from None


def _relative(path: Path, image_root: Path | None) -> str:
    if image_root is None:
        return str(path)
    try:
        return Path(path).relative_to(image_root).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not under image_root {image_root}") from None


def conversation_to_json(conversation: Conversation, image_root: Path | None = None) -> dict:
    """The LLaVA JSON object of one conversation (paths relative to image_root if given)."""
    entry: dict[str, Any] = dict(conversation.extra)
    entry["id"] = conversation.id
    images = [_relative(path, image_root) for path in conversation.image_paths]
    if images:
        entry["image"] = images[0] if len(images) == 1 else images
    entry["conversations"] = [{"from": role, "value": text} for role, text in conversation.turns]
    if conversation.mask_paths:
        entry["mask_files"] = [_relative(path, image_root) for path in conversation.mask_paths]
    if conversation.answer_type is not None:
        entry["answer_type"] = conversation.answer_type
    if conversation.modality is not None:
        entry["modality"] = conversation.modality
    return entry


def write_conversations(path: Path, conversations: list[Conversation],
                        image_root: Path | None = None) -> None:
    """Atomically write a conversation file that ``read_conversations`` reads back equal."""
    atomic_write_json(Path(path), [conversation_to_json(c, image_root) for c in conversations])
