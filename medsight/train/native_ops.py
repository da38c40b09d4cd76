"""DeepSpeed's just-in-time native ops, built once per Python environment instead of per run.

On a CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce op the first time
a process initialises it (~30 s on two cores). torch caches the build in one folder per user, keyed
by the include paths of the environment that built it, so two virtual environments on one machine
(a checkout's and a clean clone's) keep rebuilding each other's copy, and the first LLM stage of a
pipeline pays the compile. The bootstrap builds the op into the environment's own folder
(``python -m medsight.train.native_ops``), and the training engine points torch at that folder
when it exists. On a GPU node nothing is built here: the CUDA accelerator has no such op.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "TORCH_EXTENSIONS_DIR"
_FOLDER = "torch-extensions"


def environment_folder() -> Path:
    """Where this Python environment keeps its prebuilt ops (inside the venv, so it goes with it)."""
    return Path(sys.prefix) / _FOLDER


def use_prebuilt() -> None:
    """Point torch's extension cache at the environment's prebuilt ops, unless the user set one
    (container images set their own writable folder) or the environment has none."""
    if ENV not in os.environ and environment_folder().is_dir():
        os.environ[ENV] = str(environment_folder())


def prebuild() -> str:
    """Build the ops DeepSpeed would compile at its first ``init_distributed`` on this machine."""
    os.environ.setdefault(ENV, str(environment_folder()))
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops import __compatible_ops__

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not __compatible_ops__.get(builder.NAME, False):
        return "nothing to build for this accelerator"
    builder.load(verbose=False)
    return f"built {builder.NAME} in {os.environ[ENV]}"


if __name__ == "__main__":
    print(f"native ops: {prebuild()}", file=sys.stderr)
