"""What the three LLM stages (3, 4, 5) share: the freezing plan, data, the DeepSpeed loop, validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from transformers import PreTrainedTokenizerBase

from medsight.config.schema import ExperimentConfig, LanguageTrainConfig
from medsight.data.conversation_dataset import ConversationDataset, PromptFormat, collate_conversations
from medsight.data.llava import Conversation, read_conversations
from medsight.data.taxonomy import Taxonomy
from medsight.data.conversation_dataset import IGNORE_INDEX
from medsight.model.dice import hard_dice
from medsight.model.lora import lora_parameter
from medsight.model.medsight import MedSight
from medsight.model.visual_cache import VisualContextCache
from medsight.train.engine import DeepSpeedEngine
from medsight.train.loop import LoopResult, run_training, seeded_order
from medsight.train.tracker import Tracker

# DESIGN.md's stage table, in one place: what each LLM stage may update.
TRAINABLE_MODULES: dict[str, tuple[str, ...]] = {
    "v2t-align": ("v2t",),
    "t2v-align": ("t2v", "region_tokens"),
    "instruct-tune": ("llm", "region_tokens", "v2t", "t2v"),
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
        raise FileNotFoundError(f"{path}: conversation file missing; check the stage's data/grounding inputs")
    return read_conversations(Path(path), Path(image_root))

def split_holdout(conversations: list[Conversation], fraction: float = 0.1) -> tuple[list, list]:
    """For sources that ship only a train file (alignment captions): a fixed tail as validation."""
    cut = max(1, int(len(conversations) * (1 - fraction)))
    return conversations[:cut], conversations[cut:]


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
            llm=config.model.llm,
        )

    return LanguageData(dataset(train), dataset(val), PromptFormat.from_tokenizer(tokenizer, config.model.llm).pad_id)


def _loader(dataset, order: list[int], batch_size: int, pad_id: int) -> DataLoader:
    return DataLoader(
        Subset(dataset, order),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=lambda batch: collate_conversations(batch, pad_id),
    )


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
) -> LoopResult:
    torch.manual_seed(train_config.seed)
    apply_freezing(model, stage, lora)
    # Stays on the model for the stage's validation pass, which sees the same val images.
    model.visual_cache = VisualContextCache.from_megabytes(train_config.visual_cache_mb)
    engine = DeepSpeedEngine(model, train_config, deepspeed_config)

    def step(batch: dict) -> dict[str, torch.Tensor]:
        out = _forward(engine.model, batch, seg_weight)
        return {"loss": out.loss, "lm": out.lm_loss, "seg": out.seg_loss}

    steps_per_epoch = -(-len(data.train) // train_config.batch_size)
    return run_training(
        name=stage,
        module=model,
        engine=engine,
        make_batches=lambda epoch: _loader(
            data.train, seeded_order(len(data.train), train_config.seed, epoch), train_config.batch_size, data.pad_id
        ),
        steps_per_epoch=steps_per_epoch,
        step_fn=step,
        config=train_config,
        workdir=output,
        tracker=tracker,
    )


@torch.no_grad()
def validate_language(model: MedSight, data: LanguageData, batch_size: int) -> dict[str, float]:
    """Teacher-forced LM loss and Dice of masks decoded from the ground-truth region tokens."""
    model.eval()
    lm_losses, dice_scores = [], []
    loader = _loader(data.val, list(range(len(data.val))), batch_size, data.pad_id)
    for batch in loader:
        out = _forward(model, batch, seg_weight=1.0)
        lm_losses.append(float(out.lm_loss))
        if out.num_region_tokens:
            dice_scores.append(_teacher_forced_dice(model, batch))
    metrics = {"val_lm_loss": sum(lm_losses) / max(1, len(lm_losses))}
    if dice_scores:
        metrics["val_seg_dice"] = float(torch.cat(dice_scores).mean())
    return metrics


def _teacher_forced_dice(model: MedSight, batch: dict) -> torch.Tensor:
    context = model.encode_images(batch["images"], batch["image_keys"])
    embeddings = model.input_embeddings(batch["input_ids"], context)
    hidden = model.llm.base_model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"]).last_hidden_state
    regions = model.is_region_token(batch["input_ids"]) & (batch["labels"] != IGNORE_INDEX)
    scores = []
    for b in range(hidden.shape[0]):
        positions = regions[b].nonzero().flatten()
        if positions.numel():
            logits = model.decode_region_masks(hidden[b, positions], context, b)
            scores.append(hard_dice(logits, batch["masks"][b]))
    return torch.cat(scores) if scores else torch.zeros(0)
