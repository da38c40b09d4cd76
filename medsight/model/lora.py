"""LoRA adapters on the LLM (stage 5's parameter-efficient variant, App. F.4), through ``peft``.

The adapters are injected into the Hugging Face model in place, so ``MedSight`` keeps calling
``llm.base_model(...)`` unchanged; after training they are merged into the base weights and removed,
and the saved LLM is a plain model that every later stage loads as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from medsight.config.schema import InstructTuneConfig

if TYPE_CHECKING:  # peft is imported only when LoRA is switched on
    from peft import PeftModel


def attach_lora(llm: PreTrainedModel, stage: InstructTuneConfig) -> PeftModel:
    """Inject rank-``lora_rank`` adapters into ``llm``'s ``lora_targets`` linear layers (in place).

    Returns the peft wrapper, needed only to merge; ``llm`` itself now carries the adapters and
    only their parameters require gradients.
    """
    from peft import LoraConfig, get_peft_model

    if stage.lora_rank <= 0:
        raise ValueError(f"instruct_tune.lora_rank must be > 0 to attach LoRA, got {stage.lora_rank}")
    config = LoraConfig(
        r=stage.lora_rank,
        lora_alpha=stage.lora_alpha,
        lora_dropout=stage.lora_dropout,
        target_modules=list(stage.lora_targets),
        bias="none",
    )
    return get_peft_model(llm, config)


def lora_parameter(name: str) -> bool:
    return "lora_" in name


def merge_lora(wrapper: PeftModel) -> PreTrainedModel:
    """Fold the adapters into the base weights and return the plain model."""
    return wrapper.merge_and_unload()


def merged_lora_state(state: dict[str, torch.Tensor], wrapper: PeftModel) -> dict[str, torch.Tensor]:
    """The plain model's state from a consolidated state of the adapted LLM (``llm.state_dict()``
    names): each targeted weight becomes W + (alpha / r) B A, the adapters are dropped.

    What ``merge_lora`` does through peft, on tensors instead of modules: under ZeRO-3 the modules'
    parameters are partitioned across ranks, so the merge runs on the state rank 0 gathered.
    """
    config = wrapper.peft_config["default"]
    scaling = config.lora_alpha / config.r
    merged: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if ".base_layer." in name:
            prefix, leaf = name.split(".base_layer.")
            if leaf == "weight" and f"{prefix}.lora_A.default.weight" in state:
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = value + scaling * (b.float() @ a.float()).to(value.dtype)
            name = f"{prefix}.{leaf}"
        merged[name] = value
    return merged
