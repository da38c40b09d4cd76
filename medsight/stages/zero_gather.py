"""Full (un-partitioned) parameters for saving after ZeRO-3 training; a no-op below stage 3."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from collections.abc import Iterator

from torch import nn


@contextmanager
def gathered_parameters(module: nn.Module, zero_stage: int) -> Iterator[None]:
    if zero_stage < 3:
        with nullcontext():
            yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield
