"""Live progress of a local pipeline: the loop's step events, one updating terminal line, and a
log that keeps one line per tenth of a stage's steps."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from medsight.config.schema import TrainConfig
from medsight.platform.progress_view import ProgressView
from medsight.train.engine import TorchEngine
from medsight.train.loop import run_training, seeded_order
from medsight.train.progress_events import EVENTS_ENV, StepEvents
from medsight.train.tracker import NullTracker


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_loop_writes_rate_limited_step_events(tmp_path: Path, monkeypatch) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    data = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    target = data.sum(-1)
    model = nn.Linear(4, 1)
    config = TrainConfig(epochs=5, lr=0.01, warmup_ratio=0.0, checkpoint_every=1000)

    def batches(epoch: int, skip: int):
        order = seeded_order(len(data), 0, epoch)
        for start in range(8 * skip, len(order), 8):
            yield data[order[start:start + 8]], target[order[start:start + 8]]

    def step(batch):
        x, y = batch
        return {"loss": ((model(x).squeeze(-1) - y) ** 2).mean()}

    run_training(name="toy-stage", engine=TorchEngine(model, config), make_batches=batches,
                 steps_per_epoch=4, step_fn=step, config=config, workdir=tmp_path / "w", tracker=NullTracker())
    written = _events(events)
    assert written[-1]["step"] == written[-1]["total"] == 20  # the last step always
    assert all(e["event"] == "progress" and e["stage"] == "toy-stage" and "loss" in e["losses"] for e in written)
    assert len(written) < 20  # at most one a second (plus the last): not one per step


def test_step_events_only_on_rank_zero_and_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.delenv(EVENTS_ENV, raising=False)
    StepEvents("s", 2).update(2, {"loss": 1.0})
    assert not events.exists()
    monkeypatch.setenv(EVENTS_ENV, str(events))
    monkeypatch.setenv("RANK", "1")
    StepEvents("s", 2).update(2, {"loss": 1.0})
    assert not events.exists()


def _write(path: Path, *events: dict) -> None:
    with path.open("a") as handle:
        for event in events:
            handle.write(json.dumps(event) + "\n")


def test_terminal_shows_one_updating_line_and_the_log_one_line_per_tenth(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    terminal, log = _Terminal(), io.StringIO()
    view = ProgressView(events, terminal, log)
    _write(events, {"event": "start", "stage": "instruct-tune", "time": 100.0})
    for step in range(1, 101):
        _write(events, {"event": "progress", "stage": "instruct-tune", "step": step, "total": 100,
                        "losses": {"loss": 5.0 / step}, "time": 100.0 + step})
        if step in (10, 50):
            view.drain()
            assert "\r" in terminal.getvalue() and "\n" not in terminal.getvalue()  # one line, updated in place
    view.drain()
    shown = terminal.getvalue().split("\r")[-1]
    assert "instruct-tune" in shown and "100/100" in shown and "loss 0.05" in shown
    mid = terminal.getvalue().split("\r")[2]
    assert "50/100" in mid and "left" in mid  # step/total, loss, time left while it runs
    _write(events, {"event": "end", "stage": "instruct-tune", "cached": False, "seconds": 100.0, "wall_seconds": 104.0,
                    "time": 205.0})
    view.drain()
    assert terminal.getvalue().endswith("ok  instruct-tune        ran 100.0s (component 104.0s)\n")
    lines = log.getvalue().splitlines()
    progress_lines = [line for line in lines if "/100" in line]
    assert 10 <= len(progress_lines) <= 11 and lines[-1].startswith("  ok  instruct-tune")


def test_non_terminal_console_gets_plain_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    console = io.StringIO()
    view = ProgressView(events, console)
    _write(events, {"event": "start", "stage": "perceiver-pretrain", "time": 1.0},
           *({"event": "progress", "stage": "perceiver-pretrain", "step": s, "total": 20, "losses": {"loss": 1.0},
              "time": 1.0 + s} for s in range(1, 21)),
           {"event": "end", "stage": "perceiver-pretrain", "cached": True, "time": 30.0})
    view.drain()
    text = console.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines()[0] == "  ... perceiver-pretrain"
    assert "20/20" in text and text.splitlines()[-1].startswith("  ok  perceiver-pretrain")
