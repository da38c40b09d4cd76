"""Optimisation engines: plain torch + DDP (perceiver/codebook stages) and DeepSpeed ZeRO (LLM stages).

Both expose the same calls (forward through ``model``, ``backward``, ``step``, ``set_lr``,
checkpoints, the device and dtype batches must have) so the training loop never branches on
which one runs. At world size 1 neither needs a launcher.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from medsight.config.schema import DeepSpeedConfig, TrainConfig
from medsight.train import distributed, native_ops
from medsight.train.checkpoint import (
    CheckpointDir,
    CheckpointError,
    TrainProgress,
    progress_meta,
    progress_of,
    read_torch_state,
    write_torch_state,
)


class Engine(Protocol):
    optimizer: torch.optim.Optimizer
    model: nn.Module  # call this for training forward passes (DDP / DeepSpeed wrapper)
    module: nn.Module  # the bare module (evaluation, saving)
    device: torch.device  # where every batch must go
    dtype: torch.dtype  # floating-point inputs are cast to this

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> bool: ...

    def set_lr(self, lr: float) -> None: ...

    def autocast(self) -> AbstractContextManager: ...

    def save_checkpoint(self, directory: CheckpointDir, progress: TrainProgress, extra: dict[str, torch.Tensor]) -> None: ...

    def load_checkpoint(self, directory: CheckpointDir) -> tuple[TrainProgress, dict[str, torch.Tensor]] | None: ...


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    warmup = max(1, int(config.warmup_ratio * total_steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("this stage has no trainable parameters; check the freezing plan")
    return params


def _choose_on_main(directory: CheckpointDir) -> tuple[TrainProgress, str] | None:
    """Rank 0 picks the newest checkpoint whose checksums hold; every rank gets its choice."""
    choice: tuple[str, dict] | str | None = None
    if distributed.is_main():
        directory.clear_staging()
        try:
            found = directory.choose(CheckpointDir.verify)
            choice = None if found is None else (str(found[0]), found[1])
        except CheckpointError as error:
            choice = str(error)
    choice = distributed.broadcast_from_main(choice)
    if isinstance(choice, str):
        raise CheckpointError(choice)
    if choice is None:
        return None
    return progress_of(choice[1]), choice[0]


class TorchEngine:
    """AdamW on the trainable parameters; DDP across ranks; optional bf16 autocast."""

    def __init__(self, module: nn.Module, config: TrainConfig, bf16: bool = False):
        self.config = config
        self.device = distributed.device()
        self.module = module.to(self.device)
        # Inputs stay float32: autocast picks bf16 per op, and losses stay in float32.
        self.dtype = torch.float32
        self.bf16 = bf16
        self.params = trainable_parameters(module)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.model: nn.Module = module
        if distributed.active():
            from torch.nn.parallel import DistributedDataParallel

            # Broadcasts rank 0's weights, then averages gradients in backward.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(module, device_ids=ids)

    def autocast(self) -> AbstractContextManager:
        if not self.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> bool:
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def save_checkpoint(self, directory: CheckpointDir, progress: TrainProgress, extra: dict[str, torch.Tensor]) -> None:
        """Every rank holds the same weights and moments after a DDP step: rank 0 writes them."""
        if distributed.is_main():
            staging = directory.staging(progress.step)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            write_torch_state(staging, self.module, self.optimizer, extra)
            meta = {**progress_meta(progress), "engine": "torch", "world_size": distributed.world_size()}
            directory.commit(staging, progress.step, CheckpointDir.hash_files(staging), meta)
        distributed.barrier()

    def load_checkpoint(self, directory: CheckpointDir) -> tuple[TrainProgress, dict[str, torch.Tensor]] | None:
        chosen = _choose_on_main(directory)
        if chosen is None:
            return None
        progress, path = chosen
        extra = read_torch_state(Path(path), self.module, self.optimizer)
        return progress, extra


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_distributed_env() -> None:
    """Single-process defaults so DeepSpeed does not fall back to MPI discovery.

    Under a real launcher (torchrun, or the TrainJob operator) these are already set and are
    left alone.
    """
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, world_size: int = 1) -> dict:
    """The DeepSpeed JSON for a stage; validated in tests with DeepSpeedConfig for the full preset."""
    config: dict = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "train_batch_size": train.batch_size * ds.gradient_accumulation_steps * world_size,
        "gradient_clipping": train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no fused-op JIT build at start-up (30 s on CPU, a CUDA toolchain on GPU).
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.zero_stage == 3:
        config["zero_optimization"].update(
            {"stage3_gather_16bit_weights_on_model_save": True, "overlap_comm": True, "contiguous_gradients": True}
        )
    if ds.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return config


class DeepSpeedEngine:
    """DeepSpeed ZeRO across the ranks; its own sharded checkpoints plus our manifest."""

    def __init__(self, module: nn.Module, train: TrainConfig, ds: DeepSpeedConfig):
        ensure_distributed_env()
        native_ops.use_prebuilt()  # before DeepSpeed's backend looks for its shared-memory op
        import deepspeed

        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend=distributed.backend(), verbose=False)
        world = torch.distributed.get_world_size()
        self.zero_stage = ds.zero_stage
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=trainable_parameters(module),
            config=deepspeed_config(train, ds, world),
        )
        # One rank without ZeRO: DeepSpeed would still flatten, "all-reduce" and copy back every
        # gradient after each backward (3% of a tiny LLM step); there is nothing to reduce.
        self._reduces = world > 1 or ds.zero_stage > 0
        self.module = module
        # Forward through the engine so ZeRO-3 parameter gathering hooks are in effect.
        self.model = self.engine
        self.device = torch.device(self.engine.device)
        self.dtype = torch.bfloat16 if ds.bf16 else torch.float32

    def autocast(self) -> AbstractContextManager:
        return nullcontext()  # DeepSpeed already holds the module in its training dtype

    def backward(self, loss: torch.Tensor) -> None:
        with nullcontext() if self._reduces else self.engine.no_sync():
            self.engine.backward(loss)

    def step(self) -> bool:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        return boundary

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def save_checkpoint(self, directory: CheckpointDir, progress: TrainProgress, extra: dict[str, torch.Tensor]) -> None:
        """DeepSpeed's own (per-rank, sharded) save, then checksums shared out over the ranks."""
        staging = directory.staging(progress.step)
        if distributed.is_main():
            shutil.rmtree(staging, ignore_errors=True)
        distributed.barrier()
        self.engine.save_checkpoint(
            str(directory.root), tag=staging.name, save_latest=False, exclude_frozen_parameters=True,
            client_state={"progress": progress_meta(progress)["progress"], "extra": {k: v.cpu() for k, v in extra.items()}},
        )
        distributed.barrier()
        shares = distributed.all_gather_objects(
            CheckpointDir.hash_files(staging, (distributed.rank(), distributed.world_size()))
        )
        if distributed.is_main():
            hashes = {name: entry for share in shares for name, entry in share.items()}
            meta = {**progress_meta(progress), "engine": "deepspeed", "zero_stage": self.zero_stage,
                    "world_size": distributed.world_size()}
            directory.commit(staging, progress.step, hashes, meta)
        distributed.barrier()

    def _verify_everywhere(self, path) -> str | None:
        share = (distributed.rank(), distributed.world_size())
        problems = [p for p in distributed.all_gather_objects(CheckpointDir.verify(path, share)) if p]
        return problems[0] if problems else None

    def load_checkpoint(self, directory: CheckpointDir) -> tuple[TrainProgress, dict[str, torch.Tensor]] | None:
        if distributed.is_main():
            directory.clear_staging()
        distributed.barrier()
        found = directory.choose(self._verify_everywhere)
        if found is None:
            return None
        path, manifest = found
        if manifest.get("world_size") not in (None, distributed.world_size()) and self.zero_stage > 0:
            # DeepSpeed reshapes ZeRO partitions only through its universal-checkpoint tool.
            raise CheckpointError(
                f"{path} was written by {manifest['world_size']} ranks, this run has {distributed.world_size()}; "
                "rerun at the same world size, or with --force to start clean"
            )
        _, client = self.engine.load_checkpoint(
            str(directory.root), tag=path.name, load_module_strict=False,
            load_optimizer_states=True, load_lr_scheduler_states=False,
        )
        if client is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load this checkpoint; rerun with --force to start clean")
        return progress_of(manifest), dict(client.get("extra", {}))

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s complete weights on rank 0 (CPU, float32; {} elsewhere).

        Trained parameters come from the optimizer's fp32 master copy (not the bf16 working
        copy), gathered from every rank's ZeRO partition; frozen ones are gathered as they are.
        Every rank must call this (the gathers are collective).
        """
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(module.named_parameters())
        state: dict[str, torch.Tensor] = {}
        for name in module.state_dict():
            if name not in params:
                value = module.get_buffer(name)
            else:
                param = params[name]
                value = safe_get_full_fp32_param(param) if param.requires_grad else None
                if value is None:
                    gather = zero.GatheredParameters([param]) if self.zero_stage == 3 else nullcontext()
                    with gather:
                        value = param.data.clone() if distributed.is_main() else None
            if distributed.is_main():
                state[name] = value.detach().float().cpu()
        return state


def gathered_parameters(module: nn.Module, zero_stage: int) -> AbstractContextManager:
    """Full (un-partitioned) parameters of ``module`` inside the block under ZeRO-3; a no-op
    below stage 3. For code that reaches parameters outside a forward call (validation)."""
    if zero_stage < 3:
        return nullcontext()
    from deepspeed import zero

    return zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
