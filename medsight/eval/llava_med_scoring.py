"""The ``llava-med`` scoring protocol: LLaVA-Med's ``run_eval.py``, the way the paper's tables were scored.

Restated from microsoft/LLaVA-Med (v1.0: ``llava/eval/run_eval.py``, ``eval_metrics/glossary.py``
``normalize_word``, ``eval_metrics/evaluate_metrics.py`` ``calculate_f1score``; the authors ship
the same scoring in ``RegLLM/llava/eval/run_eval.py``). Its quirks are kept on purpose, since
they are what the published numbers mean:

normalisation (applied to the lower-cased text, and once more inside the recall):
  * each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted if the *original* text has
    it next to a space anywhere (or the text has a digit,digit group), else replaced by a space:
    "x-ray" -> "x ray", but "x-ray - left" -> "xray  left";
  * a period not followed by a digit is deleted (joining words: "yes.no" -> "yesno"), at most
    32 of them (the script passes ``re.UNICODE`` where ``re.sub`` takes its count);
  * per word: number words zero..ten and "none" -> digits, articles a/an/the dropped, and the
    VQA contraction table applied ("isnt" -> "isn't"); finally commas are removed.
open questions -> recall = tp / (tp + fn) over word counts, where tp sums the *prediction's*
  counts of shared words (a repeated word counts each time) and fn the reference's counts of
  missed words; 0 when either side is empty or nothing is shared.
closed questions -> if "yes" or "no" occurs anywhere in the normalised prediction (as a
  substring: "nodule" counts), the hit is whether the normalised answer is a substring of it;
  otherwise 0.
"""

from __future__ import annotations

import re
from collections import Counter

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The contracted forms of the VQA table; the table maps each spelling with exactly one apostrophe
# left out (all of it, for one-apostrophe forms) to the form. Its capitalised entries (I'm, ...)
# never match lower-cased text and are omitted; "she's"/"let's" map only to themselves.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock 'ow's'at shan't she'd've should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd "
    "they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's "
    "won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for form in _CONTRACTED:
        places = [i for i, char in enumerate(form) if char == "'"]
        if len(places) == 1:
            table[form.replace("'", "")] = form
        else:
            for i in places:
                table[form[:i] + form[i + 1:]] = form
    table["somebody'd"] = "somebodyd"  # the one entry that runs the other way
    return table


_CONTRACTIONS = _contraction_table()


def normalize(text: str) -> str:
    """LLaVA-Med's answer normalisation of already lower-cased text (see the module docstring)."""
    out = text
    strip_all = bool(_DIGIT_COMMA_DIGIT.search(text))
    for mark in _PUNCTUATION:
        joined = strip_all or (mark + " " in text) or (" " + mark in text)
        out = out.replace(mark, "" if joined else " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBERS.get(word, word) for word in out.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words).replace(",", "")


def prepare(answer: str) -> str:
    """What run_eval.py compares: the lower-cased, normalised answer."""
    return normalize(answer.lower())


def open_recall(prediction: str, ground_truth: str) -> float:
    """run_eval.py's open-question recall (``calculate_f1score``'s recall)."""
    predicted = Counter(normalize(prepare(prediction)).split())
    expected = Counter(normalize(prepare(ground_truth)).split())
    if not predicted or not expected:
        return 0.0
    true_positive = sum(count for word, count in predicted.items() if word in expected)
    false_negative = sum(count for word, count in expected.items() if word not in predicted)
    if true_positive == 0:
        return 0.0
    return true_positive / (true_positive + false_negative)


def closed_hit(prediction: str, ground_truth: str) -> float:
    """run_eval.py's closed-question rule (substring tests on the normalised text)."""
    predicted, expected = prepare(prediction), prepare(ground_truth)
    if "yes" in predicted or "no" in predicted:
        return float(expected in predicted)
    return 0.0
