"""The shared training loop: NaN guard keeps the last good checkpoint, crash -> exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsight.config.schema import TrainConfig
from medsight.train.checkpoint import RESUME_DIR, load_resume_state
from medsight.train.engine import TorchEngine
from medsight.train.loop import NonFiniteLossError, run_training, seeded_order
from medsight.train.tracker import NullTracker

DATA_X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
DATA_Y = DATA_X @ torch.tensor([1.0, -2.0, 0.5, 3.0])


def _batches(epoch: int, seed: int = 0):
    order = seeded_order(len(DATA_X), seed, epoch)
    for start in range(0, len(order), 8):
        idx = order[start : start + 8]
        yield DATA_X[idx], DATA_Y[idx]


def _train(workdir, config, step_fn=None, crash_at: int | None = None):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    engine = TorchEngine(model, config)
    calls = {"n": 0}

    def default_step(batch):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        x, y = batch
        return {"loss": ((model(x).squeeze(-1) - y) ** 2).mean()}

    result = run_training(
        name="toy", module=model, engine=engine, make_batches=_batches, steps_per_epoch=4,
        step_fn=step_fn or default_step, config=config, workdir=workdir, tracker=NullTracker(),
    )
    return model, result


def test_crash_then_resume_equals_uninterrupted_run(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=3, warmup_ratio=0.0)
    reference, _ = _train(tmp_path / "ref", config)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "crash", config, crash_at=8)  # dies during step 8, last checkpoint at 6
    assert (tmp_path / "crash" / RESUME_DIR / "progress.json").is_file()
    resumed, result = _train(tmp_path / "crash", config)
    assert result.resumed_from == 6 and result.steps == 12
    assert torch.allclose(resumed.weight, reference.weight, atol=1e-6)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=2, warmup_ratio=0.0)
    model = nn.Linear(4, 1)
    calls = {"n": 0}

    def exploding(batch):
        calls["n"] += 1
        x, y = batch
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        return {"loss": loss * float("nan") if calls["n"] == 5 else loss}

    engine = TorchEngine(model, config)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 4.*checkpoints/latest"):
        run_training(name="toy", module=model, engine=engine, make_batches=_batches, steps_per_epoch=4,
                     step_fn=exploding, config=config, workdir=tmp_path, tracker=NullTracker())
    fresh = nn.Linear(4, 1)
    progress = load_resume_state(tmp_path, fresh, TorchEngine(fresh, config).optimizer)
    assert progress is not None and progress.step == 4
    assert torch.isfinite(fresh.weight).all()
