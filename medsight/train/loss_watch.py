"""A watchdog for loss terms that are exactly zero: a switched-off loss, not a converged one.

A real loss (BCE, Dice, cross-entropy, LM) is never exactly 0.0 in floating point; a term that
is 0.0 step after step means its supervision is missing (no region tokens reached the
segmentation loss, every mask was dropped, a weight was set to 0). Training then "succeeds" with
one part of the model untrained. The watch names such a term in the log and in the tracker
(MLflow: a tag ``medsight.warning.zero_loss.<term>`` and a metric ``<stage>/zero_loss_steps/<term>``).

A stage says which terms it expects to be non-zero: stage 3 (v2t-align) has no region tokens by
design, so its ``seg`` term is zero and not watched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from medsight.train.tracker import Tracker

logger = logging.getLogger(__name__)

# Consecutive exactly-zero steps before a term is reported (also reported at the end of a shorter
# run in which it was zero on every step).
DEFAULT_PATIENCE = 20


class ZeroLossWatch:
    def __init__(self, stage: str, tracker: Tracker, expected: Iterable[str] | None = None,
                 patience: int = DEFAULT_PATIENCE) -> None:
        """``expected``: the terms that must not stay zero (None: every term a step returns)."""
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.stage = stage
        self.tracker = tracker
        self.expected = None if expected is None else set(expected)
        self.patience = patience
        self.zero_steps: dict[str, int] = {}  # term -> consecutive exactly-zero steps
        self.steps = 0
        self.reported: set[str] = set()

    def update(self, step: int, losses: dict[str, float]) -> None:
        """Call once per optimizer step with that step's loss values (plain floats)."""
        self.steps += 1
        for term, value in losses.items():
            if self.expected is not None and term not in self.expected:
                continue
            self.zero_steps[term] = self.zero_steps.get(term, 0) + 1 if value == 0.0 else 0
            if self.zero_steps[term] >= self.patience:
                self._report(term, step)

    def finish(self, step: int) -> None:
        """End of training: report terms that were zero on every step of a run shorter than patience."""
        for term, count in self.zero_steps.items():
            if count and count == self.steps:
                self._report(term, step)

    def _report(self, term: str, step: int) -> None:
        if term in self.reported:
            return
        self.reported.add(term)
        count = self.zero_steps[term]
        message = (f"[{self.stage}] loss term '{term}' has been exactly 0 for {count} step(s) (up to step {step}): "
                   "its supervision is missing (check the data and the loss weights); that part of the model "
                   "is not learning")
        logger.warning(message)
        self.tracker.log_metrics({f"{self.stage}/zero_loss_steps/{term}": float(count)}, step=step)
        self.tracker.set_tags({f"medsight.warning.zero_loss.{term}": message})

    @property
    def warnings(self) -> list[str]:
        return sorted(self.reported)
