"""The one training loop every stage uses: schedule, progress bar, NaN guard, resume points.

It runs the same on one process and on every rank of a data-parallel job: each rank feeds its
own share of the global batch, the logged losses are averaged over ranks (so they are the
global batch's), and only rank 0 logs, shows progress and writes checkpoint manifests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from medsight.config.schema import TrainConfig
from medsight.train import distributed
from medsight.train.checkpoint import CHECKPOINTS_DIR, CheckpointDir, TrainProgress
from medsight.train.engine import Engine, lr_at
from medsight.train.loss_watch import ZeroLossWatch
from medsight.train.progress_events import StepEvents
from medsight.train.tracker import Tracker


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept and named in the message."""


class TrainState(Protocol):
    """Stage state outside the model and optimizer that a resume must restore (tensors only)."""

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...


@dataclass
class LoopResult:
    steps: int
    resumed_from: int
    last_losses: dict[str, float]


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    return min(steps, config.max_steps) if config.max_steps > 0 else steps


def run_training(
    *,
    name: str,
    engine: Engine,
    make_batches: Callable[[int, int], Iterable],
    steps_per_epoch: int,
    step_fn: Callable[[object], dict[str, torch.Tensor]],
    config: TrainConfig,
    workdir: Path,
    tracker: Tracker,
    state: TrainState | None = None,
    on_checkpoint: Callable[[], None] | None = None,
    expected_losses: Iterable[str] | None = None,
) -> LoopResult:
    """Train ``engine.module``.

    ``make_batches(epoch, skip)`` yields this rank's batches of that epoch in a seed-determined
    order, starting after its first ``skip`` batches (a resumed run never re-reads them).
    ``step_fn(batch)`` returns named losses, ``"loss"`` being the one optimised; it runs under
    the engine's autocast. ``steps_per_epoch`` counts this rank's batches per epoch (the same
    on every rank). ``expected_losses``: the terms that must not stay exactly zero (default:
    all); a stage lists fewer where a term is zero by design (``loss_watch.py``).
    """
    total = total_steps(config, steps_per_epoch)
    checkpoints = CheckpointDir(workdir)
    restored = engine.load_checkpoint(checkpoints)
    progress = TrainProgress()
    if restored is not None:
        progress, extra = restored
        if state is not None:
            state.load_state_tensors(extra)
        rewind = getattr(tracker, "rewind", None)
        if rewind is not None:
            rewind(progress.step)  # steps after the checkpoint are logged again, once
        if distributed.is_main():
            tqdm.write(f"[{name}] resuming from step {progress.step}/{total} ({workdir}/{CHECKPOINTS_DIR})")
    resumed_from = progress.step
    engine.module.train()
    last: dict[str, float] = {}
    # The watched values are means over ranks: every rank decides alike, rank 0 alone tracks.
    zero_watch = ZeroLossWatch(name, tracker, expected_losses)
    bar = tqdm(total=total, initial=progress.step, desc=name, unit="step", dynamic_ncols=True,
               disable=not distributed.is_main())
    events = StepEvents(name, total)  # progress for a runner in another process (no-op otherwise)
    since, since_step = time.perf_counter(), progress.step
    try:
        while progress.step < total:
            for batch in make_batches(progress.epoch, progress.step_in_epoch):
                if progress.step >= total:
                    break
                engine.set_lr(lr_at(progress.step, total, config))
                with engine.autocast():
                    losses = step_fn(batch)
                # One small all-reduce: every rank sees the same (global-batch) values, so a
                # NaN on any rank stops all of them at the same step.
                last = distributed.mean_over_ranks({key: float(value.detach()) for key, value in losses.items()})
                if not math.isfinite(last["loss"]):
                    raise NonFiniteLossError(
                        f"[{name}] loss became {last['loss']} at step {progress.step}; the last good "
                        f"checkpoint is kept in {workdir}/{CHECKPOINTS_DIR} (resumes from there). "
                        "Lower the learning rate or check the inputs, then rerun the stage."
                    )
                engine.backward(losses["loss"])
                stepped = engine.step()
                progress.step += 1
                progress.step_in_epoch += 1
                zero_watch.update(progress.step, last)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()}, refresh=False)
                events.update(progress.step, last)
                if progress.step % config.log_every == 0 or progress.step == total:
                    now = time.perf_counter()
                    pace = {"step_seconds": (now - since) / max(1, progress.step - since_step), **_peak_memory()}
                    since, since_step = now, progress.step
                    tracker.log_metrics({f"{name}/{k}": v for k, v in {**last, **pace}.items()}, step=progress.step)
                # The end of training is a resume point too: a failure in final validation or
                # saving then redoes none of the steps.
                due = progress.step % config.checkpoint_every == 0 and stepped
                if due or progress.step == total:
                    engine.save_checkpoint(checkpoints, progress, state.state_tensors() if state else {})
                    if on_checkpoint:
                        on_checkpoint()
            else:
                progress.epoch += 1
                progress.step_in_epoch = 0
    finally:
        bar.close()
    zero_watch.finish(progress.step)
    return LoopResult(steps=progress.step, resumed_from=resumed_from, last_losses=last)


def _peak_memory() -> dict[str, float]:
    """This rank's peak accelerator memory so far (what bench/gpu_smoke.py and MLflow show)."""
    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def seeded_order(num_items: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()
