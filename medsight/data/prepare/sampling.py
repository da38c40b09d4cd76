"""Deterministic, order-free choices over huge indexes: a seeded hash per key.

A key's rank never depends on which other entries exist, so adding a sub-dataset or a file does
not move anything already chosen, and nothing needs the whole index in memory.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def stable_rank(seed: int, *parts: str) -> int:
    """A 64-bit rank of ``parts`` under ``seed`` (same inputs, same rank, on every machine)."""
    text = "\x1f".join((str(seed), *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def carve_count(total: int, fraction: float) -> int:
    """How many of ``total`` entries go to a carved split: at least one when there are two or more."""
    if fraction <= 0 or total < 2:
        return 0
    return min(total - 1, max(1, round(total * fraction)))


def carve(keys: list[str], fraction: float, seed: int, salt: str) -> set[str]:
    """The ``carve_count`` keys of smallest rank (one sub-dataset's train images -> its val split)."""
    count = carve_count(len(keys), fraction)
    ranked = sorted(keys, key=lambda key: stable_rank(seed, salt, key))
    return set(ranked[:count])


def in_fraction(seed: int, fraction: float, *parts: str) -> bool:
    """Membership of a streamed entry in a carved share, decided by its rank alone."""
    return stable_rank(seed, *parts) < fraction * 2**64


def smallest_ranked(items: Iterable[tuple[str, T]], count: int, seed: int, salt: str) -> list[T]:
    """The ``count`` items of smallest rank, in rank order: a uniform seeded sample drawn from a
    stream while holding only ``count`` items."""
    heap: list[tuple[int, str, T]] = []  # max-heap by negated rank
    for key, item in items:
        rank = stable_rank(seed, salt, key)
        entry = (-rank, key, item)
        if len(heap) < count:
            heapq.heappush(heap, entry)
        elif rank < -heap[0][0]:
            heapq.heapreplace(heap, entry)
    return [item for _, _, item in sorted(heap, key=lambda e: (-e[0], e[1]))]


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
