"""Modality-aware VQ codebook (paper Sec. 2.3, App. A.2).

M modalities x K codes of dim d_q. A region query q [d] is projected z = P_q(q) [d_q], snapped to
the nearest code of *its image's* modality, and mapped back q_hat = P_d(z_q) [d]. The global code
id m*K + k is what becomes an LLM region token `[C{m}_{k}]`.

Losses (squared norms averaged over elements, i.e. MSE):
    vq_loss    = ||sg[z] - e||^2 + commitment * ||z - sg[e]||^2
    recon_loss = ||q - q_hat||^2
The straight-through estimator z_q = z + sg[e - z] passes the decoder's gradient to P_q unchanged.

Dead codes. With few regions per modality most codes would never be picked. Two helpers, both
called by the training loop (nothing happens implicitly inside forward):
  * `initialize_codes(queries, modality)`: k-means++ seeding of each modality's K codes from that
    modality's projected queries of a first batch (call once, before training).
  * `reseed_dead_codes(z, modality, usage_counts)`: every N steps, codes of a modality with zero
    usage since the last call are moved onto random current z's of that modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medsight.config.schema import CodebookConfig


@dataclass
class CodebookOutput:
    """quantized [B,Q,d] = P_d(z_q) (straight-through), codes_z_q [B,Q,d_q], indices [B,Q] (within the
    modality's K), z [B,Q,d_q] (pre-quantization), scalar losses: vq_loss = codebook_loss +
    commitment_loss (the latter already scaled by the commitment weight), recon_loss."""

    quantized: torch.Tensor
    codes_z_q: torch.Tensor
    indices: torch.Tensor
    z: torch.Tensor
    vq_loss: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    recon_loss: torch.Tensor


def _projection(in_dim: int, out_dim: int) -> nn.Module:
    """Small MLP projector; the GELU gives P_d enough capacity to map M*K points back onto queries."""
    hidden = max(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class ModalityCodebook(nn.Module):
    """P_q, P_d and an [M, K, d_q] codebook; optional modality predictor on the CLS token."""

    def __init__(self, query_dim: int, config: CodebookConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = config
        self.num_modalities = config.num_modalities
        self.codes_per_modality = config.codes_per_modality
        self.project_in = self._projection(query_dim, config.code_dim)  # P_q
        self.project_out = self._projection(config.code_dim, query_dim)  # P_d
        bound = 1.0 / config.codes_per_modality
        self.codes = nn.Parameter(
            torch.empty(config.num_modalities, config.codes_per_modality, config.code_dim).uniform_(-bound, bound)
        )  # [M, K, d_q]
        self.modality_predictor: nn.Module | None = (
            self._modality_head(encoder_width, config.num_modalities) if config.modality_predictor else None
        )

    # ---- what a variant may change (AuthorsCodebook) -----------------------------------------

    def _projection(self, in_dim: int, out_dim: int) -> nn.Module:
        return _projection(in_dim, out_dim)

    def _modality_head(self, encoder_width: int, num_modalities: int) -> nn.Module:
        return nn.Sequential(nn.LayerNorm(encoder_width), nn.Linear(encoder_width, num_modalities))

    def unit(self, vectors: torch.Tensor) -> torch.Tensor:
        """The space codes are compared in: raw here, L2-normalised in the authors' variant."""
        return vectors

    def decode(self, perceiver: nn.Module, quantized: torch.Tensor, pixel_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks [B, K, H, W] and classes [B, K, C+1] of quantized queries [B, K, d]: here the
        perceiver's own heads (the authors' variant has a head of its own)."""
        return perceiver.decode_masks(quantized, pixel_features), perceiver.classify(quantized)

    def _quantized_codes(self, z: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Straight-through: value = chosen code, gradient = identity to z."""
        return z + (chosen - z).detach()

    # ---- quantization ----------------------------------------------------------------------

    def _check_modality(self, modality: torch.Tensor) -> None:
        if modality.numel() and (modality.min() < 0 or modality.max() >= self.num_modalities):
            raise ValueError(f"modality ids must be in [0, {self.num_modalities}), got {modality.tolist()}")

    def nearest_codes(self, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """z [B, Q, d_q], modality [B] -> index [B, Q] of the nearest code inside each image's modality."""
        self._check_modality(modality)
        sub_codebooks = self.unit(self.codes[modality].detach())  # [B, K, d_q]
        distances = torch.cdist(self.unit(z.detach()), sub_codebooks)  # [B, Q, K]
        return distances.argmin(dim=-1)

    def forward(self, queries: torch.Tensor, modality: torch.Tensor) -> CodebookOutput:
        """queries [B, Q, d], modality [B] long -> CodebookOutput."""
        z = self.project_in(queries)  # [B, Q, d_q]
        indices = self.nearest_codes(z, modality)  # [B, Q]
        sub_codebooks = self.unit(self.codes[modality])  # [B, K, d_q]
        chosen = torch.gather(sub_codebooks, 1, indices[..., None].expand(-1, -1, z.shape[-1]))  # [B, Q, d_q]
        codebook_loss = F.mse_loss(chosen, z.detach())  # moves codes towards the queries
        commitment_loss = self.config.commitment * F.mse_loss(z, chosen.detach())  # keeps P_q near its codes
        z_q = self._quantized_codes(z, chosen)
        quantized = self.project_out(z_q)  # [B, Q, d]
        return CodebookOutput(
            quantized=quantized,
            codes_z_q=z_q,
            indices=indices,
            z=z,
            vq_loss=codebook_loss + commitment_loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            recon_loss=F.mse_loss(quantized, queries),
        )

    # ---- codes as region-token queries -----------------------------------------------------

    def embed_codes(self, modality_ids: torch.Tensor, code_ids: torch.Tensor) -> torch.Tensor:
        """modality_ids, code_ids [...] long -> P_d(e_{m,k}) [..., d] (initial LLM token embeddings)."""
        self._check_modality(modality_ids)
        return self.project_out(self.unit(self.codes[modality_ids, code_ids]))

    def all_code_queries(self) -> torch.Tensor:
        """P_d(e) for every code -> [M*K, d], row m*K + k = modality m, code k."""
        return self.project_out(self.unit(self.codes.reshape(-1, self.codes.shape[-1])))

    def predict_modality(self, cls_token: torch.Tensor) -> torch.Tensor:
        """cls_token [B, C_enc] -> modality logits [B, M]."""
        if self.modality_predictor is None:
            raise RuntimeError("this codebook was built with modality_predictor=False")
        return self.modality_predictor(cls_token)

    # ---- dead-code handling ----------------------------------------------------------------

    def count_usage(self, indices: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """indices [B, Q], modality [B] -> usage counts [M, K] (accumulate these between reseeds)."""
        global_ids = (modality[:, None] * self.codes_per_modality + indices).flatten()
        counts = torch.bincount(global_ids, minlength=self.num_modalities * self.codes_per_modality)
        return counts.view(self.num_modalities, self.codes_per_modality)

    def _flat_by_modality(self, z: torch.Tensor, modality: torch.Tensor) -> dict[int, torch.Tensor]:
        """z [B, Q, d_q], modality [B] -> {m: z's of images with modality m, [N_m, d_q]}."""
        flat = z.detach().reshape(-1, z.shape[-1])  # [B*Q, d_q]
        flat_modality = modality[:, None].expand(-1, z.shape[1]).reshape(-1)  # [B*Q]
        return {int(m): flat[flat_modality == m] for m in flat_modality.unique()}

    @torch.no_grad()
    def initialize_codes(
        self, queries: torch.Tensor, modality: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """k-means++ seeding per modality from P_q(queries [B, Q, d]) with modality [B].

        Each next seed is drawn with probability proportional to the squared distance to the
        nearest seed so far, which spreads the K codes over the modality's queries. A modality
        with fewer points than K gets repeats plus small noise (still distinct codes). Modalities
        absent from the batch keep their random initialisation. Sampling runs on the CPU in
        float32 so a CPU `generator` works whatever device the codebook lives on.
        """
        self._check_modality(modality)
        by_modality = self._flat_by_modality(self.project_in(queries), modality.to(queries.device))
        for m, points in by_modality.items():
            points = points.float().cpu()  # [N_m, d_q]
            seeds = [points[int(torch.randint(len(points), (1,), generator=generator))]]
            for _ in range(1, self.codes_per_modality):
                nearest = torch.cdist(points, torch.stack(seeds)).min(dim=1).values.square()  # [N_m]
                weights = nearest if nearest.sum() > 0 else torch.ones_like(nearest)
                seeds.append(points[int(torch.multinomial(weights, 1, generator=generator))])
            chosen = torch.stack(seeds)  # [K, d_q]
            noise = 1e-3 * chosen.std().clamp_min(1e-3) * torch.randn(chosen.shape, generator=generator)
            self.codes[m] = (chosen + noise).to(self.codes)

    @torch.no_grad()
    def reseed_dead_codes(
        self,
        z: torch.Tensor,
        modality: torch.Tensor,
        usage_counts: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> int:
        """Move unused codes onto random current z's of their modality; returns how many moved.

        z [B, Q, d_q] (e.g. CodebookOutput.z of the current batch), modality [B], usage_counts [M, K]
        accumulated with `count_usage` since the last reseed. Modalities absent from the batch
        are left alone. Optimizer moments of a moved code are not reset (the caller owns them).
        Random draws use a CPU `generator` whatever the codebook's device.
        """
        self._check_modality(modality)
        reseeded = 0
        for m, points in self._flat_by_modality(z, modality.to(z.device)).items():
            dead = (usage_counts[m] == 0).nonzero().flatten().to(self.codes.device)
            if dead.numel() == 0 or len(points) == 0:
                continue
            picks = torch.randint(len(points), (dead.numel(),), generator=generator).to(points.device)
            noise = 1e-3 * torch.randn(dead.numel(), points.shape[-1], generator=generator).to(points)
            self.codes[m, dead] = (points[picks] + noise).to(self.codes)
            reseeded += dead.numel()
        return reseeded
