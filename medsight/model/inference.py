"""Ask a trained MedSIGHT model about images: text answers whose region tokens decode to masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from medsight.config.io import load_config
from medsight.config.schema import ExperimentConfig
from medsight.data.conversation_dataset import PromptFormat, encode_prompt
from medsight.data.taxonomy import Taxonomy
from medsight.model.generation import generate


@dataclass
class GroundedAnswer:
    text: str  # decoded answer; region tokens kept in the text, e.g. "a tumor in the liver [C0_3]."
    region_tokens: list[str]  # in order of appearance
    masks: torch.Tensor  # [K, H, W] probabilities at the image resolution, K = len(region_tokens)
    # [K, C+1] class probabilities of each region token (last = no-object): the perceiver's class
    # head applied to the token's hidden state after P_t2v, the same query the mask decodes from.
    class_probs: torch.Tensor | None = field(default=None, repr=False)
    generated_tokens: int = 0  # tokens generated (eos excluded), for serving metrics


class MedSightInference:
    def __init__(self, config: ExperimentConfig, model, tokenizer, taxonomy: Taxonomy | None = None):
        self.config = config
        self.taxonomy = taxonomy  # the label space it was trained on; None = unknown
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.format = PromptFormat.from_tokenizer(tokenizer, config.model.llm)
        self.image_size = config.model.encoder.image_size

    @classmethod
    def load(cls, model_dir: Path, base_dir: Path, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> MedSightInference:
        """``model_dir``: an instruct-tune (or t2v-align) output; ``base_dir``: base-models output.
        ``dtype``: what the whole model runs in (bf16 on a GPU)."""
        from medsight.model.bundle import bundle_taxonomy
        from medsight.model.factory import build_medsight

        model_dir, base_dir = Path(model_dir), Path(base_dir)
        config_file = model_dir / "config.yaml"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: not a MedSIGHT stage output (config.yaml missing)")
        config = load_config(config_file)
        # Bundles written before they carried a taxonomy were all trained on synthetic data.
        taxonomy = bundle_taxonomy({"model": model_dir}) or Taxonomy.synthetic()
        model, tokenizer, _ = build_medsight(config, {"base": base_dir, "model": model_dir}, taxonomy, llm_dtype=dtype)
        return cls(config, model.to(device=device, dtype=dtype), tokenizer, taxonomy)

    def region_token_names(self) -> list[str]:
        return self.model.vocabulary.names

    @torch.no_grad()
    def answer(
        self,
        images: torch.Tensor,
        questions: list[str],
        modality: torch.Tensor | None = None,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        repetition_penalty: float = 1.2,
        generator: torch.Generator | None = None,
    ) -> list[GroundedAnswer]:
        """images [B, 3, S, S] in [0, 1]; ``modality`` is accepted for API symmetry (the LLM
        path reads modality from the pixels)."""
        if images.shape[0] != len(questions):
            raise ValueError(f"{images.shape[0]} images but {len(questions)} questions")
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        weight = next(self.model.parameters())
        images = images.to(device=weight.device, dtype=weight.dtype)
        context = self.model.encode_images(images)
        prompts = [encode_prompt(self.tokenizer, self.format, q, self.model.num_visual_tokens) for q in questions]
        out = generate(
            self.model,
            context,
            prompts,
            eos_id=self.format.eos_id,
            pad_id=self.format.pad_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            generator=generator,
        )
        answers = []
        for row, (tokens, hidden) in enumerate(zip(out.tokens, out.hidden)):
            token_tensor = torch.tensor(tokens, dtype=torch.long)
            is_region = self.model.is_region_token(token_tensor) if tokens else torch.zeros(0, dtype=torch.bool)
            positions = is_region.nonzero().flatten()
            if positions.numel():
                logits = self.model.decode_region_masks(hidden[positions.to(hidden.device)], context, row)
                masks = torch.sigmoid(
                    F.interpolate(logits[None].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)[0]
                ).cpu()
                class_probs = self.model.classify_region_tokens(hidden[positions]).softmax(-1).float().cpu()
            else:
                masks = torch.zeros(0, *images.shape[-2:])
                class_probs = torch.zeros(0, self.config.model.perceiver.num_classes + 1)
            answers.append(
                GroundedAnswer(
                    text=self.tokenizer.decode(tokens, skip_special_tokens=False).strip(),
                    region_tokens=self.tokenizer.convert_ids_to_tokens(token_tensor[positions].tolist()),
                    masks=masks,
                    class_probs=class_probs,
                    generated_tokens=len(tokens),
                )
            )
        return answers
