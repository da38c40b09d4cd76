"""Optimisation engines: plain torch (perceiver/codebook stages) and DeepSpeed (LLM stages).

Both expose the same four calls so the training loop never branches on which one runs.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Protocol

import torch
from torch import nn

from medsight.config.schema import DeepSpeedConfig, TrainConfig


class Engine(Protocol):
    optimizer: torch.optim.Optimizer
    model: nn.Module  # call this for forward passes

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def set_lr(self, lr: float) -> None: ...


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


class TorchEngine:
    def __init__(self, module: nn.Module, config: TrainConfig):
        self.module = module
        self.config = config
        self.params = trainable_parameters(module)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.model = module

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_distributed_env() -> None:
    """Single-process defaults so DeepSpeed does not fall back to MPI discovery.

    Under a real launcher (deepspeed/torchrun, or the TrainJob operator) these are already set
    and are left alone.
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
    def __init__(self, module: nn.Module, train: TrainConfig, ds: DeepSpeedConfig):
        import deepspeed

        ensure_distributed_env()
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        world = torch.distributed.get_world_size()
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=trainable_parameters(module),
            config=deepspeed_config(train, ds, world),
        )
        self.module = module
        # Forward through the engine so ZeRO-3 parameter gathering hooks are in effect.
        self.model = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
