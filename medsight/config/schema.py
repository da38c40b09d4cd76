"""Typed configuration for every MedSIGHT part and stage.

One dataclass per concept; presets (``presets.py``) are plain functions returning a filled
``ExperimentConfig``. Nothing here touches torch, so configs load fast in components.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncoderConfig:
    """Frozen CLIP image encoder (open_clip vision tower)."""

    model_name: str = "medsight-tiny-vit"
    # Directory or file holding open_clip weights; None = random init (tiny preset only).
    weights_path: str | None = None
    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    # Which transformer block feeds the patch tokens (-2 = penultimate, as LLaVA and the authors'
    # training scripts). The authors' released final model was trained with -1 (their eval config
    # says so): import it with `medsight import authors --feature-layer -1` (the default there).
    feature_layer: int = -2
    # Width of CLIP's image-text projection (`visual.proj`, never used for patch tokens); 0 = width.
    # Released checkpoints must match it to load strictly (ViT-L/14-336: 768).
    embed_dim: int = 0
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


PERCEIVER_ARCHITECTURES = ("medsight", "authors")


@dataclass
class PerceiverConfig:
    """Region Perceiver (Sec. 2.2, App. A.1).

    ``architecture``: "medsight" = this project's pre-norm layers with an input projection to
    ``dim`` (the tiny preset's); "authors" = the layer order of the authors' released code
    (medsight/model/authors_perceiver.py): no input projection (``dim`` = encoder width),
    post-norm residual blocks around pre-normed attention/FFN, plain conv adapters, sine
    positions added to the map itself, and LLM region tokens decoded by re-running the perceiver
    with them as initial queries. Both stay selectable by name.
    """

    architecture: str = "medsight"
    num_queries: int = 20
    dim: int = 64
    num_layers: int = 3
    num_heads: int = 4
    # Attention inner width is num_heads * head_dim; 0 = dim / num_heads (inner width = dim).
    # The authors' perceiver: 8 heads of 64 (inner 512) at dim 1024.
    head_dim: int = 0
    ffn_dim: int = 128
    dropout: float = 0.0
    # Upsampling factor of the conv adapter before each layer (one per layer). The paper doubles
    # at every layer; the tiny preset skips the last doubling to stay within CPU minutes.
    upsample_factors: tuple[int, ...] = (2, 2, 2)
    # Ablation: False = one-way decoder (queries attend to image only, no image-to-region step).
    two_way: bool = True
    mask_threshold: float = 0.5
    # Number of region classes (structures + lesion kinds); +1 no-object is added by the head.
    # 0 = from the data's taxonomy (an explicit count that disagrees with it is refused).
    num_classes: int = 0

    @property
    def attention_dim(self) -> int:
        return self.num_heads * self.head_dim if self.head_dim else self.dim


@dataclass
class LossConfig:
    """Segmentation criterion weights. Paper: bce=dice=5; authors' code: all 1.0."""

    bce_weight: float = 5.0
    dice_weight: float = 5.0
    class_weight: float = 1.0
    no_object_weight: float = 0.1
    # Hungarian matching costs.
    match_bce: float = 1.0
    match_dice: float = 1.0
    match_class: float = 1.0


@dataclass
class CodebookConfig:
    """Modality-aware VQ codebook (Sec. 2.3, App. A.2).

    ``architecture``: "medsight" = GELU-MLP projections P_q/P_d, raw codes, masks of quantized
    queries decoded by the perceiver's own heads; "authors" = the released code's variant
    (LayerNorm'd two-layer projections, L2-normalised codes and queries, a linear modality
    predictor, and a separate mask/class head for quantized queries).
    """

    architecture: str = "medsight"
    # 0 = from the data's taxonomy (an explicit count that disagrees with it is refused).
    num_modalities: int = 0
    codes_per_modality: int = 16
    code_dim: int = 32
    commitment: float = 0.25
    # Train a modality classifier on the CLS token so inference works without a label.
    modality_predictor: bool = True


@dataclass
class LLMConfig:
    """Language model. Tiny: random-init Qwen3 built from these dims; full: local weights."""

    backbone: str = "qwen3"  # qwen3 | qwen2 (Qwen2.5 backbone-fairness variant)
    weights_path: str | None = None
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    tokenizer_vocab_size: int = 600
    gradient_checkpointing: bool = False
    # "medsight": <|user|>/<|assistant|> marker tokens (the tiny tokenizer has them);
    # "chat_template": the tokenizer's own chat template (Qwen3's), through apply_chat_template.
    prompt_format: str = "medsight"
    # Placeholder token the visual tokens replace; it must be a single (special) token of the
    # tokenizer. Qwen tokenizers already hold "<|image_pad|>", so no untrained row is added.
    image_token: str = "<image>"
    # System message of the chat template ("" = none); the authors use Qwen's default one.
    system_prompt: str = ""


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    # Ablation: feed only patch tokens to the LLM (no region embeddings).
    region_embeddings: bool = True
    # Ablation: "codebook" (M x K region tokens) or "seg_token" (one [SEG] token).
    grounding: str = "codebook"
    # P_v2t merges each s x s block of patch tokens into one LLM token (Qwen2-VL's merger).
    # 1 = every patch is a token, as in the paper (576 at full scale).
    patch_merge: int = 1
    # Activation inside P_t2v (Linear, act, Linear): "gelu" here, "relu" in the authors' code.
    t2v_activation: str = "gelu"

    @property
    def num_patch_tokens(self) -> int:
        return self.encoder.num_patches // self.patch_merge**2


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    bf16: bool = False
    offload_optimizer: bool = False
    gradient_accumulation_steps: int = 1


@dataclass
class TrainConfig:
    """What every training stage shares: optimisation, checkpoints, guards."""

    epochs: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 8
    warmup_ratio: float = 0.03
    grad_clip: float = 1.0
    seed: int = 0
    # Save a resumable checkpoint every N optimizer steps (and always at the end).
    checkpoint_every: int = 200
    log_every: int = 20
    # DataLoader worker processes per rank that decode images and masks (0 = in the step's process).
    num_workers: int = 0
    # Stop after this many steps (0 = no cap); lets tests and benchmarks bound a stage.
    max_steps: int = 0


@dataclass
class VisionTrainConfig(TrainConfig):
    """Stages 1-2 (DDP): mixed precision and the bounded per-image caches."""

    # bf16 autocast for the forward pass (weights, optimizer and losses stay float32).
    bf16: bool = False
    # MiB of encoder outputs kept per image across epochs, and as much again of decoded image and
    # mask files (0 = decode and encode every step, as at full scale; memory then does not grow).
    feature_cache_mb: int = 0


@dataclass
class PerceiverPretrainConfig(VisionTrainConfig):
    epochs: float = 20.0
    lr: float = 1e-4
    max_masks_per_image: int = 16


@dataclass
class CodebookPretrainConfig(VisionTrainConfig):
    epochs: float = 3.0
    lr: float = 1e-4
    max_masks_per_image: int = 16
    # Codes start from k-means++ over the region queries of the first N training images.
    init_images: int = 4096


@dataclass
class LanguageTrainConfig(TrainConfig):
    """The LLM stages (3-5): DeepSpeed, and the frozen vision side's feature cache."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # MiB of per-image encoder/perceiver features kept between steps, and as much again of decoded
    # image/mask files (0 = recompute and re-decode every step).
    visual_cache_mb: int = 0


@dataclass
class V2TAlignConfig(LanguageTrainConfig):
    epochs: float = 1.0
    lr: float = 2e-5


@dataclass
class GroundingDataConfig:
    """Ground-truth regions -> region tokens (App. C), template or LLM-written."""

    generator: str = "template"  # template | llm (OpenAI-compatible endpoint from env)
    seed: int = 0
    # Stage 4's grounding set: conversations around train images drawn uniformly (paper: 60K).
    t2v_samples: int = 60_000
    # Stage 5's codebook conversations: images drawn uniformly from BiomedParse train (paper: 12K),
    # independently of stage 4's draw.
    instruct_images: int = 12_000
    # Val/test images given grounding questions (val: stage 4-5 validation; test: DiagSeg-style
    # questions for datasets without a benchmark manifest).
    eval_images: int = 1_000


@dataclass
class T2VAlignConfig(LanguageTrainConfig):
    epochs: float = 3.0
    lr: float = 5e-4


@dataclass
class InstructTuneConfig(LanguageTrainConfig):
    epochs: float = 3.0
    lr: float = 2e-5
    # LoRA on the LLM's linear layers instead of full fine-tuning (App. F.4: all linear layers,
    # rank 32); 0 = off. Region-token rows, P_v2t and P_t2v still train in full. The adapters
    # are merged into the saved LLM, so later stages read a plain model.
    lora_rank: int = 0
    lora_alpha: float = 64.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class EvaluateConfig:
    batch_size: int = 16
    max_new_tokens: int = 48
    temperature: float = 0.0  # paper: 0.2 with sampling; 0 = greedy, deterministic tests
    repetition_penalty: float = 1.2
    report_samples: int = 8
    # Which scoring leads the tables: "strict" (whole words, a closed miss counts 0) or
    # "llava-med" (LLaVA-Med's run_eval.py, as the paper's tables). Both are always computed
    # and both appear, labelled, in results.json and the report.
    protocol: str = "strict"


@dataclass
class DataConfig:
    """Synthetic data volume (tiny preset) or real dataset locations (full preset)."""

    source: str = "synthetic"  # synthetic | biomedparse
    image_size: int = 64
    train_images: int = 600
    val_images: int = 100
    test_images: int = 100
    seed: int = 0
    # Label space (medsight/data/taxonomy.py): "" = <data root>/taxonomy.json if the dataset
    # ships one, else the synthetic one; otherwise a taxonomy JSON, relative to the data root.
    taxonomy: str = ""
    # An image with more masks than a segmentation stage's max_masks_per_image: "skip" drops it
    # with one warning (the authors' behaviour; `data prepare` already leaves such images out),
    # "error" stops the stage naming it.
    too_many_masks: str = "skip"
    # The data-check stage fails the run when a release's share of bad entries is over this.
    max_bad_fraction: float = 0.01


@dataclass
class RegisterConfig:
    """The step after evaluation: the model enters the MLflow registry if it clears the gate."""

    # "metric=minimum" over the evaluation's metrics.json, e.g. ("seg_dice=0.5", "closed_accuracy=0.75");
    # empty = register whatever it scores.
    thresholds: tuple[str, ...] = ()
    model_name: str = "medsight"
    # Alias the new version gets (e.g. "staging"); "" = none.
    alias: str = ""


@dataclass
class ExperimentConfig:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    perceiver_pretrain: PerceiverPretrainConfig = field(default_factory=PerceiverPretrainConfig)
    codebook_pretrain: CodebookPretrainConfig = field(default_factory=CodebookPretrainConfig)
    v2t_align: V2TAlignConfig = field(default_factory=V2TAlignConfig)
    grounding_data: GroundingDataConfig = field(default_factory=GroundingDataConfig)
    t2v_align: T2VAlignConfig = field(default_factory=T2VAlignConfig)
    instruct_tune: InstructTuneConfig = field(default_factory=InstructTuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
