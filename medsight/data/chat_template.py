"""Prompts through the tokenizer's own chat template (``model.llm.prompt_format: chat_template``).

The rendered text carries the image placeholder once, as a special token, so the tokenizer keeps
it whole; that one id is then repeated once per visual token. A turn after the first starts with
the newline ChatML puts after ``<|im_end|>``; the first turn carries the system message (if any).
With Qwen's template this gives exactly the authors' prompt:
``<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<image>\\nQ<|im_end|>\\n<|im_start|>assistant\\n``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from medsight.data.conversation_dataset import PromptFormat


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, fmt: PromptFormat, question: str, num_visual_tokens: int) -> list[int]:
    """Ids up to the assistant's answer; ``num_visual_tokens`` 0 = a later turn (no image, no system)."""
    first = num_visual_tokens > 0
    messages = [{"role": "system", "content": fmt.system_prompt}] if first and fmt.system_prompt else []
    content = f"{fmt.image_token}\n{question}" if first else question
    messages.append({"role": "user", "content": content})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not first:
        text = "\n" + text
    ids = tokenizer.encode(text, add_special_tokens=False)
    places = [i for i, token in enumerate(ids) if token == fmt.image_id]
    if len(places) != (1 if first else 0):
        raise ValueError(
            f"the chat template rendered the image placeholder {fmt.image_token!r} {len(places)} times; "
            "it must be one special token of the tokenizer (model.llm.image_token)"
        )
    if not first:
        return ids
    at = places[0]
    return ids[:at] + [fmt.image_id] * num_visual_tokens + ids[at + 1 :]
