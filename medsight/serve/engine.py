"""The serving engine: validated requests in, grounded answers out, many requests per model call.

``prepare`` turns what a client sent (image bytes, question, options) into a ``GroundingRequest``
and refuses bad input with a ``DataError`` naming the field, before the model is involved.
``run_batch`` answers a list of requests that share generation settings in one
``predict_images`` call, the function ``medsight predict`` uses, so a request answered alone
gives exactly the text and masks of ``medsight predict`` on the same file.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import torch

from medsight.data.errors import DataError
from medsight.eval.predict import predict_images
from medsight.eval.visuals import png_bytes, to_pil
from medsight.model.input_limits import InputLimitError, InputLimits
from medsight.serve.image_input import decode_upload
from medsight.serve.regions import MASK_FORMATS, region_results

MAX_NEW_TOKENS_CAP = 256


@dataclass(frozen=True)
class GenerationSettings:
    """Requests are batched only with others that share these (one generate() call)."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    repetition_penalty: float = 1.2


@dataclass
class GroundingRequest:
    image: torch.Tensor  # [3, H, W] in [0, 1]
    question: str
    settings: GenerationSettings
    mask_format: str = "png"
    return_image: bool = False
    prompt_tokens: int = 0


@dataclass
class GroundingResult:
    text: str
    regions: list[dict[str, Any]]
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # False when generation stopped at max_new_tokens
    image_hw: tuple[int, int]
    image_png: str | None = None  # base64 PNG of the decoded (windowed) image, when asked
    extra: dict[str, Any] = field(default_factory=dict)


class GroundingEngine:
    """Owns the loaded model; thread-confined: ``run_batch`` is called from one worker thread."""

    def __init__(self, model, limits: InputLimits, default_settings: GenerationSettings | None = None):
        self.model = model  # MedSightInference (or anything with its interface)
        self.limits = limits
        self.defaults = default_settings or GenerationSettings(
            max_new_tokens=model.config.evaluate.max_new_tokens,
            temperature=model.config.evaluate.temperature,
            repetition_penalty=model.config.evaluate.repetition_penalty,
        )
        self.taxonomy = getattr(model, "taxonomy", None)

    # ------------------------------------------------------------------ validation
    def _count_tokens(self, question: str) -> int:
        return len(self.model.tokenizer.encode("\n" + question, add_special_tokens=False))

    def context_budget(self, max_new_tokens: int) -> int:
        """Question tokens that still fit the LLM context next to the image and the answer."""
        llm = self.model.config.model.llm
        fixed = 2 + self.model.model.num_visual_tokens  # user/assistant markers + visual tokens
        return llm.max_position_embeddings - fixed - max_new_tokens

    def settings(self, max_new_tokens: Any = None, temperature: Any = None) -> GenerationSettings:
        max_new = self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens
        temp = self.defaults.temperature if temperature is None else temperature
        if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS_CAP:
            raise DataError(f"max_new_tokens: must be an integer from 1 to {MAX_NEW_TOKENS_CAP}, got {max_new!r}")
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0.0 <= float(temp) <= 2.0:
            raise DataError(f"temperature: must be a number from 0 to 2, got {temp!r}")
        return GenerationSettings(int(max_new), float(temp), self.defaults.repetition_penalty)

    def prepare(
        self,
        image_bytes: bytes,
        question: Any,
        *,
        mime: str | None = None,
        mask_format: Any = "png",
        settings: GenerationSettings | None = None,
        return_image: bool = False,
        field_names: tuple[str, str] = ("image", "question"),
    ) -> GroundingRequest:
        image_field, question_field = field_names
        if not isinstance(question, str):
            raise DataError(f"{question_field}: must be a string, got {type(question).__name__}")
        if mask_format not in MASK_FORMATS:
            raise DataError(f"mask_format: must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
        settings = settings or self.defaults
        tokens = self.limits.check_question(question, self._count_tokens, question_field)
        budget = self.context_budget(settings.max_new_tokens)
        if tokens > budget:
            raise InputLimitError(
                question_field,
                f"{tokens:,} tokens do not fit the model's context next to the image and a "
                f"{settings.max_new_tokens}-token answer (at most {max(budget, 0):,}); ask a shorter question",
            )
        image = decode_upload(image_bytes, image_field, self.limits, mime)
        return GroundingRequest(image, question, settings, str(mask_format), bool(return_image), tokens)

    # ------------------------------------------------------------------ inference
    def run_batch(self, requests: list[GroundingRequest]) -> list[GroundingResult]:
        """Requests sharing one ``GenerationSettings`` -> results in the same order."""
        if not requests:
            return []
        settings = requests[0].settings
        if any(r.settings != settings for r in requests):
            raise ValueError("run_batch: requests in one batch must share generation settings")
        predictions = predict_images(
            self.model,
            [r.image for r in requests],
            [r.question for r in requests],
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            repetition_penalty=settings.repetition_penalty,
            taxonomy=self.taxonomy,
        )
        results = []
        for request, prediction in zip(requests, predictions):
            image_png = None
            if request.return_image:
                image_png = base64.b64encode(png_bytes(to_pil(request.image))).decode("ascii")
            results.append(
                GroundingResult(
                    text=prediction.text,
                    regions=region_results(prediction, self.taxonomy, request.mask_format),
                    prompt_tokens=request.prompt_tokens,
                    completion_tokens=prediction.generated_tokens,
                    finished=prediction.generated_tokens < settings.max_new_tokens,
                    image_hw=(int(request.image.shape[-2]), int(request.image.shape[-1])),
                    image_png=image_png,
                    extra={"ignored_region_tokens": prediction.ignored_tokens} if prediction.ignored_tokens else {},
                )
            )
        return results
