"""Splice projected visual tokens into the text embeddings at the ``<image>`` placeholders."""

from __future__ import annotations

import torch


class VisualTokenCountError(ValueError):
    """The prompt's placeholder count and the number of visual tokens disagree."""


def merge_visual_tokens(
    text_embeddings: torch.Tensor,  # [B, T, H]
    input_ids: torch.Tensor,  # [B, T]
    visual_embeddings: torch.Tensor,  # [B, Nv, H]
    image_token_id: int,
) -> torch.Tensor:
    """LLaVA-style ``masked_scatter``; refuses silently misaligned prompts.

    Without the count check a truncated prompt would scatter the first visual tokens and drop the
    rest, training on shifted features without any error.
    """
    placeholder = input_ids == image_token_id  # [B, T]
    per_sample = placeholder.sum(dim=1)
    expected = visual_embeddings.shape[1]
    bad = (per_sample != expected).nonzero().flatten().tolist()
    if bad:
        raise VisualTokenCountError(
            f"sample {bad[0]} has {int(per_sample[bad[0]])} <image> placeholders but the image gives "
            f"{expected} visual tokens; check the prompt template / max length truncation"
        )
    mask = placeholder.unsqueeze(-1).expand_as(text_embeddings)
    return text_embeddings.masked_scatter(mask, visual_embeddings.to(text_embeddings.dtype))
