"""Streaming data for every stage: per-rank samplers, loaders with workers, batches on the device.

Nothing here holds a split in memory: a ``DataLoader`` reads samples from disk (in worker
processes when ``num_workers`` > 0) in an order a ``DistributedSampler`` decides per epoch, and
``to_device`` moves each batch to the rank's device and the model's dtype inside the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from medsight.train import distributed


class ResumableSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (seeded shuffle per epoch; rank r takes every W-th index of
    the permutation, padded so every rank gets as many) that can start part-way into an epoch.

    Rank r's j-th sample is position j*W + r of the epoch's permutation, so global batch k is
    the same set of samples whatever the world size: the union of the ranks' k-th batches at
    W ranks equals batch k of one process with a W-times larger batch.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                         shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def start(self, epoch: int, skip_samples: int) -> None:
        self.set_epoch(epoch)
        self.skip = skip_samples

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler[int]):
    """Evaluation: rank r reads indices r, r+W, r+2W, ... in order (no shuffle, no repeats
    unless ``pad``: then every rank gets ceil(N/W) indices, the extra ones repeating index 0, for
    code whose forward passes are collective (ZeRO-3). ``valid(i)`` tells real ones apart)."""

    def __init__(self, length: int, pad: bool = False):
        self.length = length
        self.rank, self.world = distributed.rank(), distributed.world_size()
        per_rank = -(-length // self.world)
        self.positions = list(range(self.rank, per_rank * self.world if pad else length, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(p if p < self.length else 0 for p in self.positions)

    def __len__(self) -> int:
        return len(self.positions)

    def valid(self, i: int) -> bool:
        """Whether this rank's i-th sample is a real one (not padding)."""
        return self.positions[i] < self.length

    def global_index(self, i: int) -> int:
        return self.positions[i]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler,
    collate_fn: Callable[[list], Any],
    num_workers: int = 0,
) -> DataLoader:
    """Workers decode in parallel; pinned host memory when batches go to a GPU."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        # Workers outlive an epoch; the sampler (in this process) decides each epoch's order.
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )


class EpochBatches:
    """``make_batches(epoch, skip)`` for the training loop over a loader with a ResumableSampler."""

    def __init__(self, loader: DataLoader):
        if not isinstance(loader.sampler, ResumableSampler):
            raise TypeError("EpochBatches needs a loader whose sampler is a ResumableSampler")
        self.loader = loader

    @property
    def steps_per_epoch(self) -> int:
        sampler: ResumableSampler = self.loader.sampler
        return -(-sampler.num_samples // self.loader.batch_size)

    def __call__(self, epoch: int, skip_batches: int) -> Iterator:
        self.loader.sampler.start(epoch, skip_batches * self.loader.batch_size)
        return iter(self.loader)


def to_device(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """``value`` (a batch: tensors, lists, dicts) on ``device``; floating tensors cast to
    ``dtype`` (the model's), integer ones (ids, labels) left as they are."""
    if torch.is_tensor(value):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype, non_blocking=True)
        return value.to(device=device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and value and any(torch.is_tensor(v) for v in value):
        return type(value)(to_device(item, device, dtype) for item in value)
    return value


def positions(batch_index: int, batch_size: int, count: int) -> Sequence[int]:
    """This rank's sample numbers in batch ``batch_index`` of an evaluation loader."""
    return range(batch_index * batch_size, batch_index * batch_size + count)
