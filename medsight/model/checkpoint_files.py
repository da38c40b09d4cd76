"""Reading checkpoint files someone else wrote: safetensors, or pickles through ``weights_only``.

Pickle checkpoints (``.pt``/``.pth``/``.bin``) are only ever opened with
``torch.load(weights_only=True)``, which rebuilds tensors and plain data (dicts, lists, numbers,
strings) and nothing else. The one class allowed on top is ``argparse.Namespace``: training
scripts store their command-line arguments in it (the authors' ``vq_train.py`` does), it only
holds attributes, and those attributes must again be plain data. Anything that needs more is
refused with a message that names the file; nothing from such a file is executed.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

SAFE_EXTRA_GLOBALS = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, refused as unsafe, or not shaped as expected."""


def load_checkpoint_file(path: Path) -> Any:
    """safetensors -> {name: tensor}; a pickle -> whatever plain data it holds (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        with torch.serialization.safe_globals(list(SAFE_EXTRA_GLOBALS)):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: refused: loading it needs Python objects beyond tensors and plain data "
            f"({first}). Only torch.load(weights_only=True) is used here; convert the file to "
            "safetensors with the code that wrote it, or re-save its state dict alone"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({error})") from error


def tensors_only(state: Any, path: Path, where: str = "") -> dict[str, torch.Tensor]:
    """The mapping ``state`` (at ``where`` inside the file) as {name: tensor}; else CheckpointError."""
    label = f"{path}" + (f" [{where}]" if where else "")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{label}: expected a mapping of tensors, got {type(state).__name__}")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{label}: entry {bad[0]!r} is not a tensor; is this the right file?")
    return {str(key): value for key, value in state.items()}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Drop ``prefix`` from every key that has it (e.g. DDP's "module.")."""
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state
