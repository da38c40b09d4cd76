"""``medsight import authors``: the authors' released checkpoints -> this platform's stage outputs.

Written under ``--out`` (each folder a complete stage output: config.yaml, metrics.json,
modules/*.safetensors + modules/taxonomy.json, stage.json last):

  base-models/         encoder/ (UniMed-CLIP's vision tower, --encoder) and tokenizer/
  perceiver-pretrain/  perceiver                                      (--perceiver)
  codebook-pretrain/   perceiver, codebook                            (+ --codebook)
  v2t-align/           perceiver, codebook, v2t (stage-3 adapter)     (+ --projector)
  instruct-tune/       all modules, t2v, region_tokens, llm/, tokenizer/,
                       modules/region_token_map.json                  (+ --model)

Everything is converted and strictly loaded in memory first; the folder is then written under a
temporary name and swapped in, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

import medsight
from medsight.config.io import save_config
from medsight.config.schema import ExperimentConfig
from medsight.data.taxonomy import Taxonomy
from medsight.importers.authors_keys import PROJECTOR_RULES, apply_rules, codebook_state, perceiver_state
from medsight.io_utils import atomic_directory, atomic_write_json
from medsight.model.bundle import MODULES_DIR, module_file, taxonomy_file
from medsight.model.checkpoint_files import CheckpointError, load_checkpoint_file, strip_prefix, tensors_only
from medsight.model.perceiver_factory import build_codebook, build_perceiver
from medsight.model.projectors import TextToVisionProjector, VisionToTextProjector
from medsight.model.region_vocabulary import RegionTokenEmbeddings
from medsight.model.weights import save_weights

STAGE_FILE = "stage.json"
REGION_TOKEN_MAP = "region_token_map.json"
AUTHORS_HEAD_DIM = 64  # source/regtok/vq_model.py builds the perceiver with dim_head=64, heads=8


@dataclass
class AuthorsFiles:
    perceiver: Path
    codebook: Path | None = None
    projector: Path | None = None
    model: Path | None = None
    encoder: Path | None = None
    taxonomy: Path | None = None


@dataclass
class ImportResult:
    written: dict[str, Path] = field(default_factory=dict)  # stage name -> folder
    ignored: dict[str, str] = field(default_factory=dict)  # source key -> why it was not imported
    notes: list[str] = field(default_factory=list)


def authors_taxonomy() -> Taxonomy:
    """The label space shipped for the released weights (see authors_taxonomy.json for its limits)."""
    text = resources.files("medsight.importers").joinpath("authors_taxonomy.json").read_text()
    return Taxonomy.from_dict(json.loads(text), "medsight/importers/authors_taxonomy.json")


def _trainable_model(path: Path) -> dict[str, torch.Tensor]:
    """vq_train.py checkpoints keep their weights under "model"; plain state dicts load as they are."""
    raw = load_checkpoint_file(path)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw, where = raw["model"], "model"
    elif isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw, where = raw["state_dict"], "state_dict"
    else:
        where = ""
    return strip_prefix(tensors_only(raw, path, where), "module.")


def _sha256(path: Path, known: dict[Path, str] | None = None) -> str:
    """sha256 of a file; ``known`` remembers source files several bundles record."""
    path = Path(path).resolve()
    if known is not None and path in known:
        return known[path]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    if known is not None:
        known[path] = digest.hexdigest()
    return digest.hexdigest()


def write_import_record(directory: Path, stage: str, sources: list[Path], known: dict[Path, str] | None = None) -> None:
    """stage.json of an imported output (written last: its presence marks the folder complete).

    fingerprint = sha256 over (relative path, sha256) of every written file, so later stages that
    take it as input are invalidated exactly when the imported files change.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STAGE_FILE):
        digest.update(str(file.relative_to(directory)).encode())
        digest.update(_sha256(file).encode())
    source_files = sorted({f for s in sources for f in ([s] if s.is_file() else sorted(p for p in s.rglob("*") if p.is_file()))})
    atomic_write_json(directory / STAGE_FILE, {
        "stage": stage,
        "fingerprint": digest.hexdigest(),
        "inputs": {},
        "imported_from": {str(f.resolve()): _sha256(f, known) for f in source_files},
        "medsight_version": medsight.__version__,
    })


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{what}: does not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")
    bad = [k for k, v in state.items() if v.shape != module.state_dict()[k].shape]
    if bad:
        raise CheckpointError(f"{what}: shape mismatch at {bad[0]}")


