"""Module weights as safetensors: the one on-disk format of every trained module (never pickles)."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medsight.io_utils import atomic_path


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


def load_weights(module: nn.Module, path: Path, strict: bool = True) -> None:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file missing; run the stage that produces it first")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}); rerun the stage that wrote it") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: weights do not fit the configured model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it trained with a different preset or --set override?"
        )
