"""Evaluation throughput of the authors'-architecture model at full size, with random weights.

Builds the model the importer produces (UniMed-CLIP ViT-L/14-336, the authors' perceiver at
d = 1024, Qwen3-8B, 18 x 32 region tokens) from the full preset with random weights (nothing to
download), and evaluates it on the synthetic benchmarks (images resized to 336). Random weights
never emit EOS, so every answer runs to max_new_tokens: this is the worst case of the real
model's generation cost; region tokens (which re-run the perceiver per answer) appear at random.

Usage (GPU): python bench/bench_authors_eval.py --device cuda --batch-sizes 1,8,16 --max-new-tokens 512
             python bench/bench_authors_eval.py --scale tiny   (a CPU smoke run at tiny widths)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from medsight.config import apply_overrides, get_preset
from medsight.config.schema import DataConfig
from medsight.data.synthetic import generate_dataset
from medsight.data.taxonomy import Taxonomy
from medsight.eval.benchmarks.manifest import load_manifest
from medsight.eval.runner import GenerationSettings, evaluate_all, peak_memory_mb
from medsight.eval.synthetic_benchmarks import write_synthetic_benchmarks
from medsight.model.encoder import ImageEncoder
from medsight.model.inference import MedSightInference
from medsight.model.llm import random_init_llm
from medsight.model.medsight import MedSight
from medsight.model.perceiver_factory import build_codebook, build_perceiver

TINY = ["model.encoder.image_size=32", "model.encoder.width=64", "model.encoder.layers=2", "model.encoder.heads=4",
        "model.encoder.patch_size=4", "model.encoder.model_name=medsight-bench-tiny-vit", "model.encoder.embed_dim=0",
        "model.perceiver.dim=64", "model.perceiver.num_heads=2", "model.perceiver.head_dim=8", "model.perceiver.ffn_dim=128",
        "model.perceiver.upsample_factors=[2,2,2]", "model.llm.hidden_size=64", "model.llm.num_layers=2", "model.llm.num_heads=4",
        "model.llm.num_kv_heads=2", "model.llm.intermediate_size=128", "model.llm.gradient_checkpointing=false"]


def qwen_like_tokenizer(vocab: int):
    """A byte-level BPE with Qwen's ChatML markers, the image placeholder and the region tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["Is there a tumor in the liver? yes no left right kidney lesion"] * 50, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
                               "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    return tokenizer


def build(scale: str, device: str, dtype: torch.dtype) -> MedSightInference:
    config = get_preset("full")
    config.model.encoder.weights_path = config.model.llm.weights_path = None
    config.model.perceiver.num_classes = 17
    if scale == "tiny":
        config = apply_overrides(config, TINY)
    model = config.model
    tokenizer = qwen_like_tokenizer(600)
    tokenizer.add_tokens([f"[C{m}_{k}]" for m in range(model.codebook.num_modalities) for k in range(model.codebook.codes_per_modality)], special_tokens=True)
    base = len(tokenizer) - model.codebook.num_modalities * model.codebook.codes_per_modality
    with torch.device(device):
        llm = random_init_llm(model.llm, vocab_size=base)
        medsight = MedSight(
            model, ImageEncoder.random_init(model.encoder), build_perceiver(model.encoder.width, model.perceiver),
            build_codebook(model.perceiver.dim, model.codebook, model.encoder.width, model.perceiver.num_classes), llm,
            base_vocab_size=base, image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        )
    return MedSightInference(config, medsight.to(device=device, dtype=dtype), tokenizer, Taxonomy.synthetic())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--images", type=int, default=16, help="synthetic test images (VQA questions are ~6 per image)")
    parser.add_argument("--benchmarks", default="vqa_rad,diagseg")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    model = build(args.scale, args.device, dtype)
    print(f"built in {time.perf_counter() - started:.1f} s; device={args.device} dtype={dtype} scale={args.scale}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate_dataset(data, DataConfig(train_images=0, val_images=0, test_images=args.images, image_size=64, seed=0))
        manifest = write_synthetic_benchmarks(data, Path(tmp) / "bench", Taxonomy.synthetic())
        datasets = load_manifest(manifest, only=args.benchmarks.split(","))
        print("| batch | samples | seconds | samples/s | generated tokens/s | peak memory (MiB) |\n|---:|---:|---:|---:|---:|---:|")
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            settings = GenerationSettings(batch_size=batch, max_new_tokens=args.max_new_tokens, temperature=0.0, repetition_penalty=1.2)
            started = time.perf_counter()
            results = evaluate_all(model, datasets, settings, keep_examples=0, progress=False)
            seconds = time.perf_counter() - started
            samples = sum(len(r.results) for r in results)
            tokens = sum(len(model.tokenizer.encode(s.prediction, add_special_tokens=False)) for r in results for s in r.results)
            print(f"| {batch} | {samples} | {seconds:.1f} | {samples / seconds:.3f} | {tokens / seconds:.1f} | {peak_memory_mb(args.device):.0f} |", flush=True)
    print(json.dumps({"note": "random weights: answers run to max_new_tokens (worst case)"}))


if __name__ == "__main__":
    main()
