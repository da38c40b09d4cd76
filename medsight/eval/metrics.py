"""Scores for one sample and their aggregation per modality (with the macro average).

Text metrics follow the LLaVA-Med protocol (closed accuracy, open token recall) with two
deliberate differences from its released script: a closed question whose answer misses counts
0 (the script appends nothing for a miss, which inflates accuracy), and matching is by whole
words (the script's substring test finds "no" inside "nodule").

Mask metrics work on probabilities [K, H, W] from the model and boolean ground truth; masks are
compared at the ground-truth resolution, binarised at 0.5.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from medsight.data.answer_text import answer_tokens
from medsight.model.dice import hard_dice_of_probabilities

def _contains_sequence(haystack: list[str], needle: list[str]) -> bool:
    if not needle:
        return False
    width = len(needle)
    return any(haystack[i : i + width] == needle for i in range(len(haystack) - width + 1))


# ---------------------------------------------------------------------------- text scores


def closed_hit(prediction: str, ground_truth: str) -> float:
    """1.0 if the prediction gives the ground-truth closed answer, else 0.0 (a miss is a 0).

    Yes/no questions: the answer word must appear and its opposite must not (a hedge such as
    "yes or no" is a miss). Other closed answers ("left", "CT"): the normalised answer must
    appear as a whole-word sequence.
    """
    predicted = answer_tokens(prediction)
    expected = answer_tokens(ground_truth)
    if not expected or not predicted:
        return 0.0
    if expected in (["yes"], ["no"]):
        opposite = "no" if expected == ["yes"] else "yes"
        return float(expected[0] in predicted and opposite not in predicted)
    return float(_contains_sequence(predicted, expected))


def open_recall(prediction: str, ground_truth: str) -> float:
    """Fraction of distinct ground-truth words found in the prediction (LLaVA-Med recall)."""
    expected = set(answer_tokens(ground_truth))
    if not expected:
        return 0.0
    predicted = set(answer_tokens(prediction))
    return len(expected & predicted) / len(expected)


_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-Z])\)?\s*(?:[.:)\]]|$|\s)"),  # "B", "(B)", "B.", "B: text"
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Za-z])\)?(?![\w])", re.IGNORECASE),
)


def choose_option(prediction: str, options: list[str]) -> int | None:
    """Index of the option a free-text answer picks, or None when it picks none.

    In order: an option letter ("B", "(B)", "the answer is B"); the option text appearing in
    the answer (the longest such option, so "no effusion" beats "effusion"); the option sharing
    the largest fraction of its words with the answer, if that fraction is positive and unique.
    """
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for pattern in _LETTER_PATTERNS:
        match = pattern.search(prediction)
        if match and match.group(1).upper() in letters:
            return letters.index(match.group(1).upper())
    predicted = answer_tokens(prediction)
    option_tokens = [answer_tokens(option) for option in options]
    contained = [i for i, tokens in enumerate(option_tokens) if _contains_sequence(predicted, tokens)]
    if contained:
        return max(contained, key=lambda i: len(option_tokens[i]))
    predicted_set = set(predicted)
    overlaps = [len(set(t) & predicted_set) / len(set(t)) if t else 0.0 for t in option_tokens]
    best = max(overlaps, default=0.0)
    if best > 0 and overlaps.count(best) == 1:
        return overlaps.index(best)
    return None


def mc_hit(prediction: str, options: list[str], answer_index: int) -> float:
    return float(choose_option(prediction, options) == answer_index)


def term_recalled(prediction: str, term: str) -> float:
    """1.0 if every word of ``term`` (e.g. a diagnosis) appears in the prediction."""
    wanted = answer_tokens(term)
    return float(bool(wanted) and set(wanted) <= set(answer_tokens(prediction)))


# ---------------------------------------------------------------------------- mask scores


def dice(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of two [H, W] masks (probabilities or booleans), thresholded at 0.5; both empty -> 1.0.

    The same computation as training validation (``medsight.model.dice.hard_dice``).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"dice: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return float(hard_dice_of_probabilities(prediction[None], target[None])[0])


def resize_probabilities(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] probabilities -> [K, H, W] (bilinear; probabilities, so thresholding comes after)."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.interpolate(masks[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def ordered_dice(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean Dice of the i-th predicted mask against the i-th ground-truth mask.

    predicted [K, h, w] probabilities (masks of the generated region tokens, in order);
    targets [G, H, W] bool (ground-truth masks in the order the answer refers to them).
    A ground-truth mask without a predicted partner scores 0 (unless it is empty: then 1);
    extra predicted masks are not scored here (the runner counts them separately), matching
    stages 4-5, which supervise the masks of an answer's region tokens in order.
    """
    if targets.shape[0] == 0:
        raise ValueError("ordered_dice: no ground-truth masks to score against")
    paired = min(predicted.shape[0], targets.shape[0])
    scores = hard_dice_of_probabilities(predicted[:paired], targets[:paired]).tolist()
    # Unpaired ground truth: an empty prediction against it (1 if it is empty too, else 0).
    scores += [1.0 if not bool(targets[i].any()) else 0.0 for i in range(paired, targets.shape[0])]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------- boxes

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2), normalised to [0, 1] of width/height


