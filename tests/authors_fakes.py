"""Fabricated checkpoints in the layout of the authors' release, from a written-down key/shape list.

Every key and shape below is a fact read from Aofei-Chang/MedSIGHT at commit 670585b; the comment
on each entry names the file and line that defines it. Values are random: these are layouts, not
weights. Nothing here imports or copies the authors' code.

  P  = source/regtok/region_perceiver.py
  VQ = source/regtok/vq_model.py
  TR = source/regtok/vq_train.py
  RS = RegLLM/RegSeg.py
  TS = RegLLM/llava/train/train_seg.py
  PB = RegLLM/llava/model/multimodal_projector/builder.py
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# The released configuration: VQ L172-177 builds RegionPerceiver(dim=1024, dim_head=64, heads=8,
# ff_mult=4); source/regtok/regtok_config.yaml: num_queries 20, num_stages 3, num_classes 17;
# source/scripts/train_vq_full.sh: 18 modalities x 32 codes of dimension 64.
FULL = dict(dim=1024, heads=8, head_dim=64, ffn=4096, queries=20, layers=3, classes=17, modalities=18, codes=32, code_dim=64)


def _attention_keys(prefix: str, d: int, inner: int) -> dict[str, tuple[int, ...]]:
    """P L42-54 (PerceiverCrossAttention): two LayerNorms, bias-free q, fused kv and out projections."""
    return {
        f"{prefix}.norm_media.weight": (d,), f"{prefix}.norm_media.bias": (d,),  # P L49
        f"{prefix}.norm_latents.weight": (d,), f"{prefix}.norm_latents.bias": (d,),  # P L50
        f"{prefix}.to_q.weight": (inner, d),  # P L52
        f"{prefix}.to_kv.weight": (2 * inner, d),  # P L53
        f"{prefix}.to_out.weight": (d, inner),  # P L54
    }


def _ffn_keys(prefix: str, d: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """P L24-31 (FeedForward): Sequential(LayerNorm [0], Linear no bias [1], GELU [2], Linear no bias [3])."""
    return {f"{prefix}.0.weight": (d,), f"{prefix}.0.bias": (d,), f"{prefix}.1.weight": (hidden, d), f"{prefix}.3.weight": (d, hidden)}


def _norm(prefix: str, d: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (d,), f"{prefix}.bias": (d,)}


def perceiver_key_shapes(dim: int, heads: int, head_dim: int, ffn: int, queries: int, layers: int, classes: int, **_) -> dict[str, tuple[int, ...]]:
    """Keys of ``RegionPerceiver`` (P L671-735) with upsample_mode "conv", no self-attention."""
    inner = heads * head_dim
    keys = {
        "region_queries": (1, queries, dim),  # P L702
        "region_position_embed.weight": (queries, dim),  # P L704
        **_attention_keys("init_cross_attn", dim, inner),  # P L708
        **_norm("init_cross_norm", dim),  # P L709
        **_ffn_keys("init_ff", dim, ffn),  # P L710
        **_norm("init_ff_norm", dim),  # P L711
    }
    for i in range(layers):
        keys[f"conv_adapters.{i}.conv.weight"] = (dim, dim, 3, 3)  # P L717 -> ConvAdapter P L298
        keys[f"conv_adapters.{i}.conv.bias"] = (dim,)
        block = f"bi_blocks.{i}"  # P L720-723 -> BiDirectionalBlock P L469-492
        keys.update(_attention_keys(f"{block}.region_to_image", dim, inner))  # P L477
        keys.update(_norm(f"{block}.region_to_image_norm", dim))  # P L478
        keys.update(_attention_keys(f"{block}.image_to_region", dim, inner))  # P L485
        keys.update(_norm(f"{block}.image_to_region_norm", dim))  # P L486
        keys.update(_ffn_keys(f"{block}.ff_region", dim, ffn))  # P L488
        keys.update(_norm(f"{block}.ff_region_norm", dim))  # P L489
        keys.update(_ffn_keys(f"{block}.ff_image", dim, ffn))  # P L491
        keys.update(_norm(f"{block}.ff_image_norm", dim))  # P L492
    keys.update({
        "segmentation_cls_head.proj.weight": (dim, dim), "segmentation_cls_head.proj.bias": (dim,),  # P L735 -> L222
        "segmentation_cls_head.class_embed.weight": (classes + 1, dim),  # P L226
        "segmentation_cls_head.class_embed.bias": (classes + 1,),
    })
    return keys


def codebook_key_shapes(dim: int, classes: int, modalities: int, codes: int, code_dim: int, encoder_width: int | None = None, **_) -> dict[str, tuple[int, ...]]:
    """Trainable keys of a stage-2 checkpoint (TR L201-206: quantizer, code_decoder, to_code and
    modality_predictor train; RegTok registers its quantizer before the perceiver, VQ L147-177,
    so the shared codebooks keep the name ``quantizer.``)."""
    width = encoder_width or dim
    keys: dict[str, tuple[int, ...]] = {
        f"quantizer.codebooks.{m}.embedding.weight": (codes, code_dim) for m in range(modalities)  # VQ L159-166, L511
    }
    keys.update({"modality_predictor.weight": (modalities, width), "modality_predictor.bias": (modalities,)})  # VQ L155
    to_code = "region_perceiver.to_code"  # P L743-750: Linear, GELU, LayerNorm, Linear, GELU, LayerNorm
    keys.update({f"{to_code}.0.weight": (dim, dim), f"{to_code}.0.bias": (dim,), **_norm(f"{to_code}.2", dim),
                 f"{to_code}.3.weight": (code_dim, dim), f"{to_code}.3.bias": (code_dim,), **_norm(f"{to_code}.5", code_dim)})
    from_code = "region_perceiver.code_decoder.from_code"  # P L586-593
    keys.update({f"{from_code}.0.weight": (dim, code_dim), f"{from_code}.0.bias": (dim,), **_norm(f"{from_code}.2", dim),
                 f"{from_code}.3.weight": (dim, dim), f"{from_code}.3.bias": (dim,), **_norm(f"{from_code}.5", dim)})
    head = "region_perceiver.code_decoder.segmentation_cls_head_quant"  # P L596-597 (quant_use_seg) -> L220-226
    keys.update({f"{head}.proj.weight": (dim, dim), f"{head}.proj.bias": (dim,),
                 f"{head}.class_embed.weight": (classes + 1, dim), f"{head}.class_embed.bias": (classes + 1,)})
    return keys


def projector_key_shapes(encoder_width: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """mm_projector.bin (TS L267-293 saves named parameters matching 'mm_projector'); mlp2x_gelu = PB L39-46."""
    return {"model.mm_projector.0.weight": (hidden, encoder_width), "model.mm_projector.0.bias": (hidden,),
            "model.mm_projector.2.weight": (hidden, hidden), "model.mm_projector.2.bias": (hidden,)}


def _is_layernorm(key: str) -> bool:
    return "norm" in key or bool(re.search(r"(init_ff|ff_region|ff_image)\.0\.|(to_code|from_code)\.(2|5)\.", key))


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Values that keep a post-norm network well scaled: LayerNorms near (1, 0), weights ~ 1/sqrt(fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if _is_layernorm(key):
            base = 1.0 if key.endswith("weight") else 0.0
            value = base + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
        elif len(shape) == 1:
            value = 0.02 * torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            value = torch.randn(shape, generator=generator, dtype=torch.float64) / fan_in**0.5
        state[key] = value.to(dtype)
    return state


def save_vq_train_checkpoint(path: Path, model: dict[str, torch.Tensor], steps: int = 79280) -> Path:
    """A ``vq_train.py`` checkpoint (TR L494-499): trainable weights under "model", the step, the
    argparse Namespace of the run, and the optimizer state."""
    torch.save({
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "params": [0]}]},
        "steps": steps,
        "args": argparse.Namespace(num_queries=20, num_stages=3, up_sample_mode="conv", results_dir="RegTok"),
    }, path)
    return path


def save_projector(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)  # TS L293: torch.save(weight_to_save, .../mm_projector.bin)
    return path


def save_llava_model(folder: Path, llm_state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor], llm_config: dict, tokenizer) -> Path:
    """The final model folder: a Hugging Face save of RegSegForCausalLM (RS L300-316) whose
    config says model_type "llava_qwen" (RegLLM/llava/model/language_model/llava_qwen3.py L37-38),
    with the tokenizer the region tokens were added to (TS L1448-1450)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({**llm_state, **extra}, str(folder / "model.safetensors"))
    config = {**llm_config, "model_type": "llava_qwen", "architectures": ["RegSegForCausalLM"],
              "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -1,
              "use_mm_proj": True, "use_sep_proj": False}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(str(folder))
    return folder


