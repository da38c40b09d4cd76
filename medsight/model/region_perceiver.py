"""Region Perceiver (paper Sec. 2.2, App. A.1): region queries <-> progressively upsampled image map.

Flow for patch tokens [B, g*g, C_enc]:
  project to d, reshape to I_0 [B, d, g, g]
  initial cross-attention of the queries to I_0 -> first mask/class prediction
  for l = 1..L:
      I_l = adapter_l(I_{l-1})                       (2x finer map, sine PE on keys)
      queries attend to I_l, masked by the previous prediction (+ FFN)
      if two_way: I_l attends to the queries (+ FFN), residual into the map
      predict masks against I_l and classes           (these masks gate layer l+1)
The last map I_L is I_r (`pixel_features`); the last prediction is the output, earlier ones are aux.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from medsight.config.schema import PerceiverConfig
from medsight.model.perceiver_layer import (
    MLP,
    ImageToRegionLayer,
    RegionToImageLayer,
    masked_attention_mask,
)
from medsight.model.position_encoding import SinePositionEncoding2D
from medsight.model.upsample_adapter import UpsampleAdapter


@dataclass
class PerceiverOutput:
    """Everything the perceiver produces for one batch.

    queries:        [B, Q, d]       final region embeddings (the region tokens), in the space the
                                    heads read: `decode_masks(queries, pixel_features) == mask_logits`.
    mask_logits:    [B, Q, Hr, Wr]  final mask logits at the finest map's resolution.
    class_logits:   [B, Q, C+1]     last index = no-object.
    pixel_features: [B, d, Hr, Wr]  I_r, the finest (and, when two-way, query-refined) map.
    aux:            earlier predictions (mask_logits [B, Q, h, w], class_logits [B, Q, C+1]),
                    coarsest first: the initial cross-attention, then layers 1..L-1.
    """

    queries: torch.Tensor
    mask_logits: torch.Tensor
    class_logits: torch.Tensor
    pixel_features: torch.Tensor
    aux: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, d, H, W] -> [B, H*W, d]."""
    return feature_map.flatten(2).transpose(1, 2)


def _tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H*W, d] -> [B, d, H, W] (a channels-last view, which the adapter's conv prefers)."""
    batch, _, dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, dim, height, width)


