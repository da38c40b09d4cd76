"""Building blocks of the authors'-architecture Region Perceiver (``architecture: authors``).

Restated from the equations of the released model (the facts: key names, shapes, module order
are listed in tests/test_authors_checkpoints.py with file and line of the authors' code):

  attention  A(x, c)   = W_o softmax_blocked((W_q LN_x(x)) (W_k LN_c(c))^T / sqrt(d_h)) (W_v LN_c(c))
                         heads of width d_h, inner width h * d_h (512) separate from d (1024), no biases;
                         a query whose every key is blocked averages all values (uniform weights),
                         which is what filling blocked logits with a large negative number gives
  feed-forward F(x)    = W_2 GELU(W_1 LN(x)), width 4d, no biases
  post-norm residual   x <- LN(x + A(x, c)), then x <- LN(x + F(x)) (each LN its own)
  conv adapter         bilinear x2 upsampling, then one 3x3 conv (no norm, no activation, no residual)
  sine positions       added to the map itself (not only to keys), DETR-style, normalised coordinates
  heads                mask = (W_m q + b) . pixel, class = W_c q + b

Sequences are token-major [B, L, d]; image maps stay pixel tokens [B, H*W, d] (row-major), viewed
as a channels-last [B, d, H, W] tensor only around the conv, so no layout copies happen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def blocked_pixels(previous_mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixels a query may *not* read: sigmoid of the previous masks, resized to ``size``, below 0.5.

    previous_mask_logits [B, Q, h, w] -> blocked [B, Q, H*W] bool. No gradient flows through it.
    Rows that end up fully blocked are handled by the attention (uniform average), not here.
    """
    with torch.no_grad():
        resized = F.interpolate(previous_mask_logits, size=size, mode="bilinear", align_corners=False)
        return (resized.sigmoid() < 0.5).flatten(2)


