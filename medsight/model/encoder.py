"""Frozen CLIP image encoder E: open_clip vision tower giving patch tokens (not the pooled vector)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import save_file
from torch import nn

from medsight.config.schema import EncoderConfig

logger = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "open_clip_config.json"
# Libraries open_clip imports, when installed, for towers it builds from them (Hugging Face text
# towers, timm vision towers); its own ViT needs neither.
_OPTIONAL_TOWER_LIBRARIES = ("transformers", "timm")


@dataclass
class EncoderOutput:
    patch_tokens: torch.Tensor  # [B, N, C] N = grid*grid
    cls_token: torch.Tensor  # [B, C]


def open_clip_config(config: EncoderConfig) -> dict:
    """An open_clip model config for the encoder dims; the text tower is a stub we never run."""
    return {
        "embed_dim": config.embed_dim or config.width,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": config.image_size,
            "layers": config.layers,
            "width": config.width,
            "patch_size": config.patch_size,
            "head_width": config.width // config.heads,
        },
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }


@contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """open_clip reports "No pretrained weights loaded" through ``logging.warning`` on the root
    logger. Here that is expected (the tiny preset is random by design, and ``load`` fills the
    weights right after), and the call would also install a root handler on whatever stderr is
    current (a closed pytest capture later). A filter plus a no-op handler prevent both."""
    root = logging.getLogger()
    handler = logging.NullHandler()

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root.addHandler(handler)
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        root.removeHandler(handler)


def _needs_optional_towers(model_name: str) -> bool:
    """Whether open_clip's bundled config ``model_name`` builds a tower from transformers or timm
    (read from its JSON without importing open_clip). Names it does not bundle (MedSIGHT's own
    configs, registered from ``open_clip_config``) build its plain ViT; hub names are not known."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return True
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "model_configs" / f"{model_name}.json"
        if bundled.is_file():
            towers = json.loads(bundled.read_text())
            return bool(towers.get("text_cfg", {}).get("hf_model_name") or towers.get("vision_cfg", {}).get("timm_model_name"))
    return False


def open_clip_module(model_name: str) -> ModuleType:
    """open_clip, imported without transformers and timm when ``model_name`` needs neither.

    open_clip imports both at import time whenever they are installed, and both are (for the LLM).
    That cost each stage that builds the encoder but no LLM (perceiver, codebook, grounding data)
    ~1 s, and the LLM stages timm's share. While open_clip loads they are marked absent, which it
    treats as not installed; the marks go right after, so a later ``import transformers`` works.
    Imported at first use, when the model name is known: stages import this module at start-up,
    single-threaded."""
    if "open_clip" not in sys.modules and not _needs_optional_towers(model_name):
        hidden = [name for name in _OPTIONAL_TOWER_LIBRARIES if name not in sys.modules]
        sys.modules.update(dict.fromkeys(hidden))
        try:
            importlib.import_module("open_clip")
        finally:
            for name in hidden:
                if sys.modules.get(name, False) is None:
                    del sys.modules[name]
    return importlib.import_module("open_clip")


def _registered_by_us(name: str) -> bool:
    """A config this module registered earlier (its stub text tower tells it from open_clip's own)."""
    registered = open_clip_module(name).get_model_config(name)
    return registered is not None and registered.get("text_cfg") == open_clip_config(EncoderConfig())["text_cfg"]


def _create_visual(config: EncoderConfig, pretrained: str | None) -> nn.Module:
    open_clip = open_clip_module(config.model_name)
    # open_clip's registry is process-wide: a custom name registered with other dims (another
    # run in this process) is registered again with this config's.
    builtin = config.model_name in open_clip.list_models() and not _registered_by_us(config.model_name)
    if not builtin:
        # Custom (tiny) architectures are registered from a config file, as open_clip expects.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{config.model_name}.json"
            path.write_text(json.dumps(open_clip_config(config)))
            open_clip.add_model_config(path)
    if pretrained is None:
        with _without_random_init_warning():
            model = open_clip.create_model(config.model_name, pretrained=None)
    else:
        model = open_clip.create_model(config.model_name, pretrained=pretrained)
    visual = model.visual
    grid = getattr(visual, "grid_size", None)
    if grid is not None and tuple(grid) != (config.grid_size, config.grid_size):
        raise ValueError(
            f"encoder {config.model_name}: open_clip grid {tuple(grid)} does not match config "
            f"image_size/patch_size = {config.grid_size}; fix model.encoder.image_size/patch_size"
        )
    return visual


