"""Projectors between the vision side and the LLM: P_v2t (vision-to-text) and P_t2v (text-to-vision)."""

from __future__ import annotations

import math

import torch
from torch import nn


class VisionToTextProjector(nn.Module):
    """Token-wise 2-layer GELU MLP over [patch tokens ; region tokens] into LLM embedding space.

    Patch and region tokens share one MLP (as in the paper). When the perceiver width d differs
    from the encoder width C (the medsight perceiver at d < C) region tokens are first lifted to C
    by a linear map, so the shared MLP still sees one input space; at equal widths (the authors'
    perceiver, d = C = 1024) it is the identity.
    With ``patch_merge`` s > 1, each s x s block of neighbouring patches is concatenated and
    mapped back to C first (Qwen2-VL's merger), so the LLM reads s^2 times fewer patch tokens.
    """

    def __init__(self, encoder_width: int, region_dim: int, llm_dim: int, patch_merge: int = 1):
        super().__init__()
        if patch_merge < 1:
            raise ValueError(f"model.patch_merge must be >= 1, got {patch_merge}")
        self.patch_merge = patch_merge
        self.region_lift: nn.Module = (
            nn.Identity() if region_dim == encoder_width else nn.Linear(region_dim, encoder_width)
        )
        self.merge: nn.Module = (
            nn.Identity() if patch_merge == 1 else nn.Linear(encoder_width * patch_merge**2, encoder_width)
        )
        self.mlp = nn.Sequential(
            nn.Linear(encoder_width, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """regions: [..., d] -> [..., H]."""
        return self.mlp(self.region_lift(regions))

    def merge_patches(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """[B, g*g, C] (row-major grid) -> [B, (g/s)^2, C]."""
        s = self.patch_merge
        if s == 1:
            return patch_tokens
        batch, count, width = patch_tokens.shape
        grid = math.isqrt(count)
        if grid * grid != count or grid % s:
            raise ValueError(f"patch_merge={s} needs a square patch grid divisible by {s}, got {count} patches")
        blocks = patch_tokens.view(batch, grid // s, s, grid // s, s, width).permute(0, 1, 3, 2, 4, 5)
        return self.merge(blocks.reshape(batch, (grid // s) ** 2, s * s * width))

    def forward(self, patch_tokens: torch.Tensor, region_tokens: torch.Tensor | None) -> torch.Tensor:
        """patch_tokens [B, N, C], region_tokens [B, Q, d] or None -> [B, N/s^2 (+Q), H]."""
        sequence = self.merge_patches(patch_tokens)
        if region_tokens is not None:
            sequence = torch.cat([sequence, self.region_lift(region_tokens)], dim=1)
        return self.mlp(sequence)


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class TextToVisionProjector(nn.Module):
    """Maps an emitted region token's last hidden state into the perceiver's query space.

    ``activation``: "gelu" (this project) or "relu" (the authors' released projector).
    """

    def __init__(self, llm_dim: int, query_dim: int, activation: str = "gelu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"model.t2v_activation: {activation!r} is not one of {', '.join(_ACTIVATIONS)}")
        self.mlp = nn.Sequential(
            nn.Linear(llm_dim, llm_dim),
            _ACTIVATIONS[activation](),
            nn.Linear(llm_dim, query_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> [..., d]."""
        return self.mlp(hidden)
