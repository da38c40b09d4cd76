"""What training code needs from experiment tracking; MLflow implements it in medsight.platform."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

HISTORY_FILE = "history.jsonl"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullTracker:
    """Tracking off: every call is a no-op, so stages never branch on whether MLflow is set up."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class HistoryRecorder:
    """A Tracker that forwards to ``inner`` and keeps stepped metrics in ``history.jsonl``."""

    def __init__(self, inner: Tracker, output: Path) -> None:
        self.inner = inner
        self.path = Path(output) / HISTORY_FILE

    def log_params(self, params: dict[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.inner.log_metrics(metrics, step=step)
        if step is None:
            return  # final summary values are not points of a curve
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)

    def rewind(self, step: int) -> None:
        """Forget points after ``step``: a resumed run logs them again from its checkpoint."""
        if not self.path.is_file():
            return
        from medsight.io_utils import atomic_write_text

        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.inner.set_tags(tags)
