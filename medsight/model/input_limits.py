"""Caps on what one request may hand the model, checked before anything large is decoded.

An 8000 x 8000 PNG is 2 MB on disk and 768 MB as a float image; a 100,000-character question is
tens of thousands of tokens against a few hundred positions. Both are refused with a message that
names the input, its size, the cap and how to raise it, instead of exhausting memory or
answering garbage. Pure functions, so ``medsight predict`` and a server apply the same rules.
"""

from __future__ import annotations

# 25 megapixels: a 5000 x 5000 scan. Masks are decoded at the model's resolution whatever the
# image size; the cap bounds the image itself and its full-resolution overlays (~300 MB each).
DEFAULT_MAX_PIXELS = 25_000_000


class InputTooLargeError(ValueError):
    """An input exceeds a cap; the message names it, its size and the cap."""


def check_image_size(width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS, where: str = "image",
                     raise_with: str = "--max-pixels") -> None:
    """Refuse an image of more than ``max_pixels`` pixels (read from its header, before decoding)."""
    if width <= 0 or height <= 0:
        raise InputTooLargeError(f"{where}: image has no pixels ({width} x {height})")
    pixels = width * height
    if pixels > max_pixels:
        raise InputTooLargeError(
            f"{where}: image is {width} x {height} = {pixels / 1e6:.1f} megapixels, over the cap of "
            f"{max_pixels / 1e6:.1f}; downscale it, or raise the cap with {raise_with}"
        )


def question_token_limit(max_positions: int, visual_tokens: int, prompt_overhead: int, max_new_tokens: int) -> int:
    """How many question tokens fit: the context minus image tokens, chat markers and the answer."""
    return max_positions - visual_tokens - prompt_overhead - max_new_tokens


def check_question_tokens(count: int, limit: int, where: str = "question") -> None:
    """Refuse a question of more than ``limit`` tokens (see ``question_token_limit``)."""
    if limit <= 0:
        raise InputTooLargeError(
            f"{where}: no room for a question: the image tokens and the answer length already fill the "
            "model's context; lower --max-new-tokens"
        )
    if count > limit:
        raise InputTooLargeError(
            f"{where}: {count} tokens, but the model has room for {limit} (its context minus the image "
            "tokens and --max-new-tokens); shorten the question"
        )
