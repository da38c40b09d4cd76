"""Caps on what a user may hand the model: request bytes, image pixels, question length.

An 8000 x 8000 PNG is 2 MB on disk and 768 MB as a float image; a 100,000-character question is
tens of thousands of tokens against a few hundred positions. One set of limits serves every
entry point that takes user input (``medsight predict``, the model server), so both refuse the
same input with the same words. Each check raises ``InputLimitError`` naming the input, its size
and the cap, before any expensive work (decoding pixels, tokenizing, running the model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medsight.data.errors import DataError

# 25 megapixels: a 5000 x 5000 scan. The largest radiographs (43 x 43 cm detectors at 0.1 mm) are
# ~18 MP; masks are decoded at the model's resolution whatever the image size, so the cap bounds
# the image itself and its full-resolution overlays (~100 MB each at this size).
DEFAULT_MAX_PIXELS = 25_000_000


class InputLimitError(DataError):
    """An input is larger than its cap; the message says which input, how large, and the cap."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class InputLimits:
    # 64 MiB: a 4096 x 4096 16-bit DICOM (32 MiB) base64-encoded in a JSON body still fits.
    max_body_bytes: int = 64 * 2**20
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # Characters are checked first (cheap, before the tokenizer sees a pathological string).
    max_question_chars: int = 4_000
    max_question_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_pixels", "max_question_chars", "max_question_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"input limit {name} must be positive, got {getattr(self, name)}")

    def check_body(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise InputLimitError(
                "request body", f"{_bytes(size)} exceeds the limit of {_bytes(self.max_body_bytes)}; send a smaller image"
            )

    def check_image(self, height: int, width: int, where: str = "image", raise_with: str = "") -> None:
        """Call with the size read from the header, before the pixels are decoded."""
        if height <= 0 or width <= 0:
            raise InputLimitError(where, f"image has no pixels ({width} x {height})")
        if height * width > self.max_image_pixels:
            hint = f", or raise the cap with {raise_with}" if raise_with else ""
            raise InputLimitError(
                where,
                f"{width} x {height} image = {height * width:,} pixels exceeds the limit of "
                f"{self.max_image_pixels:,}; downscale it{hint}",
            )

    def check_question(self, question: str, count_tokens: Callable[[str], int] | None = None, where: str = "question",
                       room: int | None = None) -> int:
        """Returns the token count (0 without a tokenizer); empty questions are refused too.

        ``room``: the tokens left for the question in this model's context (``question_token_limit``),
        when that is tighter than ``max_question_tokens``.
        """
        if not question.strip():
            raise InputLimitError(where, "is empty; ask a question about the image")
        if len(question) > self.max_question_chars:
            raise InputLimitError(
                where, f"{len(question):,} characters exceeds the limit of {self.max_question_chars:,}; ask a shorter question"
            )
        if count_tokens is None:
            return 0
        limit = self.max_question_tokens if room is None else min(room, self.max_question_tokens)
        if limit <= 0:
            raise InputLimitError(
                where, "no room for a question: the image tokens and the answer length already fill the model's "
                "context; lower --max-new-tokens"
            )
        tokens = count_tokens(question)
        if tokens > limit:
            raise InputLimitError(
                where, f"{tokens:,} tokens exceeds the limit of {limit:,} (the model's context minus the image "
                "tokens and the answer length); ask a shorter question"
            )
        return tokens


def question_token_limit(max_positions: int, visual_tokens: int, prompt_overhead: int, max_new_tokens: int) -> int:
    """How many question tokens fit: the context minus image tokens, chat markers and the answer."""
    return max_positions - visual_tokens - prompt_overhead - max_new_tokens


def _bytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size:,} bytes"
