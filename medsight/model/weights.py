"""Module weights as safetensors: the one on-disk format of every trained module (never pickles)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medsight.io_utils import atomic_path, missing_reason


def save_weights(module: nn.Module, path: Path, only_trainable: bool = False) -> None:
    state = {
        name: tensor.detach().contiguous().cpu()
        for name, tensor in module.state_dict().items()
        if not only_trainable or _is_trainable(module, name)
    }
    with atomic_path(Path(path)) as tmp:
        save_file(state, str(tmp))


def _is_trainable(module: nn.Module, name: str) -> bool:
    params = dict(module.named_parameters())
    return name in params and params[name].requires_grad


class WeightsError(ValueError):
    """A weights file is unreadable or does not fit the model; the message names the file."""


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or foreign file is named, never a traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file {missing_reason(path)}; run the stage that produces it first")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(
            f"{path}: not a readable safetensors file ({error}); it is truncated or corrupt: "
            "rerun the stage that wrote it (or pull it again)"
        ) from None


def _shape_mismatches(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    own = module.state_dict()
    return [
        f"{name} {tuple(tensor.shape)} vs model {tuple(own[name].shape)}"
        for name, tensor in state.items()
        if name in own and tuple(own[name].shape) != tuple(tensor.shape)
    ]


def load_weights(module: nn.Module, path: Path, strict: bool = True) -> None:
    path = Path(path)
    state = read_state(path)
    mismatched = _shape_mismatches(module, state)
    if mismatched:
        raise WeightsError(
            f"{path}: weights do not fit the configured model ({len(mismatched)} shape mismatch(es), e.g. "
            f"{mismatched[0]}); was it trained with a different preset or --set override?"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{path}: weights do not fit the configured model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it trained with a different preset or --set override?"
        )
