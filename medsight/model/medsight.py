"""MedSIGHT: encoder + Region Perceiver + codebook + LLM, with region tokens that decode to masks."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from medsight.config.schema import ModelConfig
from medsight.data.conversation_dataset import IGNORE_INDEX
from medsight.model.codebook import ModalityCodebook
from medsight.model.criterion import ordered_mask_loss
from medsight.model.encoder import ImageEncoder
from medsight.model.projectors import TextToVisionProjector, VisionToTextProjector
from medsight.model.region_vocabulary import RegionTokenEmbeddings, RegionVocabulary
from medsight.model.visual_cache import VisualContextCache
from medsight.model.visual_merge import merge_visual_tokens



@dataclass
class VisualContext:
    patch_tokens: torch.Tensor  # [B, N, C]
    cls_token: torch.Tensor  # [B, C]
    region_queries: torch.Tensor  # [B, Q, d]
    pixel_features: torch.Tensor  # [B, d, Hr, Wr] (I_r, what region tokens decode against)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in declaration order: what the visual cache stores per image."""
        return tuple(getattr(self, f.name) for f in fields(self))


@dataclass
class LanguageOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    seg_loss: torch.Tensor
    num_region_tokens: int


class MedSight(nn.Module):
    """The whole model for the LLM stages (3-5), evaluation and inference."""

    def __init__(
        self,
        config: ModelConfig,
        encoder: ImageEncoder,
        perceiver: nn.Module,  # RegionPerceiver or AuthorsRegionPerceiver
        codebook: ModalityCodebook | None,
        llm: PreTrainedModel,
        base_vocab_size: int,
        image_token_id: int,
        vocabulary: RegionVocabulary | None = None,
    ):
        """``vocabulary``: the region tokens (default: the config's codebook tokens); stage 3
        passes ``RegionVocabulary.empty()`` and no codebook, which does not exist yet."""
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.perceiver = perceiver
        self.codebook = codebook
        self.llm = llm
        if vocabulary is None:
            vocabulary = RegionVocabulary(config.codebook.num_modalities, config.codebook.codes_per_modality,
                                          config.grounding)
        self.vocabulary = vocabulary
        hidden = llm.config.hidden_size
        self.v2t = VisionToTextProjector(config.encoder.width, config.perceiver.dim, hidden, config.patch_merge)
        self.t2v = TextToVisionProjector(hidden, config.perceiver.dim, config.t2v_activation)
        self.region_tokens = RegionTokenEmbeddings(len(self.vocabulary), hidden)
        self.base_vocab_size = base_vocab_size
        self.image_token_id = image_token_id
        # Set by an LLM stage while the encoder and perceiver are frozen (see visual_cache.py).
        self.visual_cache: VisualContextCache | None = None

    def train(self, mode: bool = True) -> MedSight:
        # The vision side is frozen in every stage that builds a MedSight (3-5, eval): it never
        # applies dropout, and the visual cache may serve its features.
        super().train(mode)
        self.encoder.eval()
        self.perceiver.eval()
        return self

    # ----------------------------------------------------------------- vision side
    @property
    def num_visual_tokens(self) -> int:
        regions = self.config.perceiver.num_queries if self.config.region_embeddings else 0
        return self.config.num_patch_tokens + regions

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, image_keys: list[str] | None = None) -> VisualContext:
        """images [B, 3, S, S] in [0, 1]; encoder and perceiver are frozen in every LLM stage,
        so with ``image_keys`` and a cache an image's features are computed once per stage."""
        if self.visual_cache is not None and image_keys is not None:
            rows = self.visual_cache.lookup(image_keys, images, lambda batch: self._encode(batch).tensors())
            return VisualContext(*rows)
        return self._encode(images)

    def _encode(self, images: torch.Tensor) -> VisualContext:
        encoded = self.encoder(images)
        perceived = self.perceiver(encoded.patch_tokens)
        return VisualContext(
            patch_tokens=encoded.patch_tokens,
            cls_token=encoded.cls_token,
            region_queries=perceived.queries,
            pixel_features=perceived.pixel_features,
        )

    def visual_embeddings(self, context: VisualContext) -> torch.Tensor:
        """[B, Nv, H] through P_v2t; region tokens dropped in the no-region-embeddings ablation."""
        regions = context.region_queries if self.config.region_embeddings else None
        return self.v2t(context.patch_tokens, regions)

    @torch.no_grad()
    def initialise_region_tokens(self) -> None:
        """Token (m, k) <- P_v2t(P_d(e_{m,k})); the [SEG] ablation starts from the codes' mean."""
        if self.codebook is None or not len(self.vocabulary):
            return
        code_queries = self.codebook.all_code_queries()  # [M*K, d]
        rows = self.v2t.project_regions(code_queries)  # [M*K, H]
        if self.vocabulary.mode == "seg_token":
            rows = rows.mean(dim=0, keepdim=True)
        self.region_tokens.initialise(rows)

    # ----------------------------------------------------------------- text side
    def is_region_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        return token_ids >= self.base_vocab_size

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, H]: base rows from the LLM, region rows from our own parameters."""
        region = self.is_region_token(input_ids)
        base = self.llm.get_input_embeddings()(input_ids.clamp(max=self.base_vocab_size - 1))
        if not len(self.vocabulary):
            return base
        rows = self.region_tokens(ids=(input_ids - self.base_vocab_size).clamp(min=0))
        return torch.where(region.unsqueeze(-1), rows.to(base.dtype), base)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V_base + T_region]."""
        # Slice: real checkpoints pad their vocab (Qwen3: 151,936 rows for 151,669 tokens), and
        # region ids start right after the tokenizer's last real token.
        base = self.llm.get_output_embeddings()(hidden)[..., : self.base_vocab_size]
        if not len(self.vocabulary):
            return base  # stage 3: no region tokens yet (and ZeRO-3 cannot gather a 0-row weight)
        region = self.region_tokens(hidden=hidden)
        return torch.cat([base, region], dim=-1)

    def input_embeddings(self, input_ids: torch.Tensor, context: VisualContext) -> torch.Tensor:
        return merge_visual_tokens(
            self.embed_tokens(input_ids), input_ids, self.visual_embeddings(context), self.image_token_id
        )

    def decode_region_masks(self, hidden: torch.Tensor, context: VisualContext, row: int) -> torch.Tensor:
        """hidden [K, H] of the region tokens of one answer, for image ``row`` of ``context`` ->
        mask logits [K, Hr, Wr]. How P_t2v's queries become masks is the perceiver's choice: the
        mask head against I_r, or (authors' architecture) a new perceiver pass with them as queries."""
        pixel_features = context.pixel_features[row : row + 1]
        queries = self.t2v(hidden).to(pixel_features.dtype).unsqueeze(0)  # [1, K, d]
        patch_tokens = context.patch_tokens[row : row + 1].to(pixel_features.dtype)
        return self.perceiver.decode_llm_queries(queries, patch_tokens, pixel_features)[0]

    def classify_region_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [K, H] of emitted region tokens -> class logits [K, C+1] (last = no-object),
        read from the same P_t2v query that ``decode_region_masks`` decodes."""
        queries = self.t2v(hidden)
        return self.perceiver.classify(queries.unsqueeze(0).to(self.perceiver.class_head.weight.dtype))[0]

    def decode_batch_region_masks(
        self, hidden: torch.Tensor, positions: list[torch.Tensor], context: VisualContext
    ) -> list[torch.Tensor]:
        """hidden [B, T, H]; per sample the positions of its region tokens (possibly none); the
        batch's images as ``context`` -> per sample mask logits [K_b, Hr, Wr].

        One P_t2v call and one perceiver decode for the whole batch, however many region tokens
        each sample holds: under DeepSpeed ZeRO-3 every rank must call the same modules as often
        (each call gathers partitioned weights collectively), whatever its share of the data.
        """
        pixel_features = context.pixel_features
        width = max(1, max((len(p) for p in positions), default=0))
        index = torch.zeros(len(positions), width, dtype=torch.long, device=hidden.device)
        for b, sample in enumerate(positions):
            index[b, : len(sample)] = sample.to(hidden.device)
        rows = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, K, H]
        queries = self.t2v(rows).to(pixel_features.dtype)  # [B, K, d]
        patch_tokens = context.patch_tokens.to(pixel_features.dtype)
        logits = self.perceiver.decode_llm_queries(queries, patch_tokens, pixel_features)  # [B, K, Hr, Wr]
        return [logits[b, : len(sample)] for b, sample in enumerate(positions)]

    # ----------------------------------------------------------------- training
    def forward(
        self,
        images: torch.Tensor,  # [B, 3, S, S]
        input_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T]
        labels: torch.Tensor,  # [B, T], IGNORE_INDEX outside answers
        masks: list[torch.Tensor] | None = None,  # per sample [K_b, S, S] in region-token order
        seg_weight: float = 1.0,
        image_keys: list[str] | None = None,  # lets a stage's visual cache serve repeated images
    ) -> LanguageOutput:
        context = self.encode_images(images, image_keys)
        embeddings = self.input_embeddings(input_ids, context)
        hidden = self.llm.base_model(inputs_embeds=embeddings, attention_mask=attention_mask).last_hidden_state
        logits = self.logits(hidden)  # [B, T, V]
        lm_loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        seg_loss, count = self._region_mask_loss(hidden, input_ids, labels, context, masks)
        return LanguageOutput(loss=lm_loss + seg_weight * seg_loss, lm_loss=lm_loss, seg_loss=seg_loss, num_region_tokens=count)

    def _region_mask_loss(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        context: VisualContext,
        masks: list[torch.Tensor] | None,
    ) -> tuple[torch.Tensor, int]:
        """Masks are supervised in the order their region tokens appear in the answer."""
        answer_regions = self.is_region_token(input_ids) & (labels != IGNORE_INDEX)
        zero = hidden.sum() * 0.0  # keeps the graph connected when a batch has no region token
        if masks is None or not len(self.vocabulary):
            return zero, 0
        positions = [answer_regions[b].nonzero().flatten() for b in range(input_ids.shape[0])]
        for b, (sample, target) in enumerate(zip(positions, masks)):
            if sample.numel() != target.shape[0]:
                raise ValueError(
                    f"batch sample {b}: {sample.numel()} region tokens in the answer but "
                    f"{target.shape[0]} masks; mask_files must list one mask per region token"
                )
        decoded = self.decode_batch_region_masks(hidden, positions, context)
        losses = [ordered_mask_loss(logits, masks[b].to(logits.dtype), self.config.loss)
                  for b, logits in enumerate(decoded) if logits.shape[0]]
        if not losses:
            # Still through the decoder, so its backward runs on every rank (ZeRO-3 gathers).
            return zero + sum(logits.sum() for logits in decoded) * 0.0, 0
        return torch.stack(losses).mean(), int(answer_regions.sum())
