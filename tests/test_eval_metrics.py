"""Evaluation metrics against hand-computed values, including the edge cases."""

from __future__ import annotations

import logging

import pytest
import torch

from medsight.data.answer_text import normalize_answer
from medsight.eval import metrics
from medsight.data.region_tokens import (
    find_region_tokens,
    highlight_spans,
    known_token_masks,
    parse_region_tokens,
    strip_region_tokens,
)


# ---------------------------------------------------------------------------- text


def test_normalize_answer():
    assert normalize_answer("The Liver [C0_3]!") == "liver"
    assert normalize_answer("Two nodules, 0.5 cm.") == "2 nodules 0.5 cm"
    assert normalize_answer("<image>\nT2-weighted MRI") == "t2-weighted mri"
    assert normalize_answer("It isn't.") == "it is not"


@pytest.mark.parametrize(
    "prediction, truth, expected",
    [
        ("Yes, there is a tumor.", "yes", 1.0),
        ("no", "No", 1.0),
        ("No.", "yes", 0.0),  # a miss counts 0 (LLaVA-Med's script would not count it at all)
        ("yes or no", "yes", 0.0),  # a hedge is a miss
        ("There is a nodule.", "no", 0.0),  # "no" inside "nodule" is not a "no" answer
        ("", "yes", 0.0),  # empty prediction
        ("The left kidney", "left", 1.0),  # non yes/no closed answer: whole-word match
        ("leftover", "left", 0.0),
    ],
)
def test_closed_hit(prediction, truth, expected):
    assert metrics.closed_hit(prediction, truth) == expected


def test_closed_accuracy_counts_misses_as_zero():
    # 3 closed questions: hit, miss (answered the other way), miss (no yes/no at all) -> 1/3.
    book = metrics.ScoreBook()
    for prediction, truth in (("yes", "yes"), ("no", "yes"), ("a tumor", "no")):
        book.add("closed_accuracy", "CT", metrics.closed_hit(prediction, truth))
    assert book.summary()["closed_accuracy"].micro == pytest.approx(1 / 3)


def test_open_recall_hand_values():
    # GT words {left, lung, nodule}; prediction has "nodule" and "lung" -> 2/3.
    assert metrics.open_recall("A nodule in the lung.", "left lung nodule") == pytest.approx(2 / 3)
    assert metrics.open_recall("", "liver") == 0.0  # empty prediction
    assert metrics.open_recall("liver liver liver", "liver liver") == 1.0  # distinct words
    assert metrics.open_recall("anything", "") == 0.0  # empty ground truth
    assert metrics.open_recall("The tumor [C0_3]", "tumor") == 1.0  # region tokens do not count


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", 1),
        ("(C) effusion", 2),
        ("The answer is A.", 0),
        ("b. edema", 1),
        ("I think it is edema.", 1),  # option text
        ("no effusion here", 3),  # longest contained option wins over "effusion"
        ("completely unrelated", None),
        ("", None),
    ],
)
def test_choose_option(prediction, expected):
    options = ["tumor", "edema", "effusion", "no effusion"]
    assert metrics.choose_option(prediction, options) == expected


def test_mc_hit_and_term_recalled():
    assert metrics.mc_hit("A", ["x", "y"], 0) == 1.0
    assert metrics.mc_hit("nothing", ["x", "y"], 0) == 0.0
    assert metrics.term_recalled("A malignant tumor [C0_2].", "tumor") == 1.0
    assert metrics.term_recalled("A cyst", "tumor") == 0.0
    assert metrics.term_recalled("anything", "") == 0.0


# ---------------------------------------------------------------------------- masks


def _mask(h, w, box=None):
    mask = torch.zeros(h, w, dtype=torch.bool)
    if box:
        y1, y2, x1, x2 = box
        mask[y1:y2, x1:x2] = True
    return mask


def test_dice_hand_values():
    prediction = _mask(4, 4, (0, 2, 0, 2))  # 4 pixels
    target = _mask(4, 4, (0, 2, 0, 1))  # 2 pixels, both inside the prediction
    assert metrics.dice(prediction, target) == pytest.approx(2 * 2 / (4 + 2))
    assert metrics.dice(prediction.float() * 0.4, target) == 0.0  # probabilities below 0.5
    assert metrics.dice(_mask(4, 4), _mask(4, 4)) == 1.0  # empty GT and empty prediction
    assert metrics.dice(_mask(4, 4), target) == 0.0  # empty prediction
    assert metrics.dice(prediction, _mask(4, 4)) == 0.0  # empty GT, something predicted
    with pytest.raises(ValueError, match="differ"):
        metrics.dice(_mask(2, 2), _mask(4, 4))


