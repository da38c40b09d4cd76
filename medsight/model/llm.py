"""The language model: Qwen3 (or Qwen2 for the Qwen2.5 backbone variant), tiny or from local weights;
``backbone: auto`` loads any Hugging Face causal LM from a local directory (never downloads).

MedSight calls the LM's inner transformer as ``llm.base_model`` (Qwen's ``model``, GPT-2's
``transformer``, ...) with ``inputs_embeds``, and its input/output embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from medsight.config.schema import LLMConfig
from medsight.model.weights import WeightsError

_BACKBONES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def _backbone(name: str):
    if name not in _BACKBONES:
        raise ValueError(f"model.llm.backbone: {name!r} is not one of {', '.join(_BACKBONES)}, auto")
    return _BACKBONES[name]


def random_init_llm(config: LLMConfig, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A random-init model with the config's dims (tiny preset); deterministic for a seed."""
    if config.backbone == "auto":
        raise ValueError("model.llm.backbone=auto needs model.llm.weights_path (a local Hugging Face model directory)")
    config_cls, model_cls = _backbone(config.backbone)
    hf_config = config_cls(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        head_dim=config.hidden_size // config.num_heads,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_cls(hf_config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def load_llm(directory: Path, config: LLMConfig, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a saved (safetensors) model directory; refuses a backbone that disagrees with config."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory}: no LLM here (config.json missing); set model.llm.weights_path or run base-models"
        )
    try:
        if config.backbone == "auto":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, use_safetensors=True,
                                                         local_files_only=True)
        else:
            _, model_cls = _backbone(config.backbone)
            model = model_cls.from_pretrained(str(directory), dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        # A truncated shard, a config.json that is not JSON, shapes that disagree with the config.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"{directory}: cannot load the LLM ({first}); rerun base-models or pull it again") from None
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def save_llm(model: PreTrainedModel, directory: Path) -> None:
    from medsight.io_utils import atomic_directory

    with atomic_directory(Path(directory)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