def box_from_mask(mask: torch.Tensor, threshold: float = 0.5) -> Box | None:
    """Extent of a [H, W] mask in normalised (x1, y1, x2, y2); None for an empty mask.

    The right/bottom edge is the far side of the last pixel, so a one-pixel mask has an area.
    """
    bits = mask if mask.dtype == torch.bool else mask > threshold
    if not bool(bits.any()):
        return None
    height, width = bits.shape
    rows = torch.nonzero(bits.any(dim=1)).flatten()
    cols = torch.nonzero(bits.any(dim=0)).flatten()
    return (
        float(cols[0]) / width,
        float(rows[0]) / height,
        float(cols[-1] + 1) / width,
        float(rows[-1] + 1) / height,
    )


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - intersection
    return intersection / union if union > 0 else 0.0


def boxes_iou(predicted: list[Box], targets: list[Box]) -> float:
    """Mean over ground-truth boxes of the best IoU any predicted box reaches (0 if none)."""
    if not targets:
        raise ValueError("boxes_iou: no ground-truth boxes to score against")
    return sum(max((box_iou(p, t) for p in predicted), default=0.0) for t in targets) / len(targets)


# ---------------------------------------------------------------------------- aggregation


@dataclass
class MetricSummary:
    """One metric over a benchmark: per-modality means, their macro average, the pooled mean."""

    per_modality: dict[str, float]
    counts: dict[str, int]
    macro: float  # mean of the per-modality means (the paper's "Avg." columns)
    micro: float  # mean over all samples
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoreBook:
    """Collects (modality, score) pairs per metric while a benchmark is being scored."""

    scores: dict[str, list[tuple[str, float]]] = field(default_factory=lambda: defaultdict(list))

    def add(self, metric: str, modality: str, value: float) -> None:
        self.scores[metric].append((modality, float(value)))

    def summary(self) -> dict[str, MetricSummary]:
        return {metric: summarize(pairs) for metric, pairs in self.scores.items()}


def summarize(pairs: list[tuple[str, float]]) -> MetricSummary:
    grouped: dict[str, list[float]] = defaultdict(list)
    for modality, value in pairs:
        grouped[modality].append(value)
    per_modality = {m: sum(v) / len(v) for m, v in sorted(grouped.items())}
    counts = {m: len(v) for m, v in sorted(grouped.items())}
    values = [value for _, value in pairs]
    return MetricSummary(
        per_modality=per_modality,
        counts=counts,
        macro=sum(per_modality.values()) / len(per_modality) if per_modality else float("nan"),
        micro=sum(values) / len(values) if values else float("nan"),
        n=len(values),
    )
