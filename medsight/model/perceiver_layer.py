"""Building blocks of the Region Perceiver: cross-attention, FFN, the two attention directions.

Sequences are [B, L, d]. Image maps are flattened to pixel tokens [B, H*W, d] inside the layers;
the perceiver converts to and from [B, d, H, W] only around the conv adapters.
All layers are pre-norm (LayerNorm before each sub-block, residual around it), which trains
stably without warm-up on the small synthetic sets of the tiny preset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_attention_mask(previous_mask_logits: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """Which pixels each query may attend to, from its previous mask prediction.

    previous_mask_logits [B, Q, h, w] -> attend [B, Q, H*W] bool (True = may attend), where
    (H, W) = `size`. The logits are bilinearly resized to the current map and thresholded at
    sigmoid >= threshold. A query whose mask is empty everywhere would have no keys (softmax over
    nothing gives NaN), so such a row is opened to the whole map, as in Mask2Former.
    The mask is a discrete decision, so no gradient flows through it.
    """
    with torch.no_grad():
        resized = F.interpolate(previous_mask_logits, size=size, mode="bilinear", align_corners=False)
        attend = (resized.sigmoid() >= threshold).flatten(2)  # [B, Q, H*W]
        empty_rows = ~attend.any(dim=-1, keepdim=True)  # [B, Q, 1]
        return attend | empty_rows


class CrossAttention(nn.Module):
    """Multi-head cross-attention through `scaled_dot_product_attention`.

    Positions are added to queries/keys by the caller (DETR style) so values stay position-free.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        return tokens.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)  # [B, h, L, d/h]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attend_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [B, Lq, d], key/value [B, Lk, d], attend_mask [B, Lq, Lk] bool or None -> [B, Lq, d]."""
        batch, query_len, dim = query.shape
        q = self._split_heads(self.to_q(query))
        k = self._split_heads(self.to_k(key))
        v = self._split_heads(self.to_v(value))
        # One mask shared by all heads: broadcast over the head axis.
        mask = attend_mask.unsqueeze(1) if attend_mask is not None else None  # [B, 1, Lq, Lk]
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, h, Lq, d/h]
        return self.to_out(attended.transpose(1, 2).reshape(batch, query_len, dim))


class FeedForward(nn.Module):
    """Token-wise MLP d -> hidden -> d with GELU."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, d] -> [B, L, d]."""
        return self.net(tokens)


class MLP(nn.Module):
    """Plain MLP with ReLU between layers (the mask-embedding head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_dim] -> [..., out_dim]."""
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


class RegionToImageLayer(nn.Module):
    """Queries read the image: (masked) cross-attention of region queries to pixel tokens + FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
        pixels: torch.Tensor,
        pixel_pos: torch.Tensor,
        attend_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """queries [B, Q, d], query_pos [B|1, Q, d], pixels/pixel_pos [B, P, d], attend_mask [B, Q, P] -> [B, Q, d]."""
        attended = self.attn(self.attn_norm(queries) + query_pos, pixels + pixel_pos, pixels, attend_mask)
        queries = queries + self.dropout(attended)
        return queries + self.dropout(self.ffn(self.ffn_norm(queries)))


class ImageToRegionLayer(nn.Module):
    """The image reads the queries: every pixel token attends to all region queries + FFN on pixels.

    This is the second half of the paper's dual cross-attention; its output is added to the map,
    so later layers (and the mask head) see pixel features refined by region semantics.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.region_norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        pixels: torch.Tensor,
        pixel_pos: torch.Tensor,
        queries: torch.Tensor,
        query_pos: torch.Tensor,
    ) -> torch.Tensor:
        """pixels/pixel_pos [B, P, d], queries [B, Q, d], query_pos [B|1, Q, d] -> pixels [B, P, d]."""
        regions = self.region_norm(queries)
        attended = self.attn(self.attn_norm(pixels) + pixel_pos, regions + query_pos, regions)
        pixels = pixels + self.dropout(attended)
        return pixels + self.dropout(self.ffn(self.ffn_norm(pixels)))
