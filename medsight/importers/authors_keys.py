"""Key maps from the authors' released checkpoints to this platform's modules.

Facts taken from Aofei-Chang/MedSIGHT (key names, shapes, module order; no code):
  * stage-1 / stage-2 checkpoints (``source/regtok/vq_train.py``) are ``{"model": {trainable
    parameters of RegTok}, "steps", "args", ["optimizer"], ["ema"]}``; RegTok names its perceiver
    ``region_perceiver`` and registers the modality quantizer before it, so the codebooks appear
    as ``quantizer.codebooks.<m>.embedding.weight`` (``source/regtok/vq_model.py``);
  * the stage-3 adapter ``mm_projector.bin`` holds ``model.mm_projector.{0,2}.{weight,bias}``
    (``RegLLM/llava/train/train_seg.py`` ``safe_save_model_for_hf_trainer``);
  * the final model is a Hugging Face folder of Qwen3 weights plus ``model.mm_projector.*`` and
    ``model.token_projection.{0,2}.*`` (``RegLLM/RegSeg.py``), with the region tokens
    ``[M{m}_{k}]`` appended to the vocabulary (``RegLLM/llava/train/train_seg.py``).
Every source key must be claimed by a rule; unknown keys are an error, never silently dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from medsight.model.checkpoint_files import CheckpointError

_NORMS = {"norm_media": "context_norm", "norm_latents": "reader_norm"}
_FFN = {"0": "norm", "1": "fc1", "3": "fc2"}
_PARAM = r"(?P<param>weight|bias)"  # named groups only: prefixes below may carry a layer index


def _attention(prefix: str, target: str) -> list[tuple[str, str]]:
    rules = [(rf"{prefix}\.{old}\.{_PARAM}", rf"{target}.{new}.\g<param>") for old, new in _NORMS.items()]
    rules.append((rf"{prefix}\.(?P<proj>to_q|to_kv|to_out)\.weight", rf"{target}.\g<proj>.weight"))
    return rules


def _ffn(prefix: str, target: str) -> list[tuple[str, str]]:
    return [(rf"{prefix}\.{old}\.{_PARAM}", rf"{target}.{new}.\g<param>") for old, new in _FFN.items()]


def _block(source: str, target: str, attention: str, attention_norm: str, ffn: str, ffn_norm: str) -> list[tuple[str, str]]:
    """Rules of one post-norm block (attention + its norm, FFN + its norm)."""
    rules = _attention(f"{source}{attention}", f"{target}.attn")
    rules.append((rf"{source}{attention_norm}\.{_PARAM}", rf"{target}.attn_out_norm.\g<param>"))
    rules += _ffn(f"{source}{ffn}", f"{target}.ffn")
    rules.append((rf"{source}{ffn_norm}\.{_PARAM}", rf"{target}.ffn_out_norm.\g<param>"))
    return rules


PERCEIVER_RULES: list[tuple[str, str]] = [
    (r"region_queries", "query_content"),
    (r"region_position_embed\.weight", "query_pos"),
    *_block("", "initial", "init_cross_attn", "init_cross_norm", "init_ff", "init_ff_norm"),
    (r"conv_adapters\.(\d+)\.conv\.(weight|bias)", r"adapters.\1.conv.\2"),
    *_block(r"bi_blocks\.(?P<i>\d+)\.", r"layers.\g<i>.read_image", "region_to_image", "region_to_image_norm", "ff_region", "ff_region_norm"),
    *_block(r"bi_blocks\.(?P<i>\d+)\.", r"layers.\g<i>.write_image", "image_to_region", "image_to_region_norm", "ff_image", "ff_image_norm"),
    (r"segmentation_cls_head\.proj\.(weight|bias)", r"mask_proj.\1"),
    (r"segmentation_cls_head\.class_embed\.(weight|bias)", r"class_head.\1"),
]

# Keys of the codebook stage that live under region_perceiver. (the quantizer part of RegTok).
CODEBOOK_RULES: list[tuple[str, str]] = [
    (r"to_code\.(0|2|3|5)\.(weight|bias)", r"project_in.\1.\2"),
    (r"code_decoder\.from_code\.(0|2|3|5)\.(weight|bias)", r"project_out.\1.\2"),
    (r"code_decoder\.segmentation_cls_head_quant\.proj\.(weight|bias)", r"quantized_head.mask_proj.\1"),
    (r"code_decoder\.segmentation_cls_head_quant\.class_embed\.(weight|bias)", r"quantized_head.class_head.\1"),
]
CODE_KEY = re.compile(r"(?:region_perceiver\.)?quantizer\.codebooks\.(\d+)\.embedding\.weight")
# Quantizer buffers (usage statistics, step counters): state, not weights.
QUANTIZER_BUFFER = re.compile(r"(?:region_perceiver\.)?quantizer\.codebooks\.\d+\.(initted|step|codebook_used|ema_usage)")

PROJECTOR_RULES: list[tuple[str, str]] = [(r"model\.mm_projector\.(0|2)\.(weight|bias)", r"mlp.\1.\2")]
T2V_RULES: list[tuple[str, str]] = [(r"model\.token_projection\.(0|2)\.(weight|bias)", r"mlp.\1.\2")]
# Final-model keys that are not the LLM, with what happens to them.
MODEL_EXTRA_IGNORED = {
    r"model\.visual_feature_norm\.": "a LayerNorm the released forward pass never applies",
    r"model\.vision_tower\.": "the frozen vision tower; it is read from --perceiver and the UniMed-CLIP file instead",
    r"model\.mask_decoder\.": "the unused lightweight decoder",
}


@dataclass
class Mapped:
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why


def apply_rules(
    state: dict[str, torch.Tensor],
    rules: Iterable[tuple[str, str]],
    what: str,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Rename every key by the first rule that matches it whole; an unclaimed key is an error."""
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match:
                target = match.expand(replacement)
                out[target] = transform(target, value) if transform else value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{what}: {len(unknown)} key(s) this importer does not know, e.g. {', '.join(unknown[:4])}; "
            "the checkpoint is from another variant of the authors' code (self-attention or "
            "query-aware adapters are not supported)"
        )
    return out


