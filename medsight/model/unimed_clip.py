"""The vision tower of a released CLIP checkpoint (UniMed-CLIP's layout), everything else ignored.

UniMed-CLIP (mbzuai-oryx/UniMed-CLIP, ``src/training/main.py`` ``save_checkpoint``) saves
``{"epoch", "name", "state_dict": model.state_dict(), "optimizer", ...}`` of a DDP-wrapped CLIP:
keys ``module.visual.*`` (an open_clip ViT: conv1, class_embedding, positional_embedding, ln_pre,
transformer.resblocks.N.*, ln_post, proj), ``module.text_encoder.*`` (BiomedBERT with an MLP
projection) and ``module.logit_scale``. Plain ``{"visual.*": ...}`` files and bare vision-tower
state dicts load too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medsight.model.checkpoint_files import CheckpointError, load_checkpoint_file, strip_prefix, tensors_only

VISION_PREFIX = "visual."
_VISION_KEYS = ("conv1.weight", "class_embedding", "positional_embedding")


@dataclass
class VisionTowerReport:
    source: str
    loaded: int
    ignored: dict[str, int] = field(default_factory=dict)  # top-level key prefix -> tensor count

    def summary(self) -> str:
        ignored = ", ".join(f"{name}.* ({count} tensors)" for name, count in sorted(self.ignored.items())) or "nothing"
        return f"{self.source}: loaded the vision tower ({self.loaded} tensors); ignored {ignored}"


def read_vision_tower(path: Path) -> tuple[dict[str, torch.Tensor], VisionTowerReport]:
    """-> (open_clip ``visual`` state dict, report of what was left out)."""
    raw = load_checkpoint_file(path)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    state = strip_prefix(tensors_only(raw, path, "state_dict"), "module.")
    vision = {key[len(VISION_PREFIX):]: value for key, value in state.items() if key.startswith(VISION_PREFIX)}
    if not vision:
        if all(key in state for key in _VISION_KEYS):
            return state, VisionTowerReport(str(path), len(state))
        raise CheckpointError(
            f"{path}: no vision tower found (no 'visual.*' keys and no bare ViT keys such as 'conv1.weight'); "
            f"top-level keys: {', '.join(sorted({k.split('.')[0] for k in state})[:8])}"
        )
    ignored = Counter(key.split(".")[0] for key in state if not key.startswith(VISION_PREFIX))
    return vision, VisionTowerReport(str(path), len(vision), dict(ignored))
