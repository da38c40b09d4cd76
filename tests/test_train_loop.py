"""The shared training loop and its checkpoints: exact resume, NaN guard, checksums, fallback to
the previous checkpoint, a resume point at the end of training, and a clear error when none is
usable."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from medsight.config.schema import TrainConfig
from medsight.train.checkpoint import KEEP, CheckpointDir, CheckpointError
from medsight.train.engine import TorchEngine
from medsight.train.loop import NonFiniteLossError, run_training, seeded_order
from medsight.train.tracker import HistoryRecorder, NullTracker

DATA_X = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
DATA_Y = DATA_X @ torch.tensor([1.0, -2.0, 0.5, 3.0])


def _batches(epoch: int, skip: int):
    order = seeded_order(len(DATA_X), 0, epoch)
    for start in range(skip * 8, len(order), 8):
        idx = order[start : start + 8]
        yield DATA_X[idx], DATA_Y[idx]


def _train(workdir, config, crash_at: int | None = None, tracker=None):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    engine = TorchEngine(model, config)
    calls = {"n": 0}

    def step(batch):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        x, y = batch
        return {"loss": ((engine.model(x).squeeze(-1) - y) ** 2).mean()}

    result = run_training(
        name="toy", engine=engine, make_batches=_batches, steps_per_epoch=4, step_fn=step,
        config=config, workdir=workdir, tracker=tracker or NullTracker(),
    )
    return model, result


def test_crash_then_resume_equals_uninterrupted_run(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=3, warmup_ratio=0.0)
    reference, _ = _train(tmp_path / "ref", config)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "crash", config, crash_at=8)  # dies during step 8, last checkpoint at 6
    steps = [step for step, _ in CheckpointDir(tmp_path / "crash").complete()]
    assert steps == [6, 3]
    resumed, result = _train(tmp_path / "crash", config)
    assert result.resumed_from == 6 and result.steps == 12
    assert torch.allclose(resumed.weight, reference.weight, atol=1e-6)


def test_keeps_the_last_two_and_a_resume_point_at_the_end_of_training(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=2, warmup_ratio=0.0)
    _train(tmp_path, config)
    # 12 steps, a checkpoint every 2 and one at the end; only the last KEEP survive.
    assert [step for step, _ in CheckpointDir(tmp_path).complete()] == [12, 10][:KEEP]
    # A rerun (e.g. after final validation failed) trains no step again.
    _, result = _train(tmp_path, config)
    assert result.resumed_from == 12 and result.steps == 12


def _corrupt(path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else bytes(len(data)))


@pytest.mark.parametrize("how", ["truncate", "random"])
def test_corrupt_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog, how):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=3, warmup_ratio=0.0)
    reference, _ = _train(tmp_path / "ref", config)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run", config, crash_at=8)
    latest = CheckpointDir(tmp_path / "run").complete()[0][1]
    _corrupt(latest / "optimizer.safetensors", how)
    with caplog.at_level(logging.WARNING):
        resumed, result = _train(tmp_path / "run", config)
    assert f"{latest / 'optimizer.safetensors'}" in caplog.text
    assert "truncated" in caplog.text if how == "truncate" else "checksum mismatch" in caplog.text
    assert result.resumed_from == 3  # the previous checkpoint
    assert torch.allclose(resumed.weight, reference.weight, atol=1e-6)


def test_no_usable_checkpoint_is_an_error_naming_the_files(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=3, warmup_ratio=0.0)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, config, crash_at=8)
    for _, directory in CheckpointDir(tmp_path).complete():
        (directory / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"step-00000006/manifest.json: unreadable.*--force"):
        _train(tmp_path, config)


def test_a_save_killed_half_way_leaves_only_a_staging_folder(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=3, warmup_ratio=0.0)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, config, crash_at=5)
    staging = CheckpointDir(tmp_path).staging(6)
    staging.mkdir()
    (staging / "trainable.safetensors").write_bytes(b"half a file")  # what a kill -9 leaves
    _, result = _train(tmp_path, config)
    assert result.resumed_from == 3 and not staging.exists()


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=2, warmup_ratio=0.0)
    model = nn.Linear(4, 1)
    engine = TorchEngine(model, config)
    calls = {"n": 0}

    def exploding(batch):
        calls["n"] += 1
        x, y = batch
        loss = ((model(x).squeeze(-1) - y) ** 2).mean()
        return {"loss": loss * float("nan") if calls["n"] == 5 else loss}

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 4.*checkpoints"):
        run_training(name="toy", engine=engine, make_batches=_batches, steps_per_epoch=4,
                     step_fn=exploding, config=config, workdir=tmp_path, tracker=NullTracker())
    (step, directory), *_ = CheckpointDir(tmp_path).complete()
    assert step == 4 and CheckpointDir.verify(directory) is None


def test_resumed_history_holds_each_step_once(tmp_path):
    config = TrainConfig(epochs=3, lr=0.05, checkpoint_every=3, warmup_ratio=0.0, log_every=1)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, config, crash_at=8, tracker=HistoryRecorder(NullTracker(), tmp_path))
    _train(tmp_path, config, tracker=HistoryRecorder(NullTracker(), tmp_path))
    steps = [json.loads(line)["step"] for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("content", [b"", b"\x00" * 40, b"random bytes, not safetensors"])
def test_unreadable_weights_file_is_named(tmp_path, content):
    from medsight.model.weights import load_weights, save_weights

    path = tmp_path / "modules" / "perceiver.safetensors"
    save_weights(nn.Linear(4, 1), path)
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        load_weights(nn.Linear(4, 1), path)
