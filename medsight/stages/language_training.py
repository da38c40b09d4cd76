"""What the three LLM stages (3, 4, 5) share: the freezing plan, data, the DeepSpeed loop,
validation and the consolidated save.

Data-parallel with DeepSpeed ZeRO: each rank streams its share of the conversations (images
decoded by DataLoader workers), batches go to the rank's device in the model's dtype, and at the
end rank 0 writes each trained module once, consolidated from every rank's partition.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from medsight.config.schema import ExperimentConfig, LanguageTrainConfig
from medsight.data.conversation_dataset import (
    IGNORE_INDEX,
    ConversationDataset,
    PromptFormat,
    collate_conversations,
)
from medsight.data.llava import Conversation, read_conversations
from medsight.data.taxonomy import Taxonomy
from medsight.model.bundle import module_file, taxonomy_file
from medsight.model.dice import hard_dice
from medsight.model.lora import lora_parameter
from medsight.model.medsight import MedSight
from medsight.model.visual_cache import VisualContextCache
from medsight.train import distributed
from medsight.train.data import EpochBatches, ResumableSampler, ShardSampler, make_loader, to_device
from medsight.train.engine import DeepSpeedEngine, gathered_parameters
from medsight.train.loop import LoopResult, run_training
from medsight.train.tracker import Tracker

logger = logging.getLogger(__name__)

# DESIGN.md's stage table, in one place: what each LLM stage may update.
TRAINABLE_MODULES: dict[str, tuple[str, ...]] = {
    "v2t-align": ("v2t",),
    "t2v-align": ("t2v", "region_tokens"),
    "instruct-tune": ("llm", "region_tokens", "v2t", "t2v"),
}

# The loss terms each stage must see non-zero (loss_watch.py): stage 3 has no region tokens.
EXPECTED_LOSSES: dict[str, tuple[str, ...]] = {
    "v2t-align": ("loss", "lm"),
    "t2v-align": ("loss", "lm", "seg"),
    "instruct-tune": ("loss", "lm", "seg"),
}


def apply_freezing(model: MedSight, stage: str, lora: bool = False) -> None:
    """``lora``: the LLM carries LoRA adapters; only they train inside it (instruct_tune.lora_rank)."""
    model.requires_grad_(False)
    for name in TRAINABLE_MODULES[stage]:
        if name == "llm" and lora:
            for parameter_name, parameter in model.llm.named_parameters():
                parameter.requires_grad_(lora_parameter(parameter_name))
        else:
            getattr(model, name).requires_grad_(True)


def load_conversations(path: Path, image_root: Path) -> list[Conversation]:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: conversation file missing; check the stage's data/grounding inputs (PubMedVision sets "
            "come from `medsight data prepare pubmedvision SRC DATA`)"
        )
    return read_conversations(Path(path), Path(image_root))


def llm_dtype(stage: LanguageTrainConfig) -> torch.dtype:
    """Load the LLM straight in the dtype DeepSpeed trains it in (8B weights: 16 GB, not 32)."""
    return torch.bfloat16 if stage.deepspeed.bf16 else torch.float32


@dataclass
class LanguageData:
    train: ConversationDataset
    val: ConversationDataset
    pad_id: int


def make_language_data(
    config: ExperimentConfig,
    model: MedSight,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Conversation],
    val: list[Conversation],
    taxonomy: Taxonomy,
    cache_mb: int = 0,
) -> LanguageData:
    """``cache_mb``: the stage's ``visual_cache_mb``; decoded image/mask files get the same budget."""

    def dataset(conversations: list[Conversation]) -> ConversationDataset:
        return ConversationDataset(
            conversations,
            tokenizer,
            num_visual_tokens=model.num_visual_tokens,
            image_size=config.model.encoder.image_size,
            max_length=config.model.llm.max_position_embeddings,
            taxonomy=taxonomy,
            decoded_cache_bytes=cache_mb * 1024 * 1024,
            region_tokens=model.vocabulary.names,
            llm=config.model.llm,
        )

    return LanguageData(dataset(train), dataset(val), PromptFormat.from_tokenizer(tokenizer, config.model.llm).pad_id)


