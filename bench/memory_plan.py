"""Per-GPU memory of every stage at the full preset on N H100 80 GB: DeepSpeed's ZeRO estimators
for the model states, activation sizes measured here, one table per GPU count.

    python bench/memory_plan.py [--gpus 4 8] [--json plan.json]

Measured on the CPU (no GPU needed), at the full preset's widths:
- parameter counts of every module (built on the meta device);
- bytes autograd keeps for backward, through ``torch.autograd.graph.saved_tensors_hooks``:
  one Qwen3-8B decoder layer per token (at two sequence lengths, to check it is linear), and
  the Region Perceiver + set criterion per image (336 px, I_r at 192x192, 4 regions), in bf16.
Computed: ZeRO-3 model states (``estimate_zero3_model_states_mem_needs``: 18 bytes per trained
parameter spread over the ranks plus the largest layer gathered; frozen parameters 2 bytes spread
over the ranks), DDP model states (16 bytes per trained parameter, 4 per frozen one, on every
rank), checkpointed LLM activations (each layer's input kept, one layer recomputed at a time),
the LM head's logits (bf16 + the float32 copy the loss takes + their gradients).
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch

GiB = 2**30
H100 = 80 * 10**9  # bytes on an "80 GB" H100 (74.5 GiB)
QWEN3_VOCAB = 151_936
# ZeRO-3 keeps parameters of the layers being computed (and prefetched) gathered; DeepSpeed's
# defaults bound that by stage3_max_live_parameters = 1e9 elements (2 GB in bf16).
ZERO3_LIVE_BYTES = 2 * 10**9
# CUDA context, NCCL buffers, allocator fragmentation: measured 3-6 GiB on H100 DeepSpeed runs
# elsewhere; a flat allowance rather than a claim.
OVERHEAD = 6 * GiB


@contextmanager
def saved_bytes(*modules: torch.nn.Module):
    """Bytes of the tensors autograd saves for backward inside the block (storage-deduplicated),
    not counting the ``modules``' own parameters (they are model states, counted apart)."""
    storages: dict[int, int] = {}
    total = {"bytes": 0}
    weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total["bytes"] = sum(storages.values())


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts() -> dict[str, int]:
    from medsight.config import get_preset
    from medsight.model.codebook import ModalityCodebook
    from medsight.model.encoder import ImageEncoder
    from medsight.model.llm import random_init_llm
    from medsight.model.projectors import TextToVisionProjector, VisionToTextProjector
    from medsight.model.region_perceiver import RegionPerceiver
    from medsight.model.region_vocabulary import RegionTokenEmbeddings

    model = get_preset("full").model
    with torch.device("meta"):
        llm = random_init_llm(model.llm, vocab_size=QWEN3_VOCAB)
    encoder = ImageEncoder.random_init(model.encoder)  # open_clip cannot build on "meta" (1.2 GB)
    return {
        "encoder": count(encoder),
        "perceiver": count(RegionPerceiver(model.encoder.width, model.perceiver)),
        "codebook": count(ModalityCodebook(model.perceiver.dim, model.codebook, model.encoder.width)),
        "v2t": count(VisionToTextProjector(model.encoder.width, model.perceiver.dim, model.llm.hidden_size, model.patch_merge)),
        "t2v": count(TextToVisionProjector(model.llm.hidden_size, model.perceiver.dim)),
        "region_tokens": count(RegionTokenEmbeddings(model.codebook.num_modalities * model.codebook.codes_per_modality,
                                                     model.llm.hidden_size)),
        "llm": count(llm),
        "llm_largest_layer": QWEN3_VOCAB * model.llm.hidden_size,  # embed_tokens (and lm_head)
        "llm_layers": model.llm.num_layers,
        "hidden": model.llm.hidden_size,
    }


def llm_layer_bytes_per_token(lengths=(64, 128)) -> dict[int, float]:
    """Saved-for-backward bytes per token of one full-width Qwen3 decoder layer (bf16)."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

    from medsight.config import get_preset

    llm = get_preset("full").model.llm
    config = Qwen3Config(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                         num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                         head_dim=llm.hidden_size // llm.num_heads, vocab_size=QWEN3_VOCAB,
                         attn_implementation="sdpa")
    layer = Qwen3DecoderLayer(config, layer_idx=0).to(torch.bfloat16)
    rotary = Qwen3RotaryEmbedding(config)
    out = {}
    for length in lengths:
        hidden = torch.randn(1, length, llm.hidden_size, dtype=torch.bfloat16, requires_grad=True)
        positions = torch.arange(length)[None]
        cos, sin = rotary(hidden, positions)
        with saved_bytes(layer) as saved:
            layer(hidden, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
        out[length] = saved["bytes"] / length
    return out


def perceiver_bytes_per_image(regions: int = 4) -> float:
    """Saved-for-backward bytes of stage 1's trained part per image, bf16 autocast."""
    from medsight.config import get_preset
    from medsight.model.criterion import SetCriterion
    from medsight.model.region_perceiver import RegionPerceiver

    config = get_preset("full")
    model = config.model
    perceiver = RegionPerceiver(model.encoder.width, model.perceiver)
    criterion = SetCriterion(model.perceiver.num_classes, model.loss)
    tokens = torch.randn(1, model.encoder.num_patches, model.encoder.width)
    size = model.encoder.image_size
    masks = [(torch.rand(regions, size, size) > 0.7).float()]
    labels = [torch.arange(regions) % model.perceiver.num_classes]
    with torch.autocast("cpu", dtype=torch.bfloat16), saved_bytes(perceiver) as saved:
        criterion(perceiver(tokens), masks, labels)
    return saved["bytes"]


