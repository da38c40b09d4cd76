"""Append-only JSONL with resume: an interrupted generation run continues where it stopped.

Each finished item is one line, flushed and fsync'ed before the next request, so at most the
item in flight is lost. A half-written last line (the process died mid-write) is dropped on
reopen. ``finalize`` writes the ordered JSON list atomically once every item is present.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from medsight.io_utils import atomic_write_json

logger = logging.getLogger(__name__)


class JsonlStore:
    def __init__(self, path: Path, key: str = "key") -> None:
        self.path = Path(path)
        self.key = key
        self.records: dict[str, dict[str, Any]] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        good: list[str] = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not line.endswith("\n"):
                    raise ValueError("no newline: the write was cut short")
            except (json.JSONDecodeError, ValueError):
                if number == len(lines):
                    logger.warning("%s: dropping a half-written last line (interrupted run)", self.path)
                    break
                raise ValueError(f"{self.path}:{number}: corrupt line in the middle of the file; delete it to regenerate") from None
            self.records[str(record[self.key])] = record
            good.append(line)
        if len(good) != len(lines):
            # Rewrite without the broken tail so the next append starts on a clean line.
            self.path.write_text("".join(good), encoding="utf-8")

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: dict[str, Any]) -> None:
        if self.key not in record:
            raise KeyError(f"record has no {self.key!r} field")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[str(record[self.key])] = record

    def finalize(self, target: Path, order: list[str], strip_key: bool = True) -> list[dict[str, Any]]:
        missing = [key for key in order if key not in self.records]
        if missing:
            raise ValueError(f"{self.path}: {len(missing)} item(s) not generated yet (first: {missing[0]}); rerun to resume")
        items = [dict(self.records[key]) for key in order]
        if strip_key:
            for item in items:
                item.pop(self.key, None)
        atomic_write_json(Path(target), items)
        return items
