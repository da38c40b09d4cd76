"""Region tokens inside answer text: find them, check them against the model's vocabulary.

A region token is ``[C<modality>_<code>]`` (codebook grounding) or ``[SEG]`` (the one-token
ablation). Text from a model or a data file may hold a token the loaded model does not have (a
checkpoint with a smaller codebook, a typo in a hand-written file): such a token is dropped with
a warning instead of failing a whole evaluation run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Anything shaped like a region token, known or not; the vocabulary decides which are real.
REGION_TOKEN_RE = re.compile(r"\[C\d+_\d+\]|\[SEG\]")


@dataclass(frozen=True)
class ParsedRegionTokens:
    known: list[str]  # tokens in the vocabulary, in order of appearance (duplicates kept)
    unknown: list[str]  # tokens shaped like region tokens but not in the vocabulary


def find_region_tokens(text: str) -> list[str]:
    """Every region-token-shaped substring, in order of appearance."""
    return REGION_TOKEN_RE.findall(text)


def parse_region_tokens(text: str, vocabulary: Iterable[str] | None, where: str = "") -> ParsedRegionTokens:
    """Split the region tokens of ``text`` into known and unknown; warn once per unknown token.

    ``vocabulary=None`` accepts every well-formed token (used when no model is loaded, e.g. when
    reading a ground-truth file on its own).
    """
    found = find_region_tokens(text)
    if vocabulary is None:
        return ParsedRegionTokens(known=found, unknown=[])
    allowed = set(vocabulary)
    known = [token for token in found if token in allowed]
    unknown = [token for token in found if token not in allowed]
    if unknown:
        prefix = f"{where}: " if where else ""
        logger.warning(
            "%sregion token(s) %s are not in the model vocabulary (%d tokens); ignored",
            prefix,
            ", ".join(sorted(set(unknown))),
            len(allowed),
        )
    return ParsedRegionTokens(known=known, unknown=unknown)


def strip_region_tokens(text: str) -> str:
    """Text without region tokens and without the spaces they leave behind."""
    without = REGION_TOKEN_RE.sub(" ", text)
    without = re.sub(r"\s+([.,;:!?])", r"\1", without)
    return re.sub(r"\s+", " ", without).strip()


def known_token_masks(
    region_tokens: list[str], masks: torch.Tensor, vocabulary: Iterable[str] | None, where: str = ""
) -> tuple[list[str], torch.Tensor, list[str]]:
    """Keep the (token, mask) pairs whose token is in the vocabulary.

    masks [K, H, W] aligned with ``region_tokens`` (K = len(region_tokens)) -> [K', H, W].
    Returns (kept tokens, their masks, dropped unknown tokens); the caller decides how loudly to
    report drops (the runner sums them per benchmark instead of warning once per answer).
    A count mismatch (a model bug, or an answer cut at max_new_tokens between token and mask)
    is warned about and the shorter of the two wins, so scoring never indexes past the end.
    """
    count = len(region_tokens)
    if masks.dim() != 3:
        raise ValueError(f"{where}: predicted masks must be [K, H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] != count:
        logger.warning(
            "%s: %d region tokens but %d masks; scoring the first %d",
            where or "answer",
            count,
            masks.shape[0],
            min(count, masks.shape[0]),
        )
        count = min(count, masks.shape[0])
    allowed = None if vocabulary is None else set(vocabulary)
    keep = [i for i in range(count) if allowed is None or region_tokens[i] in allowed]
    dropped = [region_tokens[i] for i in range(count) if i not in keep]
    if dropped:
        logger.debug("%s: region token(s) %s not in the vocabulary; their masks are ignored", where or "answer", ", ".join(dropped))
    index = torch.tensor(keep, dtype=torch.long)
    kept_masks = masks.index_select(0, index) if keep else masks[:0]
    return [region_tokens[i] for i in keep], kept_masks, dropped


def highlight_spans(text: str) -> list[tuple[str, bool]]:
    """``text`` cut into (piece, is_region_token) runs, for HTML highlighting."""
    pieces: list[tuple[str, bool]] = []
    position = 0
    for match in REGION_TOKEN_RE.finditer(text):
        if match.start() > position:
            pieces.append((text[position : match.start()], False))
        pieces.append((match.group(0), True))
        position = match.end()
    if position < len(text):
        pieces.append((text[position:], False))
    return pieces
