"""LoRA for stage 5 (App. F.4): adapters injected in place train alone inside the LLM, and merging
them gives a plain model with the same outputs."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from medsight.config.schema import InstructTuneConfig
from medsight.model.lora import attach_lora, lora_parameter, merge_lora


def test_lora_trains_only_adapters_and_merges_to_the_same_function():
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=32, head_dim=8))
    plain_keys = set(llm.state_dict())
    stage = InstructTuneConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
    wrapper = attach_lora(llm, stage)
    # In place: the same object now carries adapters on every targeted linear layer (7 per block).
    adapters = [name for name, _ in llm.named_parameters() if lora_parameter(name)]
    assert len(adapters) == 2 * 7
    assert all(p.requires_grad == lora_parameter(n) for n, p in llm.named_parameters())
    with torch.no_grad():
        for name, parameter in llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # as after training (B starts at zero)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        adapted = llm.model(ids).last_hidden_state
        merged = merge_lora(wrapper)
        assert set(merged.state_dict()) == plain_keys
        torch.testing.assert_close(merged.model(ids).last_hidden_state, adapted, rtol=1e-4, atol=1e-5)


def test_merging_a_gathered_state_matches_peft():
    """Under ZeRO-3 the merge runs on rank 0's consolidated state: the same weights as peft's merge."""
    torch.manual_seed(1)
    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=32, head_dim=8))
    wrapper = attach_lora(llm, InstructTuneConfig(lora_rank=4, lora_alpha=16.0, lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    state = {name: value.clone() for name, value in llm.state_dict().items()}
    from medsight.model.lora import merged_lora_state

    merged = merged_lora_state(state, wrapper)
    reference = merge_lora(wrapper).state_dict()
    assert set(merged) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)
