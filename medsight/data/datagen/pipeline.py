"""The generation loop both builders share: resumable, with a progress bar and a reject list."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medsight.data.datagen.jsonl_store import JsonlStore
from medsight.data.datagen.llm_generator import GenerationRejected

logger = logging.getLogger(__name__)


@dataclass
class GenerationReport:
    output: Path
    written: int  # items in the final file
    generated_now: int  # items produced by this run (the rest were resumed)
    rejected: int  # items that failed validation every time (listed in rejected.jsonl)


def run_generation(
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]],
    work_dir: Path,
    output: Path,
    desc: str,
    progress: bool = True,
) -> GenerationReport:
    """Run ``jobs`` (key, make_record) not already in ``work_dir/items.jsonl``; write ``output``.

    Rerunning after an interruption skips finished keys, so only the remainder hits the endpoint.
    """
    work_dir = Path(work_dir)
    store = JsonlStore(work_dir / "items.jsonl")
    rejected = JsonlStore(work_dir / "rejected.jsonl")
    done_before = sum(1 for key, _ in jobs if key in store or key in rejected)
    if done_before:
        logger.info("%s: resuming, %d of %d items already done", desc, done_before, len(jobs))
    generated = 0
    for key, make in tqdm(jobs, desc=desc, unit="item", disable=not progress):
        if key in store or key in rejected:
            continue
        try:
            record = make()
        except GenerationRejected as error:
            rejected.append({"key": key, "reason": str(error)})
            continue
        store.append({"key": key, **record})
        generated += 1
    order = [key for key, _ in jobs if key in store]
    store.finalize(output, order)
    if len(rejected):
        logger.warning("%s: %d item(s) rejected by validation; see %s", desc, len(rejected), rejected.path)
    return GenerationReport(Path(output), len(order), generated, len(rejected))
