"""Region Perceiver in the layer order of the authors' released model (``architecture: authors``).

Flow for patch tokens [B, g*g, d] (no input projection: d is the encoder width, 1024):
  I_0 = tokens + P(g, g)                                   sine positions added to the map
  queries Q_0 (learned [Q, d]) read I_0, FFN               (post-norm, no mask)
  predict masks M_0 = head(Q_0, I_0) and classes
  for l = 1..L:
      I_l = conv(upsample(I_{l-1})) + P(2h, 2w)            the previous map *with* its positions
      Q_l reads I_l where sigmoid(resize(M_{l-1})) >= 0.5, FFN; then I_l reads Q_l, FFN
      M_l = head(Q_l, I_l)
The outputs follow ``PerceiverOutput`` (shared with ``RegionPerceiver``): ``queries`` are the last
layer's queries (already layer-normalised), ``pixel_features`` I_L, ``aux`` the earlier predictions.

LLM region tokens are decoded the authors' way: their P_t2v outputs replace the learned initial
queries and the whole perceiver runs again on the image (``decode_llm_queries``), so several
tokens of one answer are decoded together and see each other through the image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from medsight.config.schema import PerceiverConfig
from medsight.model.authors_layers import (
    ConvUpsampleAdapter,
    DualAttentionLayer,
    PostNormAttentionBlock,
    SinePositions,
    blocked_pixels,
)
from medsight.model.region_perceiver import PerceiverOutput


def _map_view(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H*W, d] -> [B, d, H, W] as a (channels-last) view, no copy."""
    return tokens.view(tokens.shape[0], height, width, tokens.shape[-1]).permute(0, 3, 1, 2)


class AuthorsRegionPerceiver(nn.Module):
    """The released model's perceiver: widths, heads, norm placement, adapters and heads as theirs."""

    def __init__(self, encoder_width: int, config: PerceiverConfig) -> None:
        super().__init__()
        dim = config.dim
        if encoder_width != dim:
            raise ValueError(
                f"model.perceiver.architecture=authors has no input projection: model.perceiver.dim "
                f"({dim}) must equal model.encoder.width ({encoder_width})"
            )
        if not config.head_dim:
            raise ValueError("model.perceiver.architecture=authors needs model.perceiver.head_dim (the authors use 64)")
        if len(config.upsample_factors) != config.num_layers:
            raise ValueError(
                f"model.perceiver.upsample_factors has {len(config.upsample_factors)} entries; "
                f"num_layers={config.num_layers} needs one per layer"
            )
        self.config = config
        heads, head_dim, ffn = config.num_heads, config.head_dim, config.ffn_dim
        self.query_content = nn.Parameter(nn.init.xavier_uniform_(torch.empty(config.num_queries, dim)))  # [Q, d]
        # Kept because the released weights carry it; the released forward never reads it.
        self.query_pos = nn.Parameter(nn.init.xavier_uniform_(torch.empty(config.num_queries, dim)))  # [Q, d]
        self.positions = SinePositions(dim)
        self.initial = PostNormAttentionBlock(dim, heads, head_dim, ffn)
        self.adapters = nn.ModuleList(ConvUpsampleAdapter(dim, factor) for factor in config.upsample_factors)
        self.layers = nn.ModuleList(DualAttentionLayer(dim, heads, head_dim, ffn) for _ in range(config.num_layers))
        self.mask_proj = nn.Linear(dim, dim)
        self.class_head = nn.Linear(dim, config.num_classes + 1)

    # ---- heads (public: reused for quantized queries and by the stage-1 validation) ---------

    def decode_masks(self, query_like: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
        """query_like [B, K, d], pixel_features [B, d, H, W] -> logits [B, K, H, W]."""
        batch, _, height, width = pixel_features.shape
        pixels = pixel_features.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # a view if channels-last
        return torch.bmm(self.mask_proj(query_like), pixels.transpose(1, 2)).view(batch, -1, height, width)

    def classify(self, query_like: torch.Tensor) -> torch.Tensor:
        """query_like [B, K, d] -> class logits [B, K, C+1] (last = no-object)."""
        return self.class_head(query_like)

    def decode_llm_queries(self, queries: torch.Tensor, patch_tokens: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
        """Masks of LLM region tokens: P_t2v outputs [B, K, d] as the perceiver's initial queries,
        run on the same image (patch_tokens [B, N, C]) -> logits [B, K, Hr, Wr]."""
        return self.forward(patch_tokens, initial_queries=queries).mask_logits

    def _predict(self, queries: torch.Tensor, pixels: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Q, d], pixels [B, H*W, d] -> (mask logits [B, Q, H, W], class logits [B, Q, C+1])."""
        logits = torch.bmm(self.mask_proj(queries), pixels.transpose(1, 2))  # [B, Q, H*W]
        return logits.view(*logits.shape[:2], height, width), self.class_head(queries)

    def _with_positions(self, pixels: torch.Tensor, height: int, width: int, in_place: bool) -> torch.Tensor:
        code = self.positions.encode(height, width, pixels.device, pixels.dtype)  # [H*W, d], batch-shared
        # The conv output is not needed by its own backward, so the sum may reuse its memory.
        return pixels.add_(code) if in_place else pixels + code

    # ---- forward -------------------------------------------------------------------------

    def forward(self, patch_tokens: torch.Tensor, initial_queries: torch.Tensor | None = None) -> PerceiverOutput:
        """patch_tokens [B, g*g, d] (no CLS), initial_queries [B, K, d] or None (the learned ones)."""
        if patch_tokens.dim() != 3:
            raise ValueError(f"patch tokens must be [B, N, C], got shape {tuple(patch_tokens.shape)}")
        batch, count, _ = patch_tokens.shape
        height = width = math.isqrt(count)
        if height * width != count:
            raise ValueError(f"patch tokens must form a square grid, got N={count}")
        if initial_queries is None:
            initial_queries = self.query_content.unsqueeze(0).expand(batch, -1, -1)
        pixels = self._with_positions(patch_tokens, height, width, in_place=False)  # [B, g*g, d]
        queries = self.initial(initial_queries, pixels)  # [B, Q, d]
        mask_logits, class_logits = self._predict(queries, pixels, height, width)
        predictions = [(mask_logits, class_logits)]
        for adapter, layer in zip(self.adapters, self.layers):
            pixels, height, width = adapter(pixels, height, width)
            pixels = self._with_positions(pixels, height, width, in_place=True)
            blocked = blocked_pixels(mask_logits, (height, width))  # [B, Q, H*W]
            queries, pixels = layer(queries, pixels, blocked)
            mask_logits, class_logits = self._predict(queries, pixels, height, width)
            predictions.append((mask_logits, class_logits))
        return PerceiverOutput(
            queries=queries,
            mask_logits=mask_logits,
            class_logits=class_logits,
            pixel_features=_map_view(pixels, height, width),
            aux=predictions[:-1],
        )
