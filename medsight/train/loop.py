"""The one training loop every stage uses: schedule, progress bar, NaN guard, periodic resume points."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medsight.config.schema import TrainConfig
from medsight.train.checkpoint import TrainProgress, load_resume_state, save_resume_state
from medsight.train.engine import Engine, lr_at
from medsight.train.loss_watch import ZeroLossWatch
from medsight.train.progress_events import StepEvents
from medsight.train.tracker import Tracker


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is kept and named in the message."""


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
    module: nn.Module,
    engine: Engine,
    make_batches: Callable[[int], Iterable],
    steps_per_epoch: int,
    step_fn: Callable[[object], dict[str, torch.Tensor]],
    config: TrainConfig,
    workdir: Path,
    tracker: Tracker,
    on_checkpoint: Callable[[], None] | None = None,
    expected_losses: Iterable[str] | None = None,
) -> LoopResult:
    """Train ``module`` through ``engine``.

    ``make_batches(epoch)`` yields that epoch's batches in a seed-determined order, so a resumed
    run skips exactly the batches it already consumed. ``step_fn(batch)`` returns named losses,
    ``"loss"`` being the one optimised. ``expected_losses``: the terms that must not stay exactly
    zero (default: all); a stage lists fewer where a term is zero by design (``loss_watch.py``).
    """
    total = total_steps(config, steps_per_epoch)
    progress = load_resume_state(workdir, module, engine.optimizer) or TrainProgress()
    resumed_from = progress.step
    if resumed_from:
        tqdm.write(f"[{name}] resuming from step {resumed_from}/{total} ({workdir}/checkpoints/latest)")
    module.train()
    last: dict[str, float] = {}
    zero_watch = ZeroLossWatch(name, tracker, expected_losses)
    bar = tqdm(total=total, initial=progress.step, desc=name, unit="step", dynamic_ncols=True)
    events = StepEvents(name, total)  # progress for a runner in another process (no-op otherwise)
    try:
        while progress.step < total:
            for batch_index, batch in enumerate(make_batches(progress.epoch)):
                if batch_index < progress.step_in_epoch:
                    continue
                if progress.step >= total:
                    break
                engine.set_lr(lr_at(progress.step, total, config))
                losses = step_fn(batch)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"[{name}] loss became {loss.item()} at step {progress.step}; the last good "
                        f"checkpoint is kept at {workdir}/checkpoints/latest (resumes from there). "
                        "Lower the learning rate or check the inputs, then rerun the stage."
                    )
                engine.backward(loss)
                engine.step()
                progress.step += 1
                progress.step_in_epoch = batch_index + 1
                last = {key: float(value.detach()) for key, value in losses.items()}
                zero_watch.update(progress.step, last)
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in last.items()}, refresh=False)
                events.update(progress.step, last)
                if progress.step % config.log_every == 0 or progress.step == total:
                    tracker.log_metrics({f"{name}/{k}": v for k, v in last.items()}, step=progress.step)
                if progress.step % config.checkpoint_every == 0 and progress.step < total:
                    save_resume_state(workdir, module, engine.optimizer, progress)
                    if on_checkpoint:
                        on_checkpoint()
            else:
                progress.epoch += 1
                progress.step_in_epoch = 0
    finally:
        bar.close()
    zero_watch.finish(progress.step)
    return LoopResult(steps=progress.step, resumed_from=resumed_from, last_losses=last)


def seeded_order(num_items: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()
