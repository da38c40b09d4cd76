"""The tiny byte-level BPE tokenizer: special tokens, round trip, save/load, determinism."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from medsight.data.tokenizer import (
    ASSISTANT_TOKEN,
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    USER_TOKEN,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "A CT image of the abdomen showing the liver and the kidney.",
    "A tumor is present in the liver, seen as a bright, heterogeneous mass.",
    "Is there a lesion in this image?",
    "yes",
    "no",
    "What imaging modality is this?",
    "An MRI image of the brain showing the brain and the ventricle. No lesion is seen.",
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out_dir = tmp_path_factory.mktemp("tok") / "tokenizer"
    return out_dir, train_tokenizer(CORPUS, vocab_size=400, out_dir=out_dir)


def test_trains_fast_with_requested_vocabulary(tmp_path: Path) -> None:
    start = time.perf_counter()
    tokenizer = train_tokenizer(CORPUS, vocab_size=350, out_dir=tmp_path / "t")
    assert time.perf_counter() - start < 1.0
    assert 261 < len(tokenizer) <= 350


def test_special_tokens_are_single_distinct_ids(trained) -> None:
    _, tokenizer = trained
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    text = f"{USER_TOKEN}{IMAGE_TOKEN}\nIs there a lesion?{ASSISTANT_TOKEN}yes{EOS_TOKEN}"
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    for token in (USER_TOKEN, IMAGE_TOKEN, ASSISTANT_TOKEN, EOS_TOKEN):
        assert encoded.count(tokenizer.convert_tokens_to_ids(token)) == 1
    assert tokenizer.decode(encoded) == text


def test_any_text_round_trips_including_unseen_words(trained) -> None:
    _, tokenizer = trained
    text = "Pneumothorax ✓ größer, 42 mm; ventricle"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer("the liver")["input_ids"]) < len("the liver")


def test_saved_tokenizer_loads_identically(trained) -> None:
    out_dir, tokenizer = trained
    assert (out_dir / "tokenizer.json").is_file()
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")]
    loaded = load_tokenizer(out_dir)
    text = f"{IMAGE_TOKEN}\nA tumor in the liver.{EOS_TOKEN}"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.get_vocab() == tokenizer.get_vocab()


def test_training_is_deterministic(tmp_path: Path) -> None:
    first = train_tokenizer(CORPUS, 400, tmp_path / "a")
    second = train_tokenizer(CORPUS, 400, tmp_path / "b")
    assert first.get_vocab() == second.get_vocab()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, 100, tmp_path / "x")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "  "], 400, tmp_path / "y")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")