class SinePositions(nn.Module):
    """Sine/cosine code of an H x W map as tokens [H*W, d] (no parameters).

    Coordinates run 1..H (1..W), scaled to (0, 2*pi] by dividing by H (W) + 1e-6. Half the channels
    encode y, half x; inside each half, channel pair (2j, 2j+1) = (sin, cos) of coordinate /
    10000^(2j / (d/2)). Maps of d not divisible by 2 are zero-padded to d.
    """

    def __init__(self, dim: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.per_axis = dim // 2
        self.temperature = temperature
        # Codes are constants of (H, W, device, dtype): built once, not per step (at 192x192 the
        # sin/cos over 37K x 1024 entries cost about a second of CPU per forward).
        self._codes: dict[tuple, torch.Tensor] = {}

    def _axis(self, length: int, device: torch.device) -> torch.Tensor:
        """Code of one axis -> [length, d/2] (float32, then cast by the caller)."""
        coords = torch.arange(1, length + 1, device=device, dtype=torch.float32) / (length + 1e-6) * (2 * math.pi)
        pair = torch.arange(self.per_axis, device=device, dtype=torch.float32).div(2, rounding_mode="floor")
        freq = self.temperature ** (2 * pair / self.per_axis)  # [d/2]
        angles = coords[:, None] / freq[None, :]  # [length, d/2]
        even = torch.arange(self.per_axis, device=device) % 2 == 0
        return torch.where(even, angles.sin(), angles.cos())

    def encode(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """-> [H*W, d], row-major (token index = y * W + x); read-only, shared between calls."""
        key = (height, width, str(device), dtype)
        if key not in self._codes:
            with torch.no_grad():
                self._codes[key] = self._build(height, width, device, dtype)
        return self._codes[key]

    def _build(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        y = self._axis(height, device)[:, None, :].expand(height, width, self.per_axis)
        x = self._axis(width, device)[None, :, :].expand(height, width, self.per_axis)
        code = torch.cat([y, x], dim=-1).reshape(height * width, 2 * self.per_axis)
        if code.shape[-1] < self.dim:
            code = F.pad(code, (0, self.dim - code.shape[-1]))
        return code.to(dtype)


class NormedCrossAttention(nn.Module):
    """Multi-head cross-attention that normalises its reader and its context itself.

    Inner width ``heads * head_dim`` is independent of the model width ``dim``; no biases.
    Runs through ``scaled_dot_product_attention`` (fused kernels on GPU, no [B, h, Lq, Lk]
    probability tensor kept for backward where the kernel allows).
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner = heads * head_dim
        self.reader_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        return tokens.view(batch, length, self.heads, self.head_dim).transpose(1, 2)  # [B, h, L, d_h]

    def forward(self, reader: torch.Tensor, context: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """reader [B, Lq, d], context [B, Lk, d], blocked [B, Lq, Lk] bool (True = may not read) -> [B, Lq, d]."""
        batch, length, _ = reader.shape
        q = self._heads(self.to_q(self.reader_norm(reader)))
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)
        if blocked is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            empty = blocked.all(dim=-1)  # [B, Lq]
            # Fully blocked rows are opened for the kernel (no NaN) and replaced by the mean below.
            allowed = ~blocked | empty[..., None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
            # Unconditional (no host sync on GPU); only the [B, h, Q, d_h] query side is touched.
            out = torch.where(empty[:, None, :, None], v.mean(dim=2, keepdim=True), out)
        return self.to_out(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class _GeluThenLinear(torch.autograd.Function):
    """y = GELU(h) W^T, keeping only h for backward: GELU(h) is recomputed there.

    Autograd would keep both h and GELU(h), each [B, H*W, 4d]: at 192 x 192 that is 600 MB per
    image per layer for the second one alone. Recomputing an element-wise GELU costs far less
    than the matmuls around it. Same values as ``F.linear(F.gelu(h), W)``; under autocast the
    weight takes h's dtype, as autocast would cast it.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight)
        return F.linear(F.gelu(hidden), weight.to(hidden.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, weight = ctx.saved_tensors
        grad = grad.to(hidden.dtype)
        grad_weight = grad.flatten(0, -2).t() @ F.gelu(hidden).flatten(0, -2)  # [d, 4d]
        grad_hidden = torch.ops.aten.gelu_backward(grad @ weight.to(hidden.dtype), hidden)
        return grad_hidden, grad_weight.to(weight.dtype)


class NormedFeedForward(nn.Module):
    """LN -> Linear(d, ffn) -> GELU -> Linear(ffn, d), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(self.norm(tokens))
        if torch.is_grad_enabled() and (hidden.requires_grad or self.fc2.weight.requires_grad):
            return _GeluThenLinear.apply(hidden, self.fc2.weight)
        return self.fc2(F.gelu(hidden))


class PostNormAttentionBlock(nn.Module):
    """x <- LN(x + A(x, c)); x <- LN(x + F(x)). The reading side of one direction of attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.attn = NormedCrossAttention(dim, heads, head_dim)
        self.attn_out_norm = nn.LayerNorm(dim)
        self.ffn = NormedFeedForward(dim, ffn_dim)
        self.ffn_out_norm = nn.LayerNorm(dim)

    def forward(self, reader: torch.Tensor, context: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        reader = self.attn_out_norm(self.attn(reader, context, blocked) + reader)
        return self.ffn_out_norm(self.ffn(reader) + reader)


class DualAttentionLayer(nn.Module):
    """One perceiver layer: queries read the (masked) pixels, then every pixel reads the new queries."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.read_image = PostNormAttentionBlock(dim, heads, head_dim, ffn_dim)
        self.write_image = PostNormAttentionBlock(dim, heads, head_dim, ffn_dim)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor, blocked: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, Q, d], pixels [B, P, d], blocked [B, Q, P] -> (queries, pixels)."""
        queries = self.read_image(queries, pixels, blocked)
        pixels = self.write_image(pixels, queries)
        return queries, pixels


class ConvUpsampleAdapter(nn.Module):
    """Bilinear upsampling by ``factor`` then a 3x3 conv, on pixel tokens.

    The token tensor [B, H*W, d] viewed as [B, d, H, W] is already channels-last in memory: on a
    GPU the upsampling and the conv run in NHWC (cuDNN's layout for tensor-core convs) and the
    result reads back as tokens without a copy. On a CPU, oneDNN's 3x3 conv and its backward at
    d = 1024 measured ~20% faster in NCHW than in NHWC (BENCHMARKS.md), more than the two layout
    copies cost, so there the map is made NCHW first.
    """

    def __init__(self, dim: int, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"upsample factor must be >= 1, got {factor}")
        self.factor = factor
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)

    def forward(self, pixels: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, int, int]:
        """pixels [B, H*W, d] -> ([B, fH*fW, d], fH, fW)."""
        batch, _, dim = pixels.shape
        feature_map = pixels.view(batch, height, width, dim).permute(0, 3, 1, 2)  # channels-last view
        layout = torch.channels_last if feature_map.is_cuda else torch.contiguous_format
        feature_map = feature_map.contiguous(memory_format=layout)
        if self.factor > 1:
            feature_map = F.interpolate(feature_map, scale_factor=self.factor, mode="bilinear", align_corners=False)
        feature_map = self.conv(feature_map.contiguous(memory_format=layout))
        out_h, out_w = feature_map.shape[-2:]
        tokens = feature_map.permute(0, 2, 3, 1).reshape(batch, out_h * out_w, dim)  # a view when NHWC
        return tokens, out_h, out_w
