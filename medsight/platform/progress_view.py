"""Live progress of a local pipeline run, drawn from the components' event file.

The components append events (``start``/``end`` per stage from ``component_runtime``,
``progress`` per training step from the loop, ``train/progress_events.py``) to one file; this
thread follows it and shows, on a terminal, one line that updates in place::

      instruct-tune   120/400 [######..............]  loss 1.234  0:45 elapsed, ~1:44 left

and a permanent ``ok`` line when a stage ends. Where the console is not a terminal (a CI log, a
test) and in the run's log file, a progress line is written once per tenth of a stage's steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm import tqdm

BAR_WIDTH = 20
LOG_FRACTION = 10  # progress lines per stage in the log (and on a non-terminal console)


@dataclass
class StageProgress:
    stage: str
    started: float
    step: int = 0
    total: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    first: tuple[float, int] | None = None  # (time, step) of the first progress event
    last_time: float = 0.0
    logged_tenth: int = -1

    def seconds_left(self) -> float | None:
        if self.first is None or self.step <= self.first[1] or not self.total:
            return None
        rate = (self.last_time - self.first[0]) / (self.step - self.first[1])
        return max(0.0, rate * (self.total - self.step))

    def line(self, now: float) -> str:
        elapsed = tqdm.format_interval(max(0.0, now - self.started))
        if not self.total:
            return f"  ... {self.stage:<18s} {elapsed} elapsed"
        filled = int(BAR_WIDTH * self.step / self.total)
        loss = self.losses.get("loss", next(iter(self.losses.values()), float("nan")))
        left = self.seconds_left()
        eta = f", ~{tqdm.format_interval(left)} left" if left is not None else ""
        return (f"  ... {self.stage:<18s} {self.step:>6d}/{self.total:<6d} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"
                f"  loss {loss:.4g}  {elapsed} elapsed{eta}")


class ProgressView(threading.Thread):
    """Follow ``events``; draw on ``console`` (one live line on a terminal) and log to ``log``."""

    def __init__(self, events: Path, console: IO[str], log: IO[str] | None = None, poll: float = 0.5) -> None:
        super().__init__(daemon=True, name="pipeline-progress")
        self.events, self.console, self.log, self.poll = Path(events), console, log, poll
        self.live = bool(getattr(console, "isatty", lambda: False)())
        self.done = threading.Event()
        self.offset = 0
        self.active: dict[str, StageProgress] = {}
        self._drawn = False

    def run(self) -> None:
        while not self.done.is_set():
            self.drain()
            self.done.wait(self.poll)
        self.drain()
        self._clear()

    def stop(self) -> None:
        self.done.set()
        self.join()

    # -- output ----------------------------------------------------------------------------
    def _clear(self) -> None:
        if self._drawn:
            self.console.write("\r\x1b[2K")
            self._drawn = False

    def _permanent(self, text: str) -> None:
        self._clear()
        self.console.write(text + "\n")
        if self.log is not None and self.log is not self.console:
            self.log.write(text + "\n")

    def _draw(self) -> None:
        if not self.live or not self.active:
            return
        now = time.time()
        text = "   ".join(progress.line(now).strip() for progress in self.active.values())
        self.console.write("\r\x1b[2K  " + text)
        self._drawn = True

    # -- events ----------------------------------------------------------------------------
    def drain(self) -> None:
        if self.events.is_file():
            with open(self.events) as handle:
                handle.seek(self.offset)
                for line in handle:
                    if not line.endswith("\n"):
                        break  # a line still being written: read it next time
                    self.offset += len(line.encode())
                    self.handle(json.loads(line))
        self._draw()
        self.console.flush()
        if self.log is not None:
            self.log.flush()

    def handle(self, event: dict) -> None:
        stage = event.get("stage", "?")
        kind = event.get("event")
        if kind == "start":
            self.active[stage] = StageProgress(stage, event.get("time", time.time()))
            if not self.live:
                self._permanent(f"  ... {stage}")
        elif kind == "progress":
            progress = self.active.setdefault(stage, StageProgress(stage, event.get("time", time.time())))
            progress.step, progress.total = int(event["step"]), int(event["total"])
            progress.losses = dict(event.get("losses", {}))
            progress.last_time = event.get("time", time.time())
            if progress.first is None:
                progress.first = (progress.last_time, progress.step)
            tenth = progress.step * LOG_FRACTION // max(1, progress.total)
            if tenth > progress.logged_tenth:
                progress.logged_tenth = tenth
                text = progress.line(progress.last_time)
                if self.log is not None and self.log is not self.console:
                    self.log.write(text + "\n")
                if not self.live:
                    self.console.write(text + "\n")
        elif kind == "end":
            self.active.pop(stage, None)
            how = "restored from run-cache" if event.get("cached") else f"ran {event.get('seconds', 0.0):.1f}s"
            self._permanent(f"  ok  {stage:<20s} {how} (component {event.get('wall_seconds', 0.0):.1f}s)")


@contextlib.contextmanager
def captured_output(log_path: Path, capture: bool, console: IO[str]) -> Iterator[tuple[IO[str], IO[str] | None]]:
    """Send KFP's and the components' chatter to ``log_path``; yield (where progress lines go, the log)."""
    if not capture:
        yield console, None
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log:
        # Both levels: child processes write to fds 1/2, KFP's Python logging to sys.stdout
        # (which a test runner may have replaced by its own buffer).
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        # The terminal is fd 1 (or 2) no more: write progress to a duplicate of the original.
        original = (saved_out if console in (sys.__stdout__, saved_streams[0])
                    else saved_err if console in (sys.__stderr__, saved_streams[1]) else None)
        terminal = original is not None
        out = os.fdopen(os.dup(original), "w", buffering=1) if original is not None else console
        try:
            yield out, log
        finally:
            log.flush()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_out, 1)
            os.dup2(saved_err, 2)
            os.close(saved_out)
            os.close(saved_err)
            if terminal:
                out.close()
