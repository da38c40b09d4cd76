"""Resumable training state in safetensors (trainable weights + optimizer), never pickles.

Resume state is a directory swapped in atomically, so a crash while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medsight.io_utils import atomic_directory
from medsight.model.weights import load_weights, save_weights

RESUME_DIR = "checkpoints/latest"


@dataclass
class TrainProgress:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_resume_state(
    workdir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, progress: TrainProgress
) -> None:
    with atomic_directory(Path(workdir) / RESUME_DIR) as tmp:
        save_weights(module, tmp / "trainable.safetensors", only_trainable=True)
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "progress.json").write_text(json.dumps(asdict(progress)))


def load_resume_state(
    workdir: Path, module: nn.Module, optimizer: torch.optim.Optimizer
) -> TrainProgress | None:
    """Restore the last checkpoint if one exists; returns None for a fresh start."""
    directory = Path(workdir) / RESUME_DIR
    if not (directory / "progress.json").is_file():
        return None
    load_weights(module, directory / "trainable.safetensors", strict=False)
    meta = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")), meta))
    return TrainProgress(**json.loads((directory / "progress.json").read_text()))
