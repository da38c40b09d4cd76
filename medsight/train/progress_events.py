"""Training progress as events, for whoever runs the stage in another process.

When ``MEDSIGHT_EVENTS_FILE`` names a file (the local pipeline runner sets it for every
component), the training loop appends ``{"event": "progress", "stage", "step", "total",
"losses", "time"}`` lines to it: at most one per ``min_interval`` seconds, plus the last step.
The runner follows the file and draws one updating line on the terminal (``local_run.py``).
Only rank 0 writes; without the variable nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

EVENTS_ENV = "MEDSIGHT_EVENTS_FILE"


def append_event(payload: Mapping[str, object]) -> None:
    """One short line per write (appends of that size do not interleave between processes)."""
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"time": time.time(), **payload}) + "\n")


class StepEvents:
    """Rate-limited progress events of one training loop."""

    def __init__(self, stage: str, total: int, min_interval: float = 1.0) -> None:
        self.stage, self.total, self.min_interval = stage, total, min_interval
        self.enabled = bool(os.environ.get(EVENTS_ENV)) and os.environ.get("RANK", "0") == "0"
        self._last = 0.0

    def update(self, step: int, losses: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if step < self.total and now - self._last < self.min_interval:
            return
        self._last = now
        append_event({"event": "progress", "stage": self.stage, "step": step, "total": self.total,
                      "losses": {k: round(float(v), 5) for k, v in losses.items()}})