def test_ordered_dice_several_tokens_and_resizing():
    gt = torch.stack([_mask(8, 8, (0, 4, 0, 4)), _mask(8, 8, (4, 8, 4, 8))])
    # Predictions at half resolution (4x4): first matches GT 0 exactly, second is empty.
    pred = torch.zeros(2, 4, 4)
    pred[0, :2, :2] = 1.0
    assert metrics.ordered_dice(pred, gt) == pytest.approx((1.0 + 0.0) / 2)
    # Only one predicted mask for two GT masks: the missing one scores 0.
    assert metrics.ordered_dice(pred[:1], gt) == pytest.approx(0.5)
    # No prediction at all.
    assert metrics.ordered_dice(torch.zeros(0, 4, 4), gt) == 0.0
    # An extra predicted mask is not scored against anything.
    assert metrics.ordered_dice(torch.cat([pred[:1], pred[:1]]), gt[:1]) == 1.0
    # Empty GT mask with nothing predicted for it: nothing to find, nothing found.
    assert metrics.ordered_dice(torch.zeros(0, 4, 4), _mask(8, 8)[None]) == 1.0
    with pytest.raises(ValueError):
        metrics.ordered_dice(pred, torch.zeros(0, 8, 8, dtype=torch.bool))


def test_boxes_from_masks_and_miou():
    mask = _mask(10, 10, (2, 5, 1, 4))  # rows 2-4, cols 1-3
    assert metrics.box_from_mask(mask) == pytest.approx((0.1, 0.2, 0.4, 0.5))
    assert metrics.box_from_mask(_mask(10, 10)) is None
    a, b = (0.0, 0.0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)
    # intersection 0.0625, union 0.25 + 0.25 - 0.0625
    assert metrics.box_iou(a, b) == pytest.approx(0.0625 / 0.4375)
    assert metrics.box_iou(a, (0.6, 0.6, 0.9, 0.9)) == 0.0
    # Two GT boxes, one prediction matching the first exactly: (1 + 0) / 2.
    assert metrics.boxes_iou([a], [a, (0.6, 0.6, 0.9, 0.9)]) == pytest.approx(0.5)
    assert metrics.boxes_iou([], [a]) == 0.0  # nothing predicted


def test_summary_per_modality_and_macro():
    book = metrics.ScoreBook()
    for modality, value in (("CT", 1.0), ("CT", 0.0), ("CT", 1.0), ("MRI", 0.0)):
        book.add("acc", modality, value)
    summary = book.summary()["acc"]
    assert summary.per_modality == {"CT": pytest.approx(2 / 3), "MRI": 0.0}
    assert summary.counts == {"CT": 3, "MRI": 1}
    assert summary.macro == pytest.approx((2 / 3 + 0.0) / 2)
    assert summary.micro == pytest.approx(2 / 4)
    assert summary.n == 4


# ---------------------------------------------------------------------------- region tokens


def test_region_token_parsing_and_unknown_tokens(caplog):
    text = "A tumor [C0_3] in the liver [C1_2] near [C9_99] and [SEG]."
    assert find_region_tokens(text) == ["[C0_3]", "[C1_2]", "[C9_99]", "[SEG]"]
    with caplog.at_level(logging.WARNING):
        parsed = parse_region_tokens(text, ["[C0_3]", "[C1_2]"], where="sample 7")
    assert parsed.known == ["[C0_3]", "[C1_2]"]
    assert parsed.unknown == ["[C9_99]", "[SEG]"]
    assert "sample 7" in caplog.text and "[C9_99]" in caplog.text
    assert parse_region_tokens(text, None).known == find_region_tokens(text)
    assert strip_region_tokens(text) == "A tumor in the liver near and."
    assert highlight_spans("x [C0_1] y") == [("x ", False), ("[C0_1]", True), (" y", False)]


def test_known_token_masks_drops_unknown_and_mismatch():
    masks = torch.arange(3 * 2 * 2, dtype=torch.float).reshape(3, 2, 2)
    tokens, kept, dropped = known_token_masks(["[C0_1]", "[C7_7]", "[C0_2]"], masks, ["[C0_1]", "[C0_2]"])
    assert tokens == ["[C0_1]", "[C0_2]"] and dropped == ["[C7_7]"]
    assert torch.equal(kept, masks[[0, 2]])
    # More tokens than masks (cut generation): the shorter wins, with no index error.
    tokens, kept, _ = known_token_masks(["[C0_1]", "[C0_2]"], masks[:1], None)
    assert tokens == ["[C0_1]"] and kept.shape == (1, 2, 2)
    # Nothing known at all: an empty [0, H, W] tensor.
    tokens, kept, _ = known_token_masks(["[C5_5]"], masks[:1], ["[C0_1]"])
    assert tokens == [] and kept.shape == (0, 2, 2)