def perceiver_state(state: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Authors' ``region_perceiver.*`` (prefix already removed) -> AuthorsRegionPerceiver keys."""

    def reshape(target: str, value: torch.Tensor) -> torch.Tensor:
        return value.reshape(value.shape[-2:]) if target == "query_content" else value  # [1, Q, d] -> [Q, d]

    return apply_rules(state, PERCEIVER_RULES, what, reshape)


def codebook_state(model: dict[str, torch.Tensor], what: str) -> Mapped:
    """A stage-2 ``model`` dict -> AuthorsCodebook keys (codes stacked [M, K, d_q])."""
    mapped = Mapped()
    codes: dict[int, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in model.items():
        code = CODE_KEY.fullmatch(key)
        if code:
            codes[int(code.group(1))] = value
        elif QUANTIZER_BUFFER.fullmatch(key):
            mapped.ignored[key] = "quantizer bookkeeping buffer (usage statistics), not a weight"
        elif key.startswith("modality_predictor."):
            mapped.state[key] = value
        elif key.startswith("region_perceiver.") and not key.startswith(("region_perceiver.to_code", "region_perceiver.code_decoder")):
            mapped.ignored[key] = "a perceiver weight; the perceiver is read from --perceiver"
        elif key.startswith("region_perceiver."):
            rest[key[len("region_perceiver."):]] = value
        else:
            rest[key] = value
    if not codes:
        raise CheckpointError(f"{what}: no quantizer.codebooks.<m>.embedding.weight keys; is this the stage-2 (codebook) checkpoint?")
    if sorted(codes) != list(range(len(codes))):
        raise CheckpointError(f"{what}: modality codebooks {sorted(codes)} are not numbered 0..{len(codes) - 1}")
    mapped.state["codes"] = torch.stack([codes[m] for m in range(len(codes))])  # [M, K, d_q]
    mapped.state.update(apply_rules(rest, CODEBOOK_RULES, what))
    return mapped
