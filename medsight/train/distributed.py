"""Who this process is in a data-parallel job, and the few collectives the stages need.

A stage runs as one process (world size 1, no process group needed) or as one rank per GPU
under ``torch.distributed.run`` (torchrun), which sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. Every helper here works at world size 1 without a process group,
so stage code never branches on how it was launched. State lives in ``torch.distributed``
itself; this module keeps none.

torch is imported only where a tensor or a group is needed: no process group can exist before
torch is imported, so a single-process bookkeeping stage (data-check, register-model) asks "am I
rank 0?" here without paying torch's ~2 s import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Long enough for rank 0 to write a consolidated 8B-parameter checkpoint while the others wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _initialized() -> bool:
    """A process group exists (never before torch.distributed was imported)."""
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """Rank 0: the only process that writes outputs, metrics, checkpoints' manifests and MLflow."""
    return rank() == 0


def launched() -> bool:
    """True inside a multi-process job (torchrun or a TrainJob node)."""
    return _env_int("WORLD_SIZE", 1) > 1


def device() -> torch.device:
    """This rank's device: its own GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def process_group() -> Iterator[None]:
    """Join the job's process group for the duration of a stage (no-op at world size 1, or when
    a group already exists, e.g. DeepSpeed created it)."""
    if not launched() or _initialized():
        with _single_process_scope():
            yield
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend(), timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# What a single-process DeepSpeed stage sets up for itself (engine.ensure_distributed_env).
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def _single_process_scope() -> Iterator[None]:
    """Restore the rank variables a single-process stage set for DeepSpeed, so processes this one
    starts later (a test's, a notebook's) are not taken for ranks of a launched job. Its one-rank
    group stays: DeepSpeed keeps references to it for the next stage of the same process."""
    saved = {name: os.environ.get(name) for name in _RANK_VARIABLES}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def active() -> bool:
    """A process group with more than one rank exists: collectives are needed."""
    return _initialized() and world_size() > 1


def shard() -> tuple[int, int]:
    """(this rank, ranks) for splitting work that is gathered afterwards; (0, 1) without a group."""
    return (rank(), world_size()) if active() else (0, 1)


def barrier() -> None:
    if active():
        import torch.distributed as dist

        dist.barrier()


def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    # NCCL moves CUDA tensors only; gloo moves CPU tensors.
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (a new tensor on the input's device)."""
    if not active():
        return tensor.clone()
    import torch.distributed as dist

    work = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / world_size()


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Each named scalar averaged over ranks (losses logged once, for the whole global batch)."""
    if not active() or not values:
        return dict(values)
    import torch

    keys = sorted(values)
    summed = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return {k: float(v) / world_size() for k, v in zip(keys, summed.tolist())}


def sum_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Each named scalar summed over ranks (e.g. a metric's numerator and count)."""
    if not active() or not values:
        return dict(values)
    import torch

    keys = sorted(values)
    summed = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, summed.tolist()))


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """[W, *shape]: every rank's ``tensor`` (same shape on every rank), rank order."""
    if not active():
        return tensor.unsqueeze(0).clone()
    import torch
    import torch.distributed as dist

    work = tensor.detach().contiguous().to(_collective_device())
    parts = [torch.empty_like(work) for _ in range(world_size())]
    dist.all_gather(parts, work)
    return torch.stack(parts).to(tensor.device)


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` (picklable, in memory only) as a list on rank 0; None elsewhere."""
    if not active():
        return [obj]
    import torch.distributed as dist

    parts: list[Any] | None = [None] * world_size() if is_main() else None
    if dist.get_backend() == "nccl":
        # gather_object on NCCL needs the current CUDA device set; all_gather_object is simpler.
        everything: list[Any] = [None] * world_size()
        dist.all_gather_object(everything, obj)
        return everything if is_main() else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def all_gather_objects(obj: Any) -> list[Any]:
    if not active():
        return [obj]
    import torch.distributed as dist

    everything: list[Any] = [None] * world_size()
    dist.all_gather_object(everything, obj)
    return everything


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    import torch.distributed as dist

    holder = [obj if is_main() else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
