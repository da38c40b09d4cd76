"""Batched generation with a KV cache that also keeps each generated token's last hidden state.

Region tokens need their hidden state to decode a mask, which ``generate()`` does not expose;
this loop feeds every sampled token once more, so the state read is the token's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medsight.model.medsight import MedSight, VisualContext


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # per sample, generated ids up to (not including) eos
    hidden: list[torch.Tensor]  # per sample [n_i, H], hidden state of each generated token


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    return ids, mask


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every id already in the sequence. logits/seen: [B, V]."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


@torch.no_grad()
def generate(
    model: MedSight,
    context: VisualContext,
    prompts: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    # Work on the model's device (the server runs it on a GPU); ids are built on the CPU.
    device = context.pixel_features.device
    input_ids, attention = (t.to(device) for t in _left_pad(prompts, pad_id))
    batch = input_ids.shape[0]
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    embeddings = model.input_embeddings(input_ids, context)
    out = model.llm.base_model(inputs_embeds=embeddings, attention_mask=attention, position_ids=positions, use_cache=True)
    cache, last_hidden = out.past_key_values, out.last_hidden_state[:, -1]
    vocab = model.base_vocab_size + len(model.vocabulary)
    # Penalise text already in the prompt, not the image placeholders.
    seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    text_ids = input_ids.masked_fill((input_ids == model.image_token_id) | (attention == 0), 0)
    seen.scatter_(1, text_ids.clamp(max=vocab - 1), True)
    next_position = positions[:, -1] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    hidden: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    for _ in range(max_new_tokens):
        logits = _apply_repetition_penalty(model.logits(last_hidden).float(), seen, repetition_penalty)
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            # A CPU generator (reproducible draws) samples on the CPU; the choice goes back to the device.
            on_cpu = generator is not None and generator.device.type != probs.device.type
            choice = torch.multinomial(probs.cpu() if on_cpu else probs, 1, generator=generator).squeeze(1).to(device)
        else:
            choice = logits.argmax(dim=-1)
        choice = torch.where(finished, torch.full_like(choice, pad_id), choice)
        finished_now = finished | (choice == eos_id)
        seen[torch.arange(batch, device=device), choice] = True
        # Feed the chosen token: its own hidden state comes back (and the next logits with it).
        attention = torch.cat([attention, torch.ones(batch, 1, dtype=attention.dtype, device=device)], dim=1)
        out = model.llm.base_model(
            inputs_embeds=model.embed_tokens(choice[:, None]),
            attention_mask=attention,
            position_ids=next_position[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache, last_hidden = out.past_key_values, out.last_hidden_state[:, -1]
        next_position = next_position + 1
        for row in (~finished_now).nonzero().flatten().tolist():
            tokens[row].append(int(choice[row]))
            hidden[row].append(last_hidden[row])
        finished = finished_now
        if bool(finished.all()):
            break
    width = last_hidden.shape[-1]
    return GenerationOutput(
        tokens=tokens,
        hidden=[torch.stack(h) if h else last_hidden.new_zeros(0, width) for h in hidden],
    )
