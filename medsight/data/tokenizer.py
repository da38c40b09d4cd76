"""A tiny byte-level BPE tokenizer for the tiny preset, trained offline on the synthetic corpus.

Byte-level BPE (the Qwen family's scheme) can encode any text, so prompts outside the corpus
still tokenize; the special tokens are registered as single, unsplittable ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medsight.io_utils import atomic_directory

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
IMAGE_TOKEN = "<image>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
# 256 byte symbols plus the special tokens must fit before any merge is learned.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
    )


def train_tokenizer(corpus_lines: Iterable[str], vocab_size: int,
                    out_dir: Path) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``corpus_lines``, save it to ``out_dir`` atomically, return it."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (bytes + special tokens), "
                         f"got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in corpus_lines if line.strip()]
    if not lines:
        raise ValueError("tokenizer corpus is empty")
    backend.train_from_iterator(lines, trainer=trainer)
    tokenizer = _wrap(backend)
    with atomic_directory(Path(out_dir)) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory}: no tokenizer.json (train_tokenizer writes one)")
    return PreTrainedTokenizerFast.from_pretrained(str(directory))
