"""Caps on what a user may hand the model: request bytes, image pixels, question length.

One set of limits shared by every entry point that takes user input (the model server today,
``medsight predict`` next), so a file that one of them refuses is refused by the other with the
same words. Each check raises ``InputLimitError`` naming the field, the size seen and the cap,
before any expensive work (decoding pixels, tokenizing, running the model) happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from medsight.data.errors import DataError


class InputLimitError(DataError):
    """An input is larger than the configured cap; the message says which field and by how much."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class InputLimits:
    # 64 MiB: a 4096 x 4096 16-bit DICOM (32 MiB) base64-encoded in a JSON body still fits.
    max_body_bytes: int = 64 * 2**20
    # 50 MP: the largest radiographs (e.g. 43 x 43 cm detectors at 0.1 mm) are ~18 MP; this stays
    # well below what PIL treats as a decompression bomb (~179 MP) and bounds memory per request.
    max_image_pixels: int = 50_000_000
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

    def check_image(self, height: int, width: int, where: str = "image") -> None:
        """Call with the size read from the header, before the pixels are decoded."""
        if height <= 0 or width <= 0:
            raise InputLimitError(where, f"image has no pixels ({height} x {width})")
        if height * width > self.max_image_pixels:
            raise InputLimitError(
                where,
                f"{height} x {width} = {height * width:,} pixels exceeds the limit of {self.max_image_pixels:,}; "
                "downscale the image first",
            )

    def check_question(self, question: str, count_tokens: Callable[[str], int] | None = None, where: str = "question") -> int:
        """Returns the token count (0 without a tokenizer); empty questions are refused too."""
        if not question.strip():
            raise InputLimitError(where, "is empty; ask a question about the image")
        if len(question) > self.max_question_chars:
            raise InputLimitError(
                where, f"{len(question):,} characters exceeds the limit of {self.max_question_chars:,}; ask a shorter question"
            )
        if count_tokens is None:
            return 0
        tokens = count_tokens(question)
        if tokens > self.max_question_tokens:
            raise InputLimitError(
                where, f"{tokens:,} tokens exceeds the limit of {self.max_question_tokens:,}; ask a shorter question"
            )
        return tokens


def _bytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size:,} bytes"