class ImageEncoder(nn.Module):
    """Wraps the open_clip vision tower; always frozen and in eval mode."""

    def __init__(self, config: EncoderConfig, visual: nn.Module):
        super().__init__()
        self.config = config
        self.visual = visual
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.layer_index = config.layers + config.feature_layer if config.feature_layer < 0 else config.feature_layer
        if not 0 <= self.layer_index < config.layers:
            raise ValueError(f"model.encoder.feature_layer={config.feature_layer} out of range for {config.layers} layers")
        self.requires_grad_(False)
        self.eval()
        self.load_report = None  # set by from_open_clip_weights: what a release held besides the ViT

    @classmethod
    def random_init(cls, config: EncoderConfig, seed: int | None = None) -> ImageEncoder:
        """Random weights. With a seed they are the same in every process: the base-models stage
        runs in-process after other work in `medsight chain` and in a fresh interpreter under KFP,
        and an unseeded init made those two (and so every downstream metric) differ."""
        if seed is None:
            return cls(config, _create_visual(config, pretrained=None))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config, _create_visual(config, pretrained=None))

    @classmethod
    def from_open_clip_weights(cls, config: EncoderConfig, weights_path: Path) -> ImageEncoder:
        """Import released CLIP weights: the vision tower of an open_clip / UniMed-CLIP checkpoint.

        UniMed-CLIP's release (``unimed_clip_vit_l14_base_text_encoder.pt``) holds the ViT under
        ``visual.*`` beside a BiomedBERT text tower (``text_encoder.*``) and ``logit_scale``,
        possibly inside ``{"state_dict": ...}`` with DDP's ``module.`` prefix. The vision tower is
        loaded strictly; everything else is ignored and listed in ``load_report``.
        """
        from medsight.model.unimed_clip import read_vision_tower

        if not Path(weights_path).exists():
            raise FileNotFoundError(
                f"model.encoder.weights_path: {weights_path} does not exist; download the weights "
                "there or `dvc pull` them first"
            )
        state, report = read_vision_tower(Path(weights_path))
        encoder = cls.random_init(config)
        expected = encoder.visual.state_dict()
        missing = [key for key in expected if key not in state]
        unexpected = [key for key in state if key not in expected]
        resized = [key for key in state if key in expected and state[key].shape != expected[key].shape]
        if missing or unexpected or resized:
            raise ValueError(
                f"{weights_path}: the vision tower does not fit model.encoder ({config.model_name}: width "
                f"{config.width}, layers {config.layers}); missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"other shape {resized[:3]}"
            )
        encoder.visual.load_state_dict(state, strict=True)
        encoder.load_report = report
        logger.info("%s", report.summary())
        return encoder

    @classmethod
    def load(cls, config: EncoderConfig, directory: Path) -> ImageEncoder:
        """Load what ``save`` wrote (the base-models stage output)."""
        weights = Path(directory) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: encoder weights missing (run the base-models stage)")
        from medsight.model.weights import load_weights

        encoder = cls.random_init(config)
        # Names the file when it is corrupt or its shapes disagree with model.encoder.
        load_weights(encoder.visual, weights)
        return encoder

    def save(self, directory: Path) -> None:
        from medsight.io_utils import atomic_path, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.visual.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(open_clip_config(self.config), indent=2))

    def train(self, mode: bool = True) -> ImageEncoder:
        # Frozen: dropout/norm statistics must never switch to training behaviour.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> EncoderOutput:
        """images: [B, 3, S, S] in [0, 1]."""
        # In the tower's dtype (bf16 under DeepSpeed), whatever the dtype of the mean/std buffers.
        pixels = ((images - self.mean) / self.std).to(next(self.visual.parameters()).dtype)
        out = self.visual.forward_intermediates(
            pixels,
            indices=[self.layer_index],
            output_fmt="NLC",
            intermediates_only=True,
            output_extra_tokens=True,
        )
        patch_tokens = out["image_intermediates"][0]  # [B, N, C]
        cls_token = out["image_intermediates_prefix"][0][:, 0]  # [B, C]
        return EncoderOutput(patch_tokens=patch_tokens, cls_token=cls_token)
