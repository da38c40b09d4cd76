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
from medsight.data.taxonomy import Taxonomy


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
    config.perceiver_pretrain.epochs = 10
    config.perceiver_pretrain.lr = 2e-3
    config.perceiver_pretrain.batch_size = 16
    config.codebook_pretrain.epochs = 4
    config.codebook_pretrain.lr = 2e-3
    config.codebook_pretrain.batch_size = 16
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
    ds = DeepSpeedConfig(zero_stage=3, bf16=True)
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
            # 2x doubling per layer (24 -> 192). Both counts must match the dataset's
            # taxonomy.json (the stages check): M = 18 is the authors' fine-grained split;
            # num_classes is a placeholder until a release's taxonomy sets it (`medsight import
            # authors` writes the authors' 17 into the imported config).
            perceiver=PerceiverConfig(
                architecture="authors",
                dim=1024,
                num_heads=8,
                head_dim=64,
                ffn_dim=4096,
                num_classes=len(Taxonomy.synthetic().region_classes),
            ),
            codebook=CodebookConfig(architecture="authors", num_modalities=18, codes_per_modality=32, code_dim=64),
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
    config.perceiver_pretrain.batch_size = 32
    config.codebook_pretrain.epochs = 3
    config.codebook_pretrain.lr = 1e-4
    config.v2t_align.epochs = 1
    config.v2t_align.lr = 2e-5
    config.v2t_align.deepspeed = ds
    config.t2v_align.epochs = 3
    config.t2v_align.lr = 5e-4
    config.t2v_align.deepspeed = DeepSpeedConfig(zero_stage=3, bf16=True)
    config.instruct_tune.epochs = 3
    config.instruct_tune.lr = 2e-5
    config.instruct_tune.deepspeed = DeepSpeedConfig(zero_stage=3, bf16=True)
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
