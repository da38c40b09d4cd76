"""Start a stage as N ranks through ``torch.distributed.run`` (torchrun), the standard launcher.

``medsight stage run NAME --nproc-per-node N`` re-runs the same command as N ranks on this
node. Inside a Kubeflow Trainer TrainJob the operator sets ``PET_NNODES`` / ``PET_NODE_RANK`` /
``PET_MASTER_ADDR`` / ``PET_MASTER_PORT``; torchrun reads them, so the same call joins the
ranks of every node. When a rank dies the others are stopped and the job fails with one line
naming it; the same command then resumes from the last checkpoint.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
from collections.abc import Sequence

# Set by torchrun in every rank it starts.
RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LaunchError(RuntimeError):
    """A rank failed; the message names it and its exit status."""


def under_launcher() -> bool:
    """This process is a rank started by torchrun (or an operator that sets the same)."""
    return all(name in os.environ for name in RANK_ENV)


def num_nodes() -> int:
    return int(os.environ.get("PET_NNODES", "1").split(":")[-1] or 1)


def node_rank() -> int:
    """This node's index in a multi-node job (0 on one node)."""
    return int(os.environ.get("PET_NODE_RANK") or os.environ.get("JOB_COMPLETION_INDEX") or 0)


def resolve_nproc(value: str | int) -> int:
    """``auto``: one rank per visible GPU (1 without a GPU); else a positive number."""
    text = str(value).strip().lower()
    if text == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--nproc-per-node {value!r}: give a positive number or auto")
    return int(text)


def visible_gpus() -> int:
    """GPUs this process may use, found without importing torch (the KFP executor avoids it):
    the CUDA_VISIBLE_DEVICES list when set, else the NVIDIA device files (/dev/nvidia0, ...)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([d for d in listed.split(",") if d.strip() and d.strip() != "-1"])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def pod_ranks(requested: str) -> str:
    """Ranks for a component: the GPUs its pod requested (pipelines/deployment.py), but no more
    than it sees. The same compiled DAG run by ``kfp.local`` on a machine without GPUs then
    trains each stage in one process instead of N CPU ranks competing for its cores."""
    count = resolve_nproc(requested)
    gpus = visible_gpus()
    return str(min(count, gpus) if gpus else 1)


def needs_launcher(nproc: int) -> bool:
    return not under_launcher() and (nproc > 1 or num_nodes() > 1)


def torchrun_args(nproc: int, module_args: Sequence[str]) -> list[str]:
    """torchrun's arguments for ``python -m medsight.cli <module_args>`` as ``nproc`` ranks here."""
    args = [f"--nproc-per-node={nproc}"]
    if num_nodes() == 1:
        args.append("--standalone")  # a free local port, no rendezvous service
    # else: --nnodes/--node-rank/--master-addr/--master-port come from the operator's PET_* env.
    return [*args, "-m", "medsight.cli", *module_args]


def _describe(error) -> str:
    """The rank that failed first (the cause); the launcher then stops the others."""
    global_rank, failure = error.get_first_failure()
    code = failure.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        what = f"rank {global_rank} was killed ({name})"
    else:
        what = f"rank {global_rank} exited with status {code} (its error is above)"
    others = len(error.failures) - 1
    return what + (f"; the launcher stopped the other {others} rank(s)" if others else "")


def run_ranks(nproc: int, module_args: Sequence[str], env: dict[str, str] | None = None) -> None:
    """Run ``medsight.cli <module_args>`` as ``nproc`` ranks and wait; ``LaunchError`` if any failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        run(get_args_parser().parse_args(torchrun_args(nproc, module_args)))
    except ChildFailedError as error:
        raise LaunchError(_describe(error)) from None
    finally:
        if env is not None:
            os.environ.clear()
            os.environ.update(saved)


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (to pass the rest to every rank)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def cli_args() -> list[str]:
    """This process's ``medsight`` arguments (what follows the program name)."""
    return list(sys.argv[1:])
