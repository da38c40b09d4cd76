"""Presets as functions: the same code runs both, only these numbers differ."""

from __future__ import annotations

from collections.abc import Callable

from medsight.config.schema import (
    CodebookConfig,
    DataConfig,
    DeepSpeedConfig,
    EncoderConfig,
    ExperimentConfig,
    LLMConfig,
    LossConfig,
    ModelConfig,
    PerceiverConfig,
)
from medsight.data.taxonomy import FROM_DATA, Taxonomy


def tiny() -> ExperimentConfig:
    """CPU, offline, minutes: random-init tiny ViT and Qwen3, synthetic data."""
    synthetic = Taxonomy.synthetic()
    config = ExperimentConfig(
        preset="tiny",
        model=ModelConfig(
            # 4-px patches (a 16x16 grid): with 8-px ones (8x8) the frozen random ViT blurred
            # CT/MRI lesions a few pixels across into their organ, and the class head told MRI
            # lesion images from normal ones at chance (held-out AUC 0.49; 0.87 with 4 px).
            encoder=EncoderConfig(patch_size=4),
            # d=32, the 16x16 grid kept for layer 1, then one doubling (I_r at 32x32, upsampled to
            # the 64x64 masks): a quarter of the paper-shaped perceiver's FLOPs, held-out Dice ~0.93.
            perceiver=PerceiverConfig(
                num_classes=len(synthetic.region_classes), dim=32, ffn_dim=64, upsample_factors=(1, 2, 1)
            ),
            codebook=CodebookConfig(num_modalities=len(synthetic.modalities), codes_per_modality=32),
            llm=LLMConfig(),
            loss=LossConfig(),
            # 4x4 patches merged into one token: 16 patch tokens + 20 region tokens instead of
            # 256 + 20, since the LLM stages are compute-bound on visual tokens on 2 cores.
            patch_merge=4,
        ),
        data=DataConfig(),
    )
    # Tiny stages see a small synthetic set, so they need more passes and larger steps
    # than the paper's schedule over 250K+ images.
    # The class head needs the longer schedule: at 4 epochs masks are good (Dice ~0.87) but
    # lesion queries are barely told apart from no-object ones, and the LLM cannot learn
    # lesion presence from region tokens that do not carry it.
    # The synthetic release plants a few bad rows on purpose (a missing image, as in PubMedVision);
    # on the small sets tests use, those are several percent of a release.
    config.data.max_bad_fraction = 0.1
    config.perceiver_pretrain.epochs = 10
    config.perceiver_pretrain.lr = 2e-3
    config.perceiver_pretrain.batch_size = 16
    config.codebook_pretrain.epochs = 4
    config.codebook_pretrain.lr = 2e-3
    config.codebook_pretrain.batch_size = 16
    # The frozen encoder's outputs and the decoded files of the 800 images (~130 MiB) are kept
    # across the many epochs; decoding and encoding every step made stage 1 ~20% slower.
    config.perceiver_pretrain.feature_cache_mb = 256
    config.codebook_pretrain.feature_cache_mb = 256
    config.v2t_align.epochs = 1
    config.v2t_align.lr = 2e-3
    config.v2t_align.batch_size = 16
    config.t2v_align.epochs = 1
    config.t2v_align.lr = 2e-3
    config.t2v_align.batch_size = 16
    config.instruct_tune.epochs = 4
    config.instruct_tune.lr = 1e-3
    config.instruct_tune.batch_size = 16
    # ~130 KiB per image here (pixel features 32x32x32 dominate): the whole tiny set fits.
    for stage in (config.v2t_align, config.t2v_align, config.instruct_tune):
        stage.visual_cache_mb = 1024
    return config