# The template the authors render prompts with (RegLLM/llava/eval/chatbot.py L342-347); for a
# system + user turn with a generation prompt it gives the same text as Qwen3's own template.
AUTHORS_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]


def qwen_like_tokenizer(modalities: int = 2, codes: int = 3) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["Is there a tumor in the liver? yes, no. The kidney is normal."] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = AUTHORS_TEMPLATE
    # train_seg.py L1448-1449: [M{i}_{j}] for i in modalities, j in codes, added as plain tokens.
    tokenizer.add_tokens([f"[M{i}_{j}]" for i in range(modalities) for j in range(codes)])
    return tokenizer


def fabricate_final_model(folder, hidden=32, perceiver_dim=16, modalities=2, codes=3, seed=0, emit_region_tokens=False):
    """A tiny Qwen3 RegSegForCausalLM save. ``emit_region_tokens``: the LM head makes every step
    pick [M0_0] or [M0_1] (rows +-50 u, the rest scaled down), so generated answers carry region
    tokens whatever the random weights, and masks get decoded."""
    tokenizer = qwen_like_tokenizer(modalities, codes)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, head_dim=hidden // 4, tie_word_embeddings=False)
    torch.manual_seed(seed)
    llm = Qwen3ForCausalLM(config)
    g = torch.Generator().manual_seed(seed + 1)
    if emit_region_tokens:
        with torch.no_grad():
            direction = torch.randn(hidden, generator=g)
            llm.lm_head.weight.mul_(0.01)
            first, second = tokenizer.convert_tokens_to_ids(["[M0_0]", "[M0_1]"])
            llm.lm_head.weight[first] = 50 * direction / direction.norm()
            llm.lm_head.weight[second] = -50 * direction / direction.norm()
    extra = {  # RegSeg.py L84-88 (token_projection), L100 (visual_feature_norm); mm_projector: mlp2x_gelu
        "model.mm_projector.0.weight": torch.randn(hidden, perceiver_dim, generator=g), "model.mm_projector.0.bias": torch.randn(hidden, generator=g),
        "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g), "model.mm_projector.2.bias": torch.randn(hidden, generator=g),
        "model.token_projection.0.weight": torch.randn(hidden, hidden, generator=g), "model.token_projection.0.bias": torch.randn(hidden, generator=g),
        "model.token_projection.2.weight": torch.randn(perceiver_dim, hidden, generator=g), "model.token_projection.2.bias": torch.randn(perceiver_dim, generator=g),
        "model.visual_feature_norm.weight": torch.ones(perceiver_dim), "model.visual_feature_norm.bias": torch.zeros(perceiver_dim),
    }
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    save_llava_model(folder, state, extra, config.to_dict(), tokenizer)
    return llm, tokenizer, extra
