"""Projectors between the vision side and the LLM: P_v2t (vision-to-text) and P_t2v (text-to-vision)."""

from __future__ import annotations

import torch
from torch import nn


class VisionToTextProjector(nn.Module):
    """Token-wise 2-layer GELU MLP over [patch tokens ; region tokens] into LLM embedding space.

    Patch and region tokens share one MLP (as in the paper). When the perceiver width d differs
    from the encoder width C (full preset: 256 vs 1024) region tokens are first lifted to C by a
    linear map, so the shared MLP still sees one input space; at equal widths it is the identity.
    """

    def __init__(self, encoder_width: int, region_dim: int, llm_dim: int):
        super().__init__()
        self.region_lift: nn.Module = (
            nn.Identity() if region_dim == encoder_width else nn.Linear(region_dim, encoder_width)
        )
        self.mlp = nn.Sequential(
            nn.Linear(encoder_width, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def project_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """regions: [..., d] -> [..., H]."""
        return self.mlp(self.region_lift(regions))

    def forward(self, patch_tokens: torch.Tensor, region_tokens: torch.Tensor | None) -> torch.Tensor:
        """patch_tokens [B, N, C], region_tokens [B, Q, d] or None -> [B, N(+Q), H]."""
        sequence = patch_tokens
        if region_tokens is not None:
            sequence = torch.cat([patch_tokens, self.region_lift(region_tokens)], dim=1)
        return self.mlp(sequence)


class TextToVisionProjector(nn.Module):
    """Maps an emitted region token's last hidden state into the perceiver's query space."""

    def __init__(self, llm_dim: int, query_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(llm_dim, llm_dim),
            nn.GELU(),
            nn.Linear(llm_dim, query_dim),
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> [..., d]."""
        return self.mlp(hidden)