def full() -> ExperimentConfig:
    """Paper scale: UniMed-CLIP ViT-L/14-336 + Qwen3-8B on H100s; weights from local paths."""
    config = ExperimentConfig(
        preset="full",
        model=ModelConfig(
            # UniMed-CLIP's official release: the ViT is taken out of the combined checkpoint
            # (a BiomedBERT text tower sits beside it and is ignored).
            encoder=EncoderConfig(
                model_name="ViT-L-14-336-quickgelu",
                weights_path="models/unimed-clip/unimed_clip_vit_l14_base_text_encoder.pt",
                image_size=336,
                patch_size=14,
                width=1024,
                layers=24,
                heads=16,
                embed_dim=768,
            ),
            # The authors' perceiver: width 1024 (= the encoder's), 8 heads of 64, FFN x4, one
            # 2x doubling per layer (24 -> 192). Class and modality counts come from the prepared
            # release's taxonomy.json (0 = from the data): with the shipped biomedparse-18
            # template that is M = 18 sub-codebooks (App. D) and the authors' 17 classes.
            perceiver=PerceiverConfig(
                architecture="authors",
                dim=1024,
                num_heads=8,
                head_dim=64,
                ffn_dim=4096,
                num_classes=FROM_DATA,
            ),
            codebook=CodebookConfig(architecture="authors", num_modalities=FROM_DATA, codes_per_modality=32, code_dim=64),
            llm=LLMConfig(
                backbone="qwen3",
                weights_path="models/Qwen3-8B",
                hidden_size=4096,
                num_layers=36,
                num_heads=32,
                num_kv_heads=8,
                intermediate_size=12288,
                max_position_embeddings=4096,
                gradient_checkpointing=True,
                # Qwen's own ChatML template and image placeholder: no new, untrained rows.
                prompt_format="chat_template",
                image_token="<|image_pad|>",
                system_prompt="You are a helpful assistant.",
            ),
            loss=LossConfig(bce_weight=5.0, dice_weight=5.0),
            t2v_activation="relu",
        ),
        data=DataConfig(source="biomedparse", image_size=336),
    )
    config.perceiver_pretrain.epochs = 20
    config.perceiver_pretrain.lr = 1e-4
    config.codebook_pretrain.epochs = 3
    config.codebook_pretrain.lr = 1e-4
    # Stages 1-2 (DDP): 32 images per GPU in bf16 autocast (~17 GiB of activations, BENCHMARKS.md's
    # memory plan); workers decode PNGs while the GPU trains (12 host cores per GPU).
    for stage in (config.perceiver_pretrain, config.codebook_pretrain):
        stage.batch_size = 32
        stage.bf16 = True
        stage.num_workers = 8
    config.v2t_align.epochs = 1
    config.v2t_align.lr = 2e-5
    config.t2v_align.epochs = 3
    config.t2v_align.lr = 5e-4
    config.instruct_tune.epochs = 3
    config.instruct_tune.lr = 2e-5
    # Stages 3-5: ZeRO-3 in bf16 with gradient checkpointing. Micro-batches sized so the largest
    # stage fits 4 x H100 80 GB (memory plan in BENCHMARKS.md): 8 sequences per GPU while the LLM
    # is frozen, 4 when all 8.2B parameters train; accumulation makes the global batch 64 on
    # 4 GPUs and 128 on 8.
    for stage, micro, accumulation in ((config.v2t_align, 8, 2), (config.t2v_align, 8, 2),
                                       (config.instruct_tune, 4, 4)):
        stage.batch_size = micro
        stage.num_workers = 4
        stage.deepspeed = DeepSpeedConfig(zero_stage=3, bf16=True, gradient_accumulation_steps=accumulation)
    config.evaluate.temperature = 0.2
    # The authors generate up to 512 tokens: long answers and DiagSeg's region tokens fit.
    config.evaluate.max_new_tokens = 512
    config.evaluate.protocol = "llava-med"
    return config


def full_qwen25() -> ExperimentConfig:
    """Backbone-fairness variant: Qwen2.5-7B instead of Qwen3-8B (App. F.6)."""
    config = full()
    config.preset = "full-qwen2.5"
    config.model.llm = LLMConfig(
        backbone="qwen2",
        weights_path="models/Qwen2.5-7B-Instruct",
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        max_position_embeddings=4096,
        gradient_checkpointing=True,
        prompt_format="chat_template",
        image_token="<|image_pad|>",
        system_prompt="You are a helpful assistant.",
    )
    return config


PRESETS: dict[str, Callable[[], ExperimentConfig]] = {
    "tiny": tiny,
    "full": full,
    "full-qwen2.5": full_qwen25,
}


def get_preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()
