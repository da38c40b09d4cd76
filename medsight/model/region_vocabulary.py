"""Region tokens in the LLM vocabulary: names like ``[C3_16]`` and their learnable embeddings.

The new tokens live in their own parameters beside the LLM's embedding matrix instead of a
resized copy of it: freezing is then exact (the base vocabulary never moves in stage 4), and the
8B model's 150K-row matrices are never touched or re-saved for a few hundred new rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SEG_TOKEN = "[SEG]"
REGION_TOKEN_PATTERN = re.compile(r"\[C(\d+)_(\d+)\]|\[SEG\]")


@dataclass(frozen=True)
class RegionVocabulary:
    """Which region tokens exist: M x K codebook tokens, or one [SEG] token (ablation), or none
    (stage 3: the tokens are added to the vocabulary only once the codebook exists, at stage 4)."""

    num_modalities: int
    codes_per_modality: int
    mode: str = "codebook"  # codebook | seg_token | none

    def __post_init__(self) -> None:
        if self.mode not in ("codebook", "seg_token", "none"):
            raise ValueError(f"model.grounding: {self.mode!r} is not one of codebook, seg_token")

    @classmethod
    def empty(cls) -> RegionVocabulary:
        return cls(0, 0, "none")

    @property
    def names(self) -> list[str]:
        if self.mode == "none":
            return []
        if self.mode == "seg_token":
            return [SEG_TOKEN]
        return [
            token_name(m, k)
            for m in range(self.num_modalities)
            for k in range(self.codes_per_modality)
        ]

    def __len__(self) -> int:
        return len(self.names)

    def index(self, modality: int, code: int) -> int:
        """Row of a (modality, code) token; every code maps to [SEG] in the ablation."""
        if self.mode == "seg_token":
            return 0
        return modality * self.codes_per_modality + code


def token_name(modality: int, code: int) -> str:
    return f"[C{modality}_{code}]"


class RegionTokenEmbeddings(nn.Module):
    """Input and output (LM-head) rows for the region tokens."""

    def __init__(self, num_tokens: int, hidden_size: int):
        super().__init__()
        self.input_rows = nn.Parameter(torch.zeros(num_tokens, hidden_size))  # [T, H]
        self.output_rows = nn.Parameter(torch.zeros(num_tokens, hidden_size))  # [T, H]

    def forward(self, ids: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """ids [...] -> input rows [..., H]; or hidden [..., H] -> region-token logits [..., T].

        Called as a module (not by reading the rows from outside) so that under DeepSpeed
        ZeRO-3 the partitioned rows are gathered for this call and again for its backward.
        """
        if hidden is not None:
            return hidden @ self.output_rows.to(hidden.dtype).T
        return F.embedding(ids, self.input_rows)

    @torch.no_grad()
    def initialise(self, rows: torch.Tensor) -> None:
        """Paper init: row (m, k) = P_v2t(P_d(e_{m,k})); also used for the LM-head rows so a
        freshly added token is predicted where its visual counterpart is represented."""
        if rows.shape != self.input_rows.shape:
            raise ValueError(f"region token init rows {tuple(rows.shape)} != {tuple(self.input_rows.shape)}")
        self.input_rows.copy_(rows)
        self.output_rows.copy_(rows)
