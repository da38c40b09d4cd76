"""The authors' final model (a tiny Qwen3 in their LLaVA layout with the region tokens added)
converts into a strictly loaded LLM, P_v2t, P_t2v and region-token rows that compute the same
logits; their [M{m}_{k}] tokens become [C{m}_{k}] at the same ids; the chat-template prompt is
theirs token for token."""

from __future__ import annotations

import pytest
import torch

from medsight.config.schema import LLMConfig
from medsight.data.conversation_dataset import PromptFormat, encode_conversation, encode_prompt
from medsight.importers.authors_llm import convert_final_model, translate_region_tokens
from medsight.model.checkpoint_files import CheckpointError
from medsight.model.llm import load_llm
from tests.authors_fakes import AUTHORS_TEMPLATE, fabricate_final_model

def test_final_model_converts_strictly_with_the_same_logits(tmp_path):
    source, authors_tokenizer, extra = fabricate_final_model(tmp_path / "medsight_full_instruct")
    converted = convert_final_model(tmp_path / "medsight_full_instruct")
    base = len(authors_tokenizer) - 6
    assert converted.backbone == "qwen3" and (converted.num_modalities, converted.codes_per_modality) == (2, 3)
    assert converted.name_map == {f"[M{i}_{j}]": f"[C{i}_{j}]" for i in range(2) for j in range(3)}
    assert converted.ignored == {k: converted.ignored[k] for k in ("model.visual_feature_norm.weight", "model.visual_feature_norm.bias")}
    # Same ids for every token; region tokens renamed.
    for name, new in converted.name_map.items():
        assert converted.tokenizer.convert_tokens_to_ids(new) == authors_tokenizer.convert_tokens_to_ids(name)
    text = "Is there a tumor in the liver? [M1_2] yes"
    assert converted.tokenizer.encode(translate_region_tokens(text, converted.name_map)) == authors_tokenizer.encode(text)
    assert converted.tokenizer.chat_template == AUTHORS_TEMPLATE and converted.tokenizer.eos_token == "<|im_end|>"

    # The LLM saved and reloaded is a plain Qwen3 with the base rows; the region rows moved out.
    converted.llm.save_pretrained(str(tmp_path / "llm"), safe_serialization=True)
    llm = load_llm(tmp_path / "llm", LLMConfig(backbone="qwen3"))
    rows = llm.get_input_embeddings().num_embeddings
    assert rows % 64 == 0 and base <= rows < base + 64
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        authors_logits = source.lm_head(hidden)  # [5, base + 6]
        ours = torch.cat([llm.lm_head(hidden)[:, :base], hidden @ converted.region_rows["output_rows"].T], dim=-1)
        torch.testing.assert_close(ours, authors_logits)
        ids = torch.tensor([3, 17, base + 4])
        theirs = source.get_input_embeddings()(ids)
        mine = torch.cat([llm.get_input_embeddings()(ids[:2]), converted.region_rows["input_rows"][4:5]])
        torch.testing.assert_close(mine, theirs)
        # Transformer blocks are untouched: hidden states of a base-token prompt agree.
        prompt = torch.tensor([[1, 20, 30, 40, 2]])
        torch.testing.assert_close(llm.model(prompt).last_hidden_state, source.model(prompt).last_hidden_state)
    # Any Hugging Face causal LM from a local folder: backbone "auto".
    auto = load_llm(tmp_path / "llm", LLMConfig(backbone="auto"))
    assert type(auto).__name__ == "Qwen3ForCausalLM" and auto.base_model is auto.model
    assert torch.equal(converted.t2v["mlp.2.weight"], extra["model.token_projection.2.weight"])
    assert torch.equal(converted.v2t["mlp.0.bias"], extra["model.mm_projector.0.bias"])


def test_chat_template_prompt_is_the_authors_token_for_token(tmp_path):
    fabricate_final_model(tmp_path / "final")
    tokenizer = convert_final_model(tmp_path / "final").tokenizer
    llm = LLMConfig(prompt_format="chat_template", image_token="<|image_pad|>", system_prompt="You are a helpful assistant.")
    fmt = PromptFormat.from_tokenizer(tokenizer, llm)
    ids = encode_prompt(tokenizer, fmt, "<image>\nIs there a tumor?", num_visual_tokens=7)
    # chatbot.py preprocess_qwen: system message, then the user turn "<image>\n" + question, each
    # through the template; their <image> id becomes the visual tokens.
    authors = tokenizer.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."}], tokenize=False)
    authors += tokenizer.apply_chat_template([{"role": "user", "content": "<|image_pad|>\nIs there a tumor?"}], tokenize=False, add_generation_prompt=True)
    expected = tokenizer.encode(authors, add_special_tokens=False)
    at = expected.index(fmt.image_id)
    assert ids == expected[:at] + [fmt.image_id] * 7 + expected[at + 1:]
    assert tokenizer.decode(ids).endswith("?<|im_end|>\n<|im_start|>assistant\n")
    # Training pairs: answers (and the closing <|im_end|>) are the supervised tokens.
    input_ids, labels = encode_conversation(tokenizer, fmt, [("human", "Q?"), ("gpt", "yes [C1_2]"), ("human", "Where?"), ("gpt", "liver")], 3, 512)
    supervised = tokenizer.decode([t for t, l in zip(input_ids, labels) if l != -100])
    assert supervised == "yes [C1_2]<|im_end|>liver<|im_end|>"
    assert "<|im_end|>\n<|im_start|>user\nWhere?" in tokenizer.decode(input_ids)


def test_a_model_folder_without_region_tokens_is_refused(tmp_path):
    folder = tmp_path / "plain"
    fabricate_final_model(folder)
    (folder / "tokenizer.json").write_text((folder / "tokenizer.json").read_text().replace("[M", "[X"))
    with pytest.raises(CheckpointError, match=r"no \[M<m>_<k>\] region tokens"):
        convert_final_model(folder)