def _perceiver(files: AuthorsFiles, config: ExperimentConfig, result: ImportResult) -> torch.nn.Module:
    model = _trainable_model(files.perceiver)
    region = {k[len("region_perceiver."):]: v for k, v in model.items() if k.startswith("region_perceiver.")}
    for key in model:
        if not key.startswith("region_perceiver."):
            result.ignored[key] = "not a perceiver weight (the codebook is read from --codebook)"
    # Codebook parts that a stage-2 file would carry under region_perceiver.: not the perceiver's.
    for key in [k for k in region if k.startswith(("to_code", "code_decoder", "quantizer"))]:
        result.ignored[f"region_perceiver.{key}"] = "codebook weight (read from --codebook)"
        del region[key]
    state = perceiver_state(region, str(files.perceiver))
    perceiver_cfg = config.model.perceiver
    perceiver_cfg.architecture = "authors"
    queries = state["query_content"]
    perceiver_cfg.num_queries, perceiver_cfg.dim = queries.shape
    perceiver_cfg.num_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    perceiver_cfg.upsample_factors = (2,) * perceiver_cfg.num_layers
    perceiver_cfg.ffn_dim = state["initial.ffn.fc1.weight"].shape[0]
    inner = state["initial.attn.to_q.weight"].shape[0]
    perceiver_cfg.head_dim = perceiver_cfg.head_dim or AUTHORS_HEAD_DIM
    if inner % perceiver_cfg.head_dim:
        raise CheckpointError(f"{files.perceiver}: attention width {inner} is not a multiple of head_dim {perceiver_cfg.head_dim}")
    perceiver_cfg.num_heads = inner // perceiver_cfg.head_dim
    perceiver_cfg.num_classes = state["class_head.weight"].shape[0] - 1
    config.model.patch_merge = 1  # the released P_v2t reads every patch (576 tokens at 336 px)
    if config.model.encoder.width != perceiver_cfg.dim:
        raise CheckpointError(
            f"{files.perceiver}: perceiver width {perceiver_cfg.dim} must equal model.encoder.width "
            f"({config.model.encoder.width}); pick the matching --preset or --set model.encoder.width"
        )
    perceiver = build_perceiver(config.model.encoder.width, perceiver_cfg)
    _load_strict(perceiver, state, f"{files.perceiver} (perceiver)")
    return perceiver


def _codebook(path: Path, config: ExperimentConfig, result: ImportResult) -> torch.nn.Module:
    mapped = codebook_state(_trainable_model(path), str(path))
    result.ignored.update(mapped.ignored)
    codebook_cfg = config.model.codebook
    codebook_cfg.architecture = "authors"
    codebook_cfg.num_modalities, codebook_cfg.codes_per_modality, codebook_cfg.code_dim = mapped.state["codes"].shape
    codebook_cfg.modality_predictor = "modality_predictor.weight" in mapped.state
    model = config.model
    codebook = build_codebook(model.perceiver.dim, codebook_cfg, model.encoder.width, model.perceiver.num_classes)
    _load_strict(codebook, mapped.state, f"{path} (codebook)")
    return codebook


def _projector(path: Path, config: ExperimentConfig, llm_dim: int) -> torch.nn.Module:
    state = _trainable_model(path)
    mapped = apply_rules({k: v for k, v in state.items()}, PROJECTOR_RULES, f"{path} (stage-3 projector)")
    v2t = VisionToTextProjector(config.model.encoder.width, config.model.perceiver.dim, llm_dim, config.model.patch_merge)
    _load_strict(v2t, mapped, f"{path} (stage-3 projector)")
    return v2t


def _llm_config(config: ExperimentConfig, converted) -> None:
    llm, hf = config.model.llm, converted.llm.config
    llm.backbone = converted.backbone
    llm.weights_path = None
    llm.hidden_size, llm.num_layers = hf.hidden_size, hf.num_hidden_layers
    llm.num_heads, llm.num_kv_heads = hf.num_attention_heads, hf.num_key_value_heads
    llm.intermediate_size = hf.intermediate_size
    # The authors' conventions (RegLLM/llava/eval/chatbot.py): Qwen's ChatML with the default
    # system message, every patch a visual token, P_t2v with ReLU, LLaVA-Med scoring.
    llm.prompt_format, llm.image_token, llm.system_prompt = "chat_template", "<|image_pad|>", "You are a helpful assistant."
    config.model.t2v_activation = "relu"
    config.evaluate.protocol = "llava-med"


def _write_bundle(root: Path, stage: str, config: ExperimentConfig, modules: dict, taxonomy: Taxonomy, sources: list[Path],
                  extra=None, known: dict[Path, str] | None = None) -> Path:
    folder = root / stage
    (folder / MODULES_DIR).mkdir(parents=True, exist_ok=True)
    save_config(config, folder / "config.yaml")
    for name, module in modules.items():
        save_weights(module, module_file(folder, name))
    taxonomy.save(taxonomy_file(folder))
    if extra is not None:
        extra(folder)
    atomic_write_json(folder / "metrics.json", {"imported": 1.0, "parameters": float(sum(
        p.numel() for m in modules.values() for p in m.parameters()))})
    write_import_record(folder, stage, sources, known)
    return folder


