"""Deterministic wording choice for generated text: a hash of (seed, key), not global random
state, so the same record always gets the same sentence and generated data caches by content."""

from __future__ import annotations

import hashlib


def stable_choice(options: tuple[str, ...], key: str, seed: int = 0) -> str:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]
