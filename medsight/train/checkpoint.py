"""Resume points of a training stage: checksummed, kept two deep, chosen newest-good-first.

Layout under the stage's working folder::

    checkpoints/step-00000400/   manifest.json + the engine's files (safetensors for the torch
    checkpoints/step-00000600/   engine; DeepSpeed's own sharded files for the LLM stages)

A checkpoint is written under a staging name (``.step-N.partial``) and renamed into place only
after every file is on disk and ``manifest.json`` (each file's size and sha256) is written last,
so a process killed while saving leaves the previous checkpoints untouched. On resume the newest
checkpoint whose files all match their manifest is used; a corrupt or truncated one is named and
skipped, and the last two are kept so there is always one to fall back to. ``--force`` removes
the working folder and starts clean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medsight.io_utils import atomic_write_json, replace_directory
from medsight.model.weights import save_weights

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
KEEP = 2
_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainProgress:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist; the message names the corrupt files."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


class CheckpointDir:
    """The ``checkpoints/`` folder of one stage run."""

    def __init__(self, workdir: Path):
        self.root = Path(workdir) / CHECKPOINTS_DIR

    def staging(self, step: int) -> Path:
        """Where a checkpoint is written before it counts (the same name on every rank)."""
        return self.root / f".{checkpoint_name(step)}.partial"

    def clear_staging(self) -> None:
        """Remove what a save killed half-way left behind (rank 0, before anyone writes)."""
        if self.root.is_dir():
            for path in self.root.glob(".step-*"):
                shutil.rmtree(path, ignore_errors=True)

    def complete(self) -> list[tuple[int, Path]]:
        """Committed checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
        return sorted(found, reverse=True)

    # -- writing -----------------------------------------------------------------------------
    def commit(self, staging: Path, step: int, hashes: dict[str, dict], meta: dict) -> Path:
        """Write the manifest (last), rename the staging folder into place, keep the last KEEP."""
        atomic_write_json(staging / MANIFEST, {"step": step, "files": hashes, **meta})
        final = self.root / checkpoint_name(step)
        replace_directory(staging, final)
        for _, old in self.complete()[KEEP:]:
            # Renamed first: a crash while deleting never leaves a half-deleted "step-N".
            doomed = old.with_name(f".{old.name}.deleting")
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return final

    @staticmethod
    def hash_files(directory: Path, share: tuple[int, int] = (0, 1)) -> dict[str, dict]:
        """Size and sha256 of this rank's share (``(rank, world)``) of the files under ``directory``."""
        index, count = share
        return {
            name: {"bytes": (directory / name).stat().st_size, "sha256": file_sha256(directory / name)}
            for name in _files(directory)[index::count]
        }

    # -- reading -----------------------------------------------------------------------------
    @staticmethod
    def manifest(directory: Path) -> dict:
        path = directory / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: unreadable checkpoint manifest ({error})") from error
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise CheckpointError(f"{path}: not a checkpoint manifest")
        return data

    @classmethod
    def verify(cls, directory: Path, share: tuple[int, int] = (0, 1)) -> str | None:
        """None when this rank's share of the files match the manifest, else what is wrong
        (naming the file)."""
        try:
            listed = cls.manifest(directory)["files"]
        except CheckpointError as error:
            return str(error)
        index, count = share
        for name in sorted(listed)[index::count]:
            expected, path = listed[name], directory / name
            if not path.is_file():
                return f"{path}: missing"
            size = path.stat().st_size
            if size != expected.get("bytes"):
                return f"{path}: {size} bytes, the manifest says {expected.get('bytes')} (truncated or overwritten)"
            if file_sha256(path) != expected.get("sha256"):
                return f"{path}: checksum mismatch (corrupt)"
        return None

    def choose(self, verify: Callable[[Path], str | None]) -> tuple[Path, dict] | None:
        """The newest checkpoint ``verify`` accepts, with its manifest; None when there is none.

        Corrupt ones are logged by name and skipped; when every checkpoint is corrupt, a
        ``CheckpointError`` names them and says how to start clean.
        """
        problems = []
        for _, directory in self.complete():
            problem = verify(directory)
            if problem is None:
                if problems:
                    logger.warning("falling back to %s", directory)
                return directory, self.manifest(directory)
            logger.warning("skipping corrupt checkpoint %s: %s", directory.name, problem)
            problems.append(problem)
        if problems:
            raise CheckpointError(
                f"no usable checkpoint in {self.root}: {'; '.join(problems)}. "
                "Rerun with --force to start this stage clean"
            )
        return None


# -- the plain-torch engine's checkpoint: safetensors only --------------------------------------
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


def write_torch_state(
    directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor]
) -> None:
    """Trainable weights, optimizer moments and the stage's extra tensors, as safetensors."""
    save_weights(module, directory / "trainable.safetensors", only_trainable=True)
    tensors, meta = _flatten_optimizer(optimizer)
    save_file(tensors, str(directory / "optimizer.safetensors"))
    (directory / "optimizer.json").write_text(json.dumps(meta))
    save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(directory / "extra.safetensors"))


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read checkpoint file ({error})") from error


def read_torch_state(
    directory: Path, module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, torch.Tensor]:
    """Restore what ``write_torch_state`` wrote; returns the extra tensors."""
    weights = _load(directory / "trainable.safetensors")
    unexpected = module.load_state_dict(weights, strict=False).unexpected_keys
    if unexpected:
        raise CheckpointError(f"{directory}/trainable.safetensors: holds {unexpected[:3]}, which this model lacks; "
                              "was it written with another config? Rerun with --force to start clean")
    meta = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(_load(directory / "optimizer.safetensors"), meta))
    return _load(directory / "extra.safetensors")


def progress_of(manifest: dict) -> TrainProgress:
    return TrainProgress(**manifest["progress"])


def progress_meta(progress: TrainProgress) -> dict:
    return {"progress": asdict(progress)}