@dataclass
class Row:
    stage: str
    states: float  # bytes per GPU
    activations: float
    note: str

    def total(self) -> float:
        return self.states + self.activations + OVERHEAD


def plan(gpus: int, counts: dict, per_token_layer: float, per_image: float, presets) -> list[Row]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    def zero3(trained: int, frozen: int, largest: int) -> float:
        _, gpu, _ = estimate_zero3_model_states_mem_needs(trained, largest, num_gpus_per_node=gpus, num_nodes=1,
                                                          cpu_offload=False, cpu_offload_params=False, zero_init=True)
        return gpu + 2 * frozen / gpus + ZERO3_LIVE_BYTES

    hidden, layers = counts["hidden"], counts["llm_layers"]
    vision = counts["encoder"] + counts["perceiver"]

    def llm_activations(stage) -> float:
        tokens = stage.batch_size * stage_tokens(stage)
        checkpoints = layers * tokens * hidden * 2  # each layer's input, bf16
        one_layer = tokens * per_token_layer  # recomputed in backward, one at a time
        # bf16 head output + the concatenated (base + region) logits + the float32 copy the loss
        # takes + its gradient + the bf16 gradients back through the cat: 16 bytes per logit.
        logits = tokens * (QWEN3_VOCAB + counts["region_tokens"] // hidden) * (2 + 2 + 4 + 4 + 2 + 2)
        return checkpoints + one_layer + logits

    full = presets
    rows = []
    p1, p2 = full.perceiver_pretrain, full.codebook_pretrain
    rows.append(Row("perceiver-pretrain (DDP)", counts["encoder"] * 4 + counts["perceiver"] * 16,
                    p1.batch_size * per_image, f"micro-batch {p1.batch_size}, bf16 autocast"))
    rows.append(Row("codebook-pretrain (DDP)", vision * 4 + counts["codebook"] * 16,
                    p2.batch_size * per_image, f"micro-batch {p2.batch_size}; perceiver heads only (<= stage 1)"))
    small = counts["v2t"]
    rows.append(Row("v2t-align (ZeRO-3)", zero3(small, counts["llm"] + vision, small), llm_activations(full.v2t_align),
                    _llm_note(full.v2t_align)))
    trained4 = counts["t2v"] + counts["region_tokens"]
    rows.append(Row("t2v-align (ZeRO-3)", zero3(trained4, counts["llm"] + vision + small, trained4),
                    llm_activations(full.t2v_align), _llm_note(full.t2v_align)))
    trained5 = counts["llm"] + trained4 + small
    rows.append(Row("instruct-tune (ZeRO-3)", zero3(trained5, vision, counts["llm_largest_layer"]),
                    llm_activations(full.instruct_tune), _llm_note(full.instruct_tune)))
    ev = full.evaluate
    kv = ev.batch_size * (stage_tokens(full.instruct_tune) + ev.max_new_tokens) * layers * 2 * 8 * 128 * 2
    rows.append(Row("evaluate (replicated, bf16)", 2 * (counts["llm"] + vision + trained4 + small), kv,
                    f"batch {ev.batch_size}, KV cache"))
    return rows


def stage_tokens(stage) -> int:
    """Sequence length the plan budgets: 576 patch + 20 region tokens + 428 text = 1024."""
    return 1024


def _llm_note(stage) -> str:
    ds = stage.deepspeed
    return (f"micro-batch {stage.batch_size} x 1024 tokens, accumulation {ds.gradient_accumulation_steps}, "
            f"ZeRO-{ds.zero_stage}, bf16, gradient checkpointing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from medsight.config import get_preset

    torch.manual_seed(0)
    counts = parameter_counts()
    layer = llm_layer_bytes_per_token()
    image = perceiver_bytes_per_image()
    print("parameters:", json.dumps({k: v for k, v in counts.items()}, indent=1))
    print("one Qwen3-8B layer, saved bytes per token (bf16):", {k: round(v) for k, v in layer.items()})
    print(f"perceiver + criterion, saved bytes per image (bf16 autocast): {image / GiB:.2f} GiB")
    per_token = max(layer.values())
    result = {"counts": counts, "llm_layer_bytes_per_token": layer, "perceiver_bytes_per_image": image, "plans": {}}
    for gpus in args.gpus:
        rows = plan(gpus, counts, per_token, image, get_preset("full"))
        print(f"\n### {gpus} x H100 80 GB\n")
        print("| stage | model states (GiB) | activations (GiB) | + overhead = total (GiB) | fits 80 GB | setting |")
        print("|---|---:|---:|---:|---|---|")
        for row in rows:
            total = row.total()
            print(f"| {row.stage} | {row.states / GiB:.1f} | {row.activations / GiB:.1f} | {total / GiB:.1f} | "
                  f"{'yes' if total < H100 else 'NO'} | {row.note} |")
        result["plans"][gpus] = [{**row.__dict__, "total": row.total()} for row in rows]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
