"""The modality-aware codebook in the released model's form (``model.codebook.architecture: authors``).

Differences from ``ModalityCodebook`` (same interface, same losses):
  * P_q and P_d are Linear -> GELU -> LayerNorm -> Linear -> GELU -> LayerNorm;
  * queries z and codes are compared L2-normalised, and the chosen (normalised) code itself is
    what P_d reads: gradients reach the codes directly, P_q only through the commitment term;
  * the modality predictor is one linear layer on the CLS token;
  * quantized queries have their own mask/class head (mask = (W q + b) . pixel, class = W q + b)
    instead of reusing the perceiver's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medsight.config.schema import CodebookConfig
from medsight.model.codebook import ModalityCodebook


class QuantizedQueryHead(nn.Module):
    """Mask and class head for quantized queries against the perceiver's final map."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.mask_proj = nn.Linear(dim, dim)
        self.class_head = nn.Linear(dim, num_classes + 1)

    def forward(self, queries: torch.Tensor, pixel_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B, K, d], pixel_features [B, d, H, W] -> (masks [B, K, H, W], classes [B, K, C+1])."""
        batch, _, height, width = pixel_features.shape
        pixels = pixel_features.permute(0, 2, 3, 1).reshape(batch, height * width, -1)
        masks = torch.bmm(self.mask_proj(queries), pixels.transpose(1, 2)).view(batch, -1, height, width)
        return masks, self.class_head(queries)


class AuthorsCodebook(ModalityCodebook):
    def __init__(self, query_dim: int, config: CodebookConfig, encoder_width: int, num_classes: int | None = None) -> None:
        super().__init__(query_dim, config, encoder_width)
        # The head is sized by the perceiver's class count, set once the perceiver is known.
        self.quantized_head = QuantizedQueryHead(query_dim, num_classes) if num_classes is not None else None

    def _projection(self, in_dim: int, out_dim: int) -> nn.Module:
        if in_dim == out_dim:
            return nn.Identity()  # the released code skips the projection at equal widths
        hidden = max(in_dim, out_dim)
        return nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden),
            nn.Linear(hidden, out_dim), nn.GELU(), nn.LayerNorm(out_dim),
        )

    def _modality_head(self, encoder_width: int, num_modalities: int) -> nn.Module:
        return nn.Linear(encoder_width, num_modalities)

    def unit(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, p=2, dim=-1)

    def _quantized_codes(self, z: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return chosen

    def decode(self, perceiver: nn.Module, quantized: torch.Tensor, pixel_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.quantized_head is None:
            raise RuntimeError("AuthorsCodebook was built without num_classes: it has no head for quantized queries")
        return self.quantized_head(quantized, pixel_features)
