"""Answer text normalised for comparison: what the scorers and the data validators both read.

Lower-case words without punctuation, articles or region tokens, number words as digits, so
"Two nodules." and "2 nodules" compare equal wherever answers are checked.
"""

from __future__ import annotations

import re

from medsight.data.region_tokens import strip_region_tokens

_NUMBER_WORDS = {
    "zero": "0", "none": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Contractions split before punctuation is removed, so "isn't" still reads as a "no" answer.
_CONTRACTIONS = {"isn't": "is not", "aren't": "are not", "doesn't": "does not", "don't": "do not",
                 "can't": "can not", "wasn't": "was not", "there's": "there is", "it's": "it is"}


def normalize_answer(text: str) -> str:
    """Lower-case words without punctuation, articles or region tokens; number words as digits."""
    text = strip_region_tokens(text.replace("<image>", " ")).lower()
    for contraction, expansion in _CONTRACTIONS.items():
        text = text.replace(contraction, expansion)
    # Keep decimal points and hyphenated terms inside numbers/words ("0.5", "t2-weighted").
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    text = re.sub(r"[^\w\s.\-]", " ", text)
    text = re.sub(r"(?<!\w)-|-(?!\w)", " ", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    # An answer that is only an article ("A" as an option letter) keeps it rather than vanishing.
    kept = [word for word in words if word not in _ARTICLES]
    return " ".join(kept or words)


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()