def _forward(model_call, batch: dict, seg_weight: float):
    return model_call(
        images=batch["images"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        masks=batch["masks"],
        seg_weight=seg_weight,
        image_keys=batch["image_keys"],
    )


def _global_share(local: torch.Tensor) -> torch.Tensor:
    """local count / mean count over ranks: the factor that turns a rank's mean into its share
    of the global batch's mean (1 at one process)."""
    if not distributed.active():
        return torch.ones_like(local)
    return local / distributed.all_reduce_mean(local).clamp_min(1e-6)


def global_batch_losses(model: MedSight, batch: dict, out, seg_weight: float) -> dict[str, torch.Tensor]:
    """The LM loss as a mean over the global batch's answer tokens and the seg loss over its
    samples with region tokens, whatever the ranks' shares; averaging ranks' gradients (what
    DeepSpeed does) then gives the gradient of exactly the loss one process would compute."""
    labels = batch["labels"]
    tokens = (labels[:, 1:] != IGNORE_INDEX).sum().float()
    with_regions = (model.is_region_token(batch["input_ids"]) & (labels != IGNORE_INDEX)).any(dim=1).sum().float()
    share = _global_share(torch.stack([tokens, with_regions]))
    lm, seg = out.lm_loss * share[0], out.seg_loss * share[1]
    # Not a loss: the sequence positions this rank processed (tokens/s in bench/gpu_smoke.py).
    positions = batch["attention_mask"].sum().float()
    return {"loss": lm + seg_weight * seg, "lm": lm, "seg": seg, "tokens": positions}


def train_language_stage(
    *,
    stage: str,
    model: MedSight,
    data: LanguageData,
    train_config: LanguageTrainConfig,
    deepspeed_config,
    output: Path,
    tracker: Tracker,
    seg_weight: float,
    lora: bool = False,
) -> tuple[LoopResult, DeepSpeedEngine]:
    torch.manual_seed(train_config.seed)
    apply_freezing(model, stage, lora)
    # Stays on the model for the stage's validation pass, which sees the same val images.
    model.visual_cache = VisualContextCache.from_megabytes(train_config.visual_cache_mb)
    if model.visual_cache is not None and deepspeed_config.zero_stage == 3 and distributed.world_size() > 1:
        # A hit skips the encoder's forward on one rank while another runs it, and under ZeRO-3
        # each forward gathers weights collectively: the ranks would wait on each other forever.
        logger.warning("%s: visual_cache_mb is ignored under ZeRO-3 with several ranks", stage)
        model.visual_cache = None
    engine = DeepSpeedEngine(model, train_config, deepspeed_config)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        batch = to_device(batch, engine.device, engine.dtype)
        return global_batch_losses(model, batch, _forward(engine.model, batch, seg_weight), seg_weight)

    loader = make_loader(data.train, train_config.batch_size, ResumableSampler(data.train, train_config.seed),
                         partial(collate_conversations, pad_id=data.pad_id), train_config.num_workers)
    batches = EpochBatches(loader)
    result = run_training(
        name=stage,
        engine=engine,
        make_batches=batches,
        steps_per_epoch=batches.steps_per_epoch,
        step_fn=step,
        config=train_config,
        workdir=output,
        tracker=tracker,
        expected_losses=EXPECTED_LOSSES[stage],
    )
    return result, engine


def vision_side(model: MedSight) -> list[nn.Module]:
    """Everything but the LLM: small next to it, and reached outside forward calls in validation."""
    return [m for name, m in model.named_children() if name != "llm"]


@torch.no_grad()
def validate_language(model: MedSight, data: LanguageData, batch_size: int, engine: DeepSpeedEngine | None = None,
                      num_workers: int = 0) -> dict[str, float]:
    """Teacher-forced LM loss (mean over answer tokens) and Dice of masks decoded from the
    ground-truth region tokens. Sharded over ranks; under ZeRO-3 every rank runs the same number
    of batches (forward passes gather parameters collectively), padding samples count nothing."""
    model.eval()
    zero_stage = engine.zero_stage if engine is not None else 0
    device = engine.device if engine is not None else next(model.parameters()).device
    dtype = engine.dtype if engine is not None else next(model.parameters()).dtype
    sampler = ShardSampler(len(data.val), pad=zero_stage == 3)
    loader = make_loader(data.val, batch_size, sampler, partial(collate_conversations, pad_id=data.pad_id), num_workers)
    sums = {"lm": 0.0, "tokens": 0.0, "dice": 0.0, "regions": 0.0}
    seen = 0
    gather = nullcontext() if zero_stage < 3 else gathered_parameters(nn.ModuleList(vision_side(model)), zero_stage)
    with gather:
        for batch in loader:
            real = torch.tensor([sampler.valid(seen + i) for i in range(batch["input_ids"].shape[0])])
            seen += len(real)
            batch["labels"][~real] = IGNORE_INDEX  # padding samples: no token, no region counts
            batch = to_device(batch, device, dtype)
            out = _forward(model, batch, seg_weight=1.0)
            tokens = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if tokens:
                sums["lm"] += float(out.lm_loss) * tokens
                sums["tokens"] += tokens
            # Under ZeRO-3 every rank runs the same forward calls, regions or not.
            if out.num_region_tokens or zero_stage == 3:
                scores = _teacher_forced_dice(model, batch)
                sums["dice"] += float(scores.sum())
                sums["regions"] += scores.numel()
    sums = distributed.sum_over_ranks(sums)
    metrics = {"val_lm_loss": sums["lm"] / max(sums["tokens"], 1.0)}
    if sums["regions"]:
        metrics["val_seg_dice"] = sums["dice"] / sums["regions"]
    return metrics


def _teacher_forced_dice(model: MedSight, batch: dict) -> torch.Tensor:
    context = model.encode_images(batch["images"], batch["image_keys"])
    embeddings = model.input_embeddings(batch["input_ids"], context)
    hidden = model.llm.base_model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"]).last_hidden_state
    regions = model.is_region_token(batch["input_ids"]) & (batch["labels"] != IGNORE_INDEX)
    positions = [regions[b].nonzero().flatten() for b in range(hidden.shape[0])]
    decoded = model.decode_batch_region_masks(hidden, positions, context)
    scores = [hard_dice(logits.float(), batch["masks"][b]).cpu() for b, logits in enumerate(decoded) if logits.shape[0]]
    return torch.cat(scores) if scores else torch.zeros(0)


def save_trained_modules(
    output: Path,
    engine: DeepSpeedEngine,
    model: MedSight,
    names: tuple[str, ...],
    inputs: dict[str, Path],
    taxonomy: Taxonomy,
) -> None:
    """Each module in ``names`` written once, by rank 0, as consolidated float32 safetensors
    (trained ones from the optimizer's master weights). A module this stage kept frozen and
    read from an input is copied byte for byte instead, so bf16 training never rounds it."""
    from safetensors.torch import save_file

    from medsight.io_utils import atomic_path
    from medsight.model.bundle import find_modules

    upstream = find_modules(inputs)
    for name in names:
        module = getattr(model, name)
        frozen = not any(p.requires_grad for p in module.parameters())
        if frozen and name in upstream:
            if distributed.is_main():
                target = module_file(output, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(upstream[name], target)
            continue
        state = engine.full_state(module)
        if distributed.is_main():
            with atomic_path(module_file(output, name)) as tmp:
                save_file({key: value.contiguous() for key, value in state.items()}, str(tmp))
    if distributed.is_main():
        taxonomy.save(taxonomy_file(output))


def save_trained_llm(output: Path, engine: DeepSpeedEngine, model: MedSight, dtype: torch.dtype,
                     lora=None) -> None:
    """The LLM in Hugging Face's safetensors layout, consolidated on rank 0 in ``dtype`` (the
    dtype it trained in: bf16 at full scale, as the released Qwen weights). ``lora``: the peft
    wrapper of adapters trained in place; they are folded into the saved weights (a plain model)."""
    from medsight.io_utils import atomic_directory
    from medsight.model.lora import merged_lora_state

    state = engine.full_state(model.llm)
    if distributed.is_main() and lora is not None:
        state = merged_lora_state(state, lora)
    if distributed.is_main():
        with atomic_directory(Path(output) / "llm") as tmp:
            model.llm.save_pretrained(str(tmp), state_dict={k: v.to(dtype) for k, v in state.items()},
                                      safe_serialization=True)
    distributed.barrier()