def import_authors(files: AuthorsFiles, base_config: ExperimentConfig, out: Path, feature_layer: int = -1) -> ImportResult:
    """Convert and strictly load everything, then write the stage outputs under ``out``."""
    from medsight.importers.authors_llm import convert_final_model

    result = ImportResult()
    config = copy.deepcopy(base_config)
    config.model.encoder.feature_layer = feature_layer
    taxonomy = Taxonomy.load(files.taxonomy) if files.taxonomy else authors_taxonomy()
    perceiver = _perceiver(files, config, result)
    codebook = _codebook(files.codebook, config, result) if files.codebook else None
    if codebook is None:
        config.model.codebook.num_modalities = len(taxonomy.modalities)
    converted = convert_final_model(files.model) if files.model else None
    if converted is not None:
        result.ignored.update(converted.ignored)
        _llm_config(config, converted)
        if codebook is not None and (converted.num_modalities, converted.codes_per_modality) != (
            config.model.codebook.num_modalities, config.model.codebook.codes_per_modality):
            raise CheckpointError(
                f"{files.model}: {converted.num_modalities} x {converted.codes_per_modality} region tokens but the codebook "
                f"has {config.model.codebook.num_modalities} x {config.model.codebook.codes_per_modality} codes"
            )
        config.model.codebook.num_modalities = converted.num_modalities
        config.model.codebook.codes_per_modality = converted.codes_per_modality
    counts = (len(taxonomy.region_classes), len(taxonomy.modalities))
    if counts != (config.model.perceiver.num_classes, config.model.codebook.num_modalities):
        raise CheckpointError(
            f"{taxonomy.source}: {counts[0]} classes and {counts[1]} modalities, but the checkpoints have "
            f"{config.model.perceiver.num_classes} classes and {config.model.codebook.num_modalities} modalities; "
            "pass --taxonomy with the label space they were trained on"
        )
    llm_dim = converted.llm.config.hidden_size if converted else config.model.llm.hidden_size
    projector = _projector(files.projector, config, llm_dim) if files.projector else None
    encoder = None
    if files.encoder is not None:
        from medsight.model.encoder import ImageEncoder

        encoder = ImageEncoder.from_open_clip_weights(config.model.encoder, files.encoder)
        result.notes.append(encoder.load_report.summary())
    config.model.encoder.weights_path = str(files.encoder) if files.encoder else None
    return _write_all(out, files, config, taxonomy, perceiver, codebook, projector, converted, encoder, result)


def _write_all(out, files, config, taxonomy, perceiver, codebook, projector, converted, encoder, result) -> ImportResult:
    known: dict[Path, str] = {}  # source file -> sha256, hashed once for all bundles
    with atomic_directory(Path(out)) as tmp:
        small = {"perceiver": perceiver}
        if encoder is not None:
            def base_extra(folder: Path) -> None:
                encoder.save(folder / "encoder")
                if converted is not None:
                    converted.tokenizer.save_pretrained(str(folder / "tokenizer"))
            sources = [p for p in (files.encoder, files.model) if p is not None]
            result.written["base-models"] = _write_bundle(tmp, "base-models", config, {}, taxonomy, sources, base_extra, known)
        result.written["perceiver-pretrain"] = _write_bundle(tmp, "perceiver-pretrain", config, small, taxonomy, [files.perceiver], known=known)
        if codebook is not None:
            small["codebook"] = codebook
            result.written["codebook-pretrain"] = _write_bundle(tmp, "codebook-pretrain", config, dict(small), taxonomy, [files.perceiver, files.codebook], known=known)
        if projector is not None:
            sources = [p for p in (files.perceiver, files.codebook, files.projector) if p is not None]
            result.written["v2t-align"] = _write_bundle(tmp, "v2t-align", config, {**small, "v2t": projector}, taxonomy, sources, known=known)
        if converted is not None:
            result.written["instruct-tune"] = _write_final(tmp, files, config, taxonomy, small, converted, known)
    result.written = {stage: Path(out) / folder.name for stage, folder in result.written.items()}
    return result


def _write_final(tmp: Path, files: AuthorsFiles, config: ExperimentConfig, taxonomy: Taxonomy, small: dict, converted, known: dict) -> Path:
    model = config.model
    v2t = VisionToTextProjector(model.encoder.width, model.perceiver.dim, converted.llm.config.hidden_size, model.patch_merge)
    _load_strict(v2t, converted.v2t, f"{files.model} (P_v2t)")
    t2v = TextToVisionProjector(converted.llm.config.hidden_size, model.perceiver.dim, "relu")
    _load_strict(t2v, converted.t2v, f"{files.model} (P_t2v)")
    rows = RegionTokenEmbeddings(len(converted.name_map), converted.llm.config.hidden_size)
    _load_strict(rows, converted.region_rows, f"{files.model} (region-token rows)")

    def final_extra(folder: Path) -> None:
        converted.llm.save_pretrained(str(folder / "llm"), safe_serialization=True)
        converted.tokenizer.save_pretrained(str(folder / "tokenizer"))
        atomic_write_json(folder / MODULES_DIR / REGION_TOKEN_MAP, {
            "note": "the authors' region tokens [M{m}_{k}] are this platform's [C{m}_{k}], at the same token ids",
            "authors_to_platform": converted.name_map,
            "token_ids": converted.token_ids,
        })

    sources = [p for p in (files.perceiver, files.codebook, files.model) if p is not None]
    return _write_bundle(tmp, "instruct-tune", config, {**small, "v2t": v2t, "t2v": t2v, "region_tokens": rows}, taxonomy, sources, final_extra, known)
