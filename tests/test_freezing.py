"""Each LLM stage updates exactly the parameters DESIGN.md lists for it, and nothing else."""

from __future__ import annotations

import pytest
import torch

from medsight.config.schema import TrainConfig
from medsight.data.conversation_dataset import PromptFormat, collate_conversations, encode_conversation
from medsight.stages.language_training import TRAINABLE_MODULES, apply_freezing
from medsight.train.engine import TorchEngine

TOP_LEVEL = ("encoder", "perceiver", "codebook", "llm", "v2t", "t2v", "region_tokens")


def _batch(model, tokenizer):
    fmt = PromptFormat.from_tokenizer(tokenizer)
    ids, labels = encode_conversation(
        tokenizer, fmt, [("human", "<image>\nSegment the liver."), ("gpt", "Here is the liver [C0_1].")],
        model.num_visual_tokens, 512,
    )
    size = model.config.encoder.image_size
    item = {"image": torch.rand(3, size, size), "input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "masks": (torch.rand(1, size, size) > 0.5).float(), "modality": 0, "id": "a"}
    return collate_conversations([item], fmt.pad_id)


@pytest.mark.parametrize("stage", sorted(TRAINABLE_MODULES))
def test_stage_updates_exactly_its_modules(stage, tiny_model):
    model, tokenizer = tiny_model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    apply_freezing(model, stage)
    engine = TorchEngine(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    batch = _batch(model, tokenizer)
    for _ in range(2):
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"], batch["masks"])
        engine.backward(out.loss)
        engine.step()
    changed = {name.split(".")[0] for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    expected = set(TRAINABLE_MODULES[stage])
    # The LLM's output head and the seg path only get gradient where they are used; every listed
    # module must move, and no unlisted one may.
    assert changed == expected, f"{stage}: changed {sorted(changed)}, expected {sorted(expected)}"
    if stage == "t2v-align":
        # Base vocabulary rows (inside the frozen LLM) never move; only the region rows do.
        assert torch.equal(model.llm.get_input_embeddings().weight, before["llm.model.embed_tokens.weight"])
        assert not torch.equal(model.region_tokens.input_rows, before["region_tokens.input_rows"])
        assert not torch.equal(model.region_tokens.output_rows, before["region_tokens.output_rows"])


def test_encoder_is_never_trainable(tiny_model):
    model, _ = tiny_model
    model.train()
    assert not model.encoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
