"""Per-image visual features kept across steps of an LLM stage.

Stages 3-5 freeze the encoder and the perceiver, so an image's patch tokens, region queries and
pixel features are the same every time the image comes back (every epoch, and once per
conversation about it). Recomputing them was ~30% of a tiny-preset training step. The cache is
bounded in bytes and filled first-come: once full it simply stops adding, which keeps results
independent of eviction order. At full scale (336 px, d=256, millions of images) the budget is 0:
features are recomputed, as the paper does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class VisualContextCache:
    """Maps an image key (its path) to its per-image feature rows."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"visual cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._rows: dict[str, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_megabytes(cls, megabytes: int) -> VisualContextCache | None:
        return cls(megabytes * 1024 * 1024) if megabytes > 0 else None

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(
        self,
        keys: Sequence[str],
        images: torch.Tensor,  # [B, 3, S, S]
        compute: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],  # images -> tensors [B, ...]
    ) -> tuple[torch.Tensor, ...]:
        """Batched features for ``keys``; only the images not yet cached go through ``compute``."""
        if len(keys) != images.shape[0]:
            raise ValueError(f"{len(keys)} image keys for a batch of {images.shape[0]} images")
        missing = [i for i, key in enumerate(keys) if key not in self._rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, tuple[torch.Tensor, ...]] = {}
        if missing:
            computed = compute(images[missing])
            for row, index in enumerate(missing):
                # clone: a view would keep the whole batch tensor alive in the cache
                fresh[index] = tuple(t[row].detach().clone() for t in computed)
                self._store(keys[index], fresh[index])
        per_image = [fresh[i] if i in fresh else self._rows[keys[i]] for i in range(len(keys))]
        return tuple(torch.stack(parts) for parts in zip(*per_image))

    def _store(self, key: str, rows: tuple[torch.Tensor, ...]) -> None:
        size = sum(t.numel() * t.element_size() for t in rows)
        if self.used_bytes + size <= self.max_bytes:
            self._rows[key] = rows
            self.used_bytes += size