class RegionPerceiver(nn.Module):
    """Region queries refined against a 2x-per-layer upsampled image map; mask and class heads."""

    def __init__(self, encoder_width: int, config: PerceiverConfig) -> None:
        super().__init__()
        dim = config.dim
        if config.head_dim and config.head_dim * config.num_heads != dim:
            raise ValueError(
                f"model.perceiver.head_dim={config.head_dim}: the medsight perceiver's attention width is "
                f"its model width ({dim} = num_heads x head_dim); set head_dim=0 or use architecture=authors"
            )
        self.config = config
        # CLIP's penultimate-layer tokens have a large, outlier-heavy scale: normalise after the
        # projection so the attention logits start in a sane range.
        self.input_proj = nn.Sequential(nn.Linear(encoder_width, dim), nn.LayerNorm(dim))
        self.query_content = nn.Parameter(torch.randn(config.num_queries, dim) * 0.02)  # [Q, d]
        self.query_pos = nn.Parameter(torch.randn(config.num_queries, dim) * 0.02)  # [Q, d]
        self.position_encoding = SinePositionEncoding2D(dim)
        layer_args = (dim, config.num_heads, config.ffn_dim, config.dropout)
        self.initial_layer = RegionToImageLayer(*layer_args)
        if len(config.upsample_factors) != config.num_layers:
            raise ValueError(
                f"model.perceiver.upsample_factors has {len(config.upsample_factors)} entries; "
                f"num_layers={config.num_layers} needs one per layer"
            )
        self.adapters = nn.ModuleList(UpsampleAdapter(dim, factor) for factor in config.upsample_factors)
        self.region_to_image = nn.ModuleList(RegionToImageLayer(*layer_args) for _ in range(config.num_layers))
        # Empty in the one-way ablation: the map is then only ever changed by the adapters.
        self.image_to_region = nn.ModuleList(
            ImageToRegionLayer(*layer_args) for _ in range(config.num_layers if config.two_way else 0)
        )
        self.query_norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, config.num_classes + 1)
        self.mask_mlp = MLP(dim, dim, dim, num_layers=3)

    # ---- heads (public: reused to decode LLM region tokens and quantized queries) -----------

    def decode_masks(self, query_like: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
        """query_like [B, K, d] (the `queries` space), pixel_features [B, d, H, W] -> logits [B, K, H, W].

        mask_logits[b, k, y, x] = <MLP(query_like[b, k]), pixel_features[b, :, y, x]>.
        """
        mask_embed = self.mask_mlp(query_like)  # [B, K, d]
        return torch.einsum("bkc,bchw->bkhw", mask_embed, pixel_features)

    def classify(self, query_like: torch.Tensor) -> torch.Tensor:
        """query_like [B, K, d] -> class logits [B, K, C+1] (last = no-object)."""
        return self.class_head(query_like)

    def decode_llm_queries(self, queries: torch.Tensor, patch_tokens: torch.Tensor, pixel_features: torch.Tensor) -> torch.Tensor:
        """Masks of LLM region tokens (P_t2v outputs [B, K, d]): the mask head against I_r."""
        return self.decode_masks(queries, pixel_features)

    def _predict(self, queries: torch.Tensor, pixels: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Residual-stream queries [B, Q, d], pixel tokens [B, H*W, d] -> (normed queries, masks, classes)."""
        normed = self.query_norm(queries)
        mask_embed = self.mask_mlp(normed)  # [B, Q, d]
        # Dot products on the token layout avoid materialising the map as [B, d, H, W].
        mask_logits = torch.bmm(mask_embed, pixels.transpose(1, 2))  # [B, Q, H*W]
        mask_logits = mask_logits.view(*mask_logits.shape[:2], height, width)
        return normed, mask_logits, self.class_head(normed)

    # ---- forward -------------------------------------------------------------------------

    def _position_tokens(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """Sine encoding of an H x W map as pixel tokens [1, H*W, d], contiguous so the
        broadcast add onto [B, H*W, d] streams memory instead of striding."""
        code = self.position_encoding.encode(height, width, like.device, like.dtype)  # [d, H, W]
        return code.flatten(1).t().contiguous().unsqueeze(0)

    def _initial_map(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """patch_tokens [B, N, C_enc] -> projected tokens [B, N, d] and grid side g (N = g*g)."""
        if patch_tokens.dim() != 3:
            raise ValueError(f"patch tokens must be [B, N, C], got shape {tuple(patch_tokens.shape)}")
        grid = math.isqrt(patch_tokens.shape[1])
        if grid * grid != patch_tokens.shape[1]:
            raise ValueError(f"patch tokens must form a square grid, got N={patch_tokens.shape[1]}")
        return self.input_proj(patch_tokens), grid

    def forward(self, patch_tokens: torch.Tensor) -> PerceiverOutput:
        """patch_tokens [B, g*g, C_enc] (no CLS token) -> PerceiverOutput at resolution g * factor**L."""
        pixels, size = self._initial_map(patch_tokens)  # [B, g*g, d]
        height = width = size
        batch = pixels.shape[0]
        queries = self.query_content.unsqueeze(0).expand(batch, -1, -1)  # [B, Q, d]
        query_pos = self.query_pos.unsqueeze(0)  # [1, Q, d]

        pixel_pos = self._position_tokens(height, width, pixels)  # [1, g*g, d]
        queries = self.initial_layer(queries, query_pos, pixels, pixel_pos)
        normed, mask_logits, class_logits = self._predict(queries, pixels, height, width)
        predictions = [(mask_logits, class_logits)]

        for index, (adapter, read_image) in enumerate(zip(self.adapters, self.region_to_image)):
            feature_map = adapter(_tokens_to_map(pixels, height, width))  # [B, d, fh, fw]
            height, width = feature_map.shape[-2:]
            pixels = _map_to_tokens(feature_map)  # [B, H*W, d]
            pixel_pos = self._position_tokens(height, width, pixels)  # [1, H*W, d]
            attend = masked_attention_mask(mask_logits, (height, width), self.config.mask_threshold)  # [B, Q, H*W]
            queries = read_image(queries, query_pos, pixels, pixel_pos, attend)
            if self.config.two_way:
                pixels = self.image_to_region[index](pixels, pixel_pos, queries, query_pos)
            normed, mask_logits, class_logits = self._predict(queries, pixels, height, width)
            predictions.append((mask_logits, class_logits))

        return PerceiverOutput(
            queries=normed,
            mask_logits=mask_logits,
            class_logits=class_logits,
            pixel_features=_tokens_to_map(pixels, height, width),
            aux=predictions[:-1],
        )
