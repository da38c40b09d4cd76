"""Lightweight conv adapter that doubles the resolution of the perceiver's image map."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _group_count(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= max_groups that divides `channels` (GroupNorm needs a divisor)."""
    return math.gcd(channels, max_groups)


class UpsampleAdapter(nn.Module):
    """Bilinear upsample by `factor`, then a 3x3 conv + GroupNorm + GELU refinement: [B,d,h,w] -> [B,d,fh,fw].

    The conv branch is added to the upsampled map (residual) rather than replacing it: at
    initialisation the adapter is then close to plain bilinear upsampling, so the encoder signal
    reaches the finest map undamaged and the masks learn quickly; the conv learns the sharpening.
    """

    def __init__(self, dim: int, factor: int = 2) -> None:
        super().__init__()
        if factor < 1:
            raise ValueError(f"upsample factor must be >= 1, got {factor}")
        self.factor = factor
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(_group_count(dim), dim)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature_map [B, d, h, w] -> [B, d, h*factor, w*factor]."""
        if self.factor > 1:
            feature_map = F.interpolate(feature_map, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return feature_map + F.gelu(self.norm(self.conv(feature_map)))
