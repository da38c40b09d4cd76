"""What ``prepare`` found wrong: every problem with its file and reason, streamed to disk.

At a million images the problem list itself can be large, so each problem goes to a JSON-lines
file as it is found; the report keeps counts by reason and the first examples. Where reports
live: ``<dest>/reports/<release>.json`` (+ ``<release>.problems.jsonl``), written on success and
on failure alike, so a stopped run still tells what stopped it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from medsight.data.errors import DataError
from medsight.io_utils import atomic_write_json

REPORTS_DIR = "reports"
EXAMPLES_KEPT = 200


class PrepareError(DataError):
    """Too many bad entries: the release (or the options) need attention before training."""


def report_path(dest: Path, release: str) -> Path:
    return Path(dest) / REPORTS_DIR / f"{release}.json"


def problems_path(dest: Path, release: str) -> Path:
    return Path(dest) / REPORTS_DIR / f"{release}.problems.jsonl"


@dataclass
class ProblemLog:
    """Problems (the entry was dropped or cut) and skips (dropped by policy, e.g. >16 masks)."""

    stream: IO[str] | None = None
    root: str = ""  # paths under it are reported relative to it (the dataset moves as a whole)
    by_reason: Counter = field(default_factory=Counter)
    skipped_by_reason: Counter = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    skipped_examples: list[dict[str, str]] = field(default_factory=list)

    def _write(self, record: dict[str, str]) -> None:
        if self.stream is not None:
            self.stream.write(json.dumps(record) + "\n")

    def _file(self, file: str) -> str:
        return file[len(self.root) + 1:] if self.root and file.startswith(self.root + "/") else file

    def problem(self, file: str, reason: str, action: str, kind: str, **context: str) -> None:
        record = {"file": self._file(file), "reason": reason, "action": action, "kind": kind, **context}
        self.by_reason[kind] += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(record)
        self._write(record)

    def skip(self, file: str, reason: str, kind: str, **context: str) -> None:
        record = {"file": self._file(file), "reason": reason, "action": "skipped", "kind": kind, **context}
        self.skipped_by_reason[kind] += 1
        if len(self.skipped_examples) < EXAMPLES_KEPT:
            self.skipped_examples.append(record)
        self._write(record)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems_by_kind": dict(sorted(self.by_reason.items())),
            "skipped_by_kind": dict(sorted(self.skipped_by_reason.items())),
            "problems": self.examples,
            "skipped_files": self.skipped_examples,
        }


def bad_fraction(bad: int, seen: int) -> float:
    return bad / seen if seen else 0.0


def finish_report(dest: Path, release: str, report: dict[str, Any], max_bad_fraction: float) -> None:
    """Write the report; raise ``PrepareError`` (naming it) when the bad share is over the limit."""
    path = report_path(dest, release)
    over = report["bad_fraction"] > max_bad_fraction
    report = {**report, "status": "failed" if over else "ok", "max_bad_fraction": max_bad_fraction}
    atomic_write_json(path, report)
    if over:
        kinds = ", ".join(f"{kind}: {n}" for kind, n in Counter(report["problems_by_kind"]).most_common(4))
        raise PrepareError(
            f"{report['source']}: {report['bad']} of {report['seen']} entries are bad "
            f"({report['bad_fraction']:.2%} > max_bad_fraction {max_bad_fraction:.2%}; {kinds}); "
            f"nothing was written except the report {path} (every problem: {problems_path(dest, release)}). "
            "Fix or remove the files it lists, or raise --max-bad-fraction"
        )
