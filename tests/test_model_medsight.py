"""Mechanisms of the assembled model: token init, visual merge, region-token mask decoding."""

from __future__ import annotations

import pytest
import torch

from medsight.data.conversation_dataset import PromptFormat, collate_conversations, encode_conversation
from medsight.model.inference import MedSightInference
from medsight.model.visual_merge import VisualTokenCountError, merge_visual_tokens


def test_region_token_embeddings_start_at_projected_codes(tiny_model):
    model, _ = tiny_model
    expected = model.v2t.project_regions(model.codebook.all_code_queries())
    assert torch.allclose(model.region_tokens.input_rows, expected)
    # Row order is m * K + k: check one token by hand through P_d and P_v2t.
    m, k = 2, 3
    e = model.codebook.embed_codes(torch.tensor([m]), torch.tensor([k]))
    row = model.vocabulary.index(m, k)
    assert torch.allclose(model.region_tokens.input_rows[row], model.v2t.project_regions(e)[0], atol=1e-6)


def test_seg_token_ablation_has_one_region_token(tiny_config, tiny_tokenizer_dir):
    from tests.conftest import build_tiny_model

    tiny_config.model.grounding = "seg_token"
    model, tokenizer = build_tiny_model(tiny_config, tiny_tokenizer_dir)
    assert model.vocabulary.names == ["[SEG]"]
    assert model.region_tokens.input_rows.shape[0] == 1


def test_placeholder_count_mismatch_raises():
    text = torch.zeros(2, 6, 4)
    ids = torch.tensor([[1, 9, 9, 9, 2, 3], [1, 9, 9, 2, 3, 4]])
    visual = torch.ones(2, 3, 4)
    with pytest.raises(VisualTokenCountError, match="sample 1 has 2 <image> placeholders"):
        merge_visual_tokens(text, ids, visual, image_token_id=9)
    merged = merge_visual_tokens(text[:1], ids[:1].clone(), visual[:1], image_token_id=9)
    assert torch.equal(merged[0, 1:4], torch.ones(3, 4)) and merged[0, 0].abs().sum() == 0


def _grounding_batch(model, tokenizer, answer: str, num_masks: int):
    fmt = PromptFormat.from_tokenizer(tokenizer)
    ids, labels = encode_conversation(
        tokenizer, fmt, [("human", "<image>\nSegment."), ("gpt", answer)], model.num_visual_tokens, 512
    )
    size = model.config.encoder.image_size
    item = {
        "image": torch.rand(3, size, size),
        "input_ids": torch.tensor(ids),
        "labels": torch.tensor(labels),
        "masks": (torch.rand(num_masks, size, size) > 0.5).float(),
        "modality": 0,
        "id": "x",
    }
    return collate_conversations([item], fmt.pad_id)


def test_two_region_tokens_in_answer_supervise_two_masks(tiny_model):
    model, tokenizer = tiny_model
    batch = _grounding_batch(model, tokenizer, "the liver [C0_1] and the kidney [C0_2].", 2)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"], batch["masks"])
    assert out.num_region_tokens == 2 and out.seg_loss > 0
    out.loss.backward()
    assert model.t2v.mlp[0].weight.grad.abs().sum() > 0
    wrong = _grounding_batch(model, tokenizer, "the liver [C0_1] and the kidney [C0_2].", 1)
    with pytest.raises(ValueError, match="2 region tokens in the answer but 1 masks"):
        model(wrong["images"], wrong["input_ids"], wrong["attention_mask"], wrong["labels"], wrong["masks"])


def test_generated_region_tokens_decode_to_one_mask_each(tiny_model, monkeypatch):
    model, tokenizer = tiny_model
    fmt = PromptFormat.from_tokenizer(tokenizer)
    region_a = tokenizer.convert_tokens_to_ids("[C1_0]")
    region_b = tokenizer.convert_tokens_to_ids("[C1_3]")
    word = tokenizer.encode(" liver", add_special_tokens=False)[0]
    script = [region_a, word, region_b, fmt.eos_id]
    calls = {"n": 0}
    real_logits = model.logits

    def scripted_logits(hidden):
        logits = real_logits(hidden)
        forced = torch.full_like(logits, -1e4)
        forced[..., script[min(calls["n"], len(script) - 1)]] = 1e4
        calls["n"] += 1
        return forced

    monkeypatch.setattr(model, "logits", scripted_logits)
    inference = MedSightInference(_config_of(model), model, tokenizer)
    size = model.config.encoder.image_size
    [answer] = inference.answer(torch.rand(1, 3, size, size), ["Segment the liver and kidney."], repetition_penalty=1.0)
    assert answer.region_tokens == ["[C1_0]", "[C1_3]"]
    assert answer.masks.shape == (2, size, size)
    assert 0 <= float(answer.masks.min()) and float(answer.masks.max()) <= 1
    # Different hidden states -> different masks.
    assert not torch.allclose(answer.masks[0], answer.masks[1])


def _config_of(model):
    from medsight.config import get_preset

    config = get_preset("tiny")
    config.model = model.config
    return config


def test_batched_generation_matches_single_sample(tiny_model):
    """Left padding + KV cache must not change what a sample generates."""
    model, tokenizer = tiny_model
    inference = MedSightInference(_config_of(model), model, tokenizer)
    size = model.config.encoder.image_size
    torch.manual_seed(1)
    images = torch.rand(2, 3, size, size)
    questions = ["Is there a lesion?", "Please segment the kidney in this CT image of the abdomen."]
    batched = inference.answer(images, questions, max_new_tokens=6, repetition_penalty=1.0)
    single = [inference.answer(images[i : i + 1], [q], max_new_tokens=6, repetition_penalty=1.0)[0] for i, q in enumerate(questions)]
    assert [a.text for a in batched] == [a.text for a in single]


def test_region_token_rows_get_the_same_gradient_every_time():
    """Every non-region position looks up row 0 (then masked); indexing's backward accumulated
    those duplicates in thread order, so stage 5 differed run to run on a 2-core CPU (and so did
    the evaluation it feeds). The embedding lookup's backward sums them in a fixed order."""
    from medsight.model.region_vocabulary import RegionTokenEmbeddings

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        embeddings = RegionTokenEmbeddings(24, 64)
        with torch.no_grad():
            embeddings.input_rows.normal_(generator=generator)
        ids = torch.randint(0, 3, (16, 2048), generator=generator)
        upstream = torch.randn(16, 2048, 64, generator=generator)
        grads = []
        for _ in range(5):
            embeddings.zero_grad()
            (embeddings(ids=ids) * upstream).sum().backward()
            grads.append(embeddings.input_rows.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], grad) for grad in grads[1:])
