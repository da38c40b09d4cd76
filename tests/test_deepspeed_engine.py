"""DeepSpeedEngine on one rank: skipping DeepSpeed's gradient all-reduce changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsight.config.schema import DeepSpeedConfig, TrainConfig

pytestmark = pytest.mark.slow


def _train(reduce_anyway: bool) -> list[torch.Tensor]:
    from medsight.train.engine import DeepSpeedEngine

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    engine = DeepSpeedEngine(module, TrainConfig(batch_size=4, lr=1e-2, grad_clip=0.5), DeepSpeedConfig())
    assert engine._reduces is False  # one rank, ZeRO off: the engine skips the reduction
    engine._reduces = reduce_anyway
    data = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(4, 8, generator=data), torch.randint(3, (4,), generator=data)
        engine.backward(nn.functional.cross_entropy(engine.model(x), y))
        assert engine.step()  # every micro-batch is still an optimizer step
    return [p.detach().clone() for p in module.parameters()]


def test_one_rank_without_the_all_reduce_trains_bit_for_bit_the_same():
    skipped, reduced = _train(reduce_anyway=False), _train(reduce_anyway=True)
    assert all(torch.equal(a, b) for a, b in zip(skipped, reduced))
    assert not torch.equal(skipped[0], _initial_first_weight())  # it did train


def _initial_first_weight() -> torch.Tensor:
    torch.manual_seed(0)
    return nn.Linear(8, 16).weight.detach()
