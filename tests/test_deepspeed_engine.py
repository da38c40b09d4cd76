"""DeepSpeedEngine on one rank: skipping DeepSpeed's gradient all-reduce changes nothing.

Runs in a fresh interpreter: DeepSpeed's engine initialises a process group, which must not leak
into the tests that start their own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

PROBE = textwrap.dedent("""
    import json
    import torch
    from torch import nn
    from medsight.config.schema import DeepSpeedConfig, TrainConfig
    from medsight.train.engine import DeepSpeedEngine

    def train(reduce_anyway):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
        initial = module[0].weight.detach().clone()
        engine = DeepSpeedEngine(module, TrainConfig(batch_size=4, lr=1e-2, grad_clip=0.5), DeepSpeedConfig())
        skips = not engine._reduces  # one rank, ZeRO off: the engine skips the reduction
        engine._reduces = reduce_anyway
        data = torch.Generator().manual_seed(1)
        steps = 0
        for _ in range(4):
            x, y = torch.randn(4, 8, generator=data), torch.randint(3, (4,), generator=data)
            engine.backward(nn.functional.cross_entropy(engine.model(x), y))
            steps += bool(engine.step())  # every micro-batch is still an optimizer step
        return skips, steps, initial, [p.detach().clone() for p in module.parameters()]

    skips, steps, initial, skipped = train(False)
    _, _, _, reduced = train(True)
    print("RESULT=" + json.dumps({
        "skips": skips, "steps": steps, "trained": not torch.equal(initial, skipped[0]),
        "equal": all(torch.equal(a, b) for a, b in zip(skipped, reduced)),
    }))
""")


def test_one_rank_without_the_all_reduce_trains_bit_for_bit_the_same(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT="))
    result = json.loads(line.removeprefix("RESULT="))
    assert result == {"skips": True, "steps": 4, "trained": True, "equal": True}
