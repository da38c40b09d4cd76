"""Base weights every later stage starts from: tokenizer, image encoder, LLM.

Tiny preset: a tokenizer trained on the synthetic corpus and random-init encoder/LLM, saved so
every stage (and every machine) sees the same "pretrained" weights. Full preset: imports the
released UniMed-CLIP and Qwen3 weights from the configured local (or DVC-pulled) paths.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from medsight.config.schema import ExperimentConfig
from medsight.data.tokenizer import ASSISTANT_TOKEN, IMAGE_TOKEN, USER_TOKEN, train_tokenizer
from medsight.model.encoder import ImageEncoder
from medsight.model.llm import load_llm, random_init_llm, save_llm
from medsight.train.tracker import Tracker


CHAT_MARKERS = (USER_TOKEN, ASSISTANT_TOKEN, IMAGE_TOKEN)


def _corpus_lines(data_dir: Path) -> list[str]:
    corpus = Path(data_dir) / "corpus.txt"
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus}: tokenizer corpus missing; run synth-data first")
    return corpus.read_text().splitlines()


def _missing_markers(tokenizer, llm_cfg) -> list[str]:
    """Tokens the prompt format needs that a released tokenizer lacks (padded vocab rows usually
    absorb them). The chat-template format uses the tokenizer's own markers and, with Qwen's
    ``<|image_pad|>`` as placeholder, adds nothing; the medsight format adds its three markers."""
    wanted = CHAT_MARKERS if llm_cfg.prompt_format == "medsight" else (llm_cfg.image_token,)
    vocab = tokenizer.get_vocab()
    return [token for token in wanted if token not in vocab]


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    encoder_cfg, llm_cfg = config.model.encoder, config.model.llm
    if encoder_cfg.weights_path:
        encoder = ImageEncoder.from_open_clip_weights(encoder_cfg, Path(encoder_cfg.weights_path))
    else:
        encoder = ImageEncoder.random_init(encoder_cfg, seed=config.data.seed)
    encoder.save(output / "encoder")

    if llm_cfg.weights_path:
        source = Path(llm_cfg.weights_path)
        llm = load_llm(source, llm_cfg)  # validates the checkpoint before it is copied
        from medsight.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(source)
        missing = _missing_markers(tokenizer, llm_cfg)
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        save_llm(llm, output / "llm")
        tokenizer.save_pretrained(str(output / "tokenizer"))
        vocab = len(tokenizer)
    else:
        tokenizer = train_tokenizer(_corpus_lines(inputs["data"]), llm_cfg.tokenizer_vocab_size, output / "tokenizer")
        vocab = len(tokenizer)
        llm = random_init_llm(llm_cfg, vocab_size=vocab, seed=config.data.seed)
        save_llm(llm, output / "llm")
    shutil.rmtree(output / "checkpoints", ignore_errors=True)
    return {
        "vocab_size": float(vocab),
        "llm_parameters": float(sum(p.numel() for p in llm.parameters())),
        "encoder_parameters": float(sum(p.numel() for p in encoder.parameters())),
    }
