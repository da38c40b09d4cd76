"""Fixed 2D sine positional encoding for feature maps (DETR-style, normalised coordinates)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SinePositionEncoding2D(nn.Module):
    """Map a feature map [B, C, H, W] to a same-shaped sine/cosine encoding of pixel positions.

    Coordinates are normalised to (0, scale] per axis, so maps of different resolution get
    comparable codes: the perceiver sees a 2x finer map at every layer and the same physical
    location should keep roughly the same encoding across layers.

    Channel layout: the first C/2 channels encode y, the last C/2 encode x; inside each half the
    first quarter holds sines and the second quarter cosines at geometrically spaced frequencies.
    """

    def __init__(self, dim: int, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        if dim % 4 != 0:
            raise ValueError(f"sine position encoding needs dim divisible by 4, got {dim}")
        self.dim = dim
        self.temperature = temperature
        self.scale = scale

    def encode(self, height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Encoding for one map of size height x width -> [C, H, W] (batch-independent)."""
        num_freqs = self.dim // 4
        # Pixel centres, normalised so the last pixel sits at `scale`.
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 1.0) / height * self.scale  # [H]
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 1.0) / width * self.scale  # [W]
        exponents = torch.arange(num_freqs, device=device, dtype=torch.float32) / num_freqs
        inv_freq = self.temperature ** (-exponents)  # [C/4]
        y_angles = ys[:, None] * inv_freq[None, :]  # [H, C/4]
        x_angles = xs[:, None] * inv_freq[None, :]  # [W, C/4]
        y_code = torch.cat([y_angles.sin(), y_angles.cos()], dim=1)  # [H, C/2]
        x_code = torch.cat([x_angles.sin(), x_angles.cos()], dim=1)  # [W, C/2]
        y_map = y_code.t()[:, :, None].expand(-1, height, width)  # [C/2, H, W]
        x_map = x_code.t()[:, None, :].expand(-1, height, width)  # [C/2, H, W]
        return torch.cat([y_map, x_map], dim=0).to(dtype)  # [C, H, W]

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """feature_map [B, C, H, W] -> position encoding [B, C, H, W] (a broadcast view)."""
        batch, channels, height, width = feature_map.shape
        if channels != self.dim:
            raise ValueError(f"expected {self.dim} channels, got {channels}")
        code = self.encode(height, width, feature_map.device, feature_map.dtype)
        return code.unsqueeze(0).expand(batch, -1, -1, -1)
