"""The authors' final model folder -> a plain Hugging Face LLM, our tokenizer, P_v2t, P_t2v, region rows.

Their folder (``medsight_full_instruct``) is a Hugging Face save of ``RegSegForCausalLM``: Qwen3
weights under the usual names, ``model.mm_projector.{0,2}`` (P_v2t), ``model.token_projection.{0,2}``
(P_t2v, Linear-ReLU-Linear), and the 18 x 32 region tokens ``[M{m}_{k}]`` added to the tokenizer
right after Qwen's vocabulary, their rows inside ``embed_tokens``/``lm_head``. Here those rows
move into ``RegionTokenEmbeddings`` and the tokens are renamed ``[C{m}_{k}]`` at the same ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from medsight.importers.authors_keys import MODEL_EXTRA_IGNORED, PROJECTOR_RULES, T2V_RULES, apply_rules
from medsight.model.checkpoint_files import CheckpointError
from medsight.model.region_vocabulary import token_name

AUTHORS_TOKEN = re.compile(r"\[M(\d+)_(\d+)\]")
_LLM_KEY = re.compile(r"model\.(embed_tokens|layers\.\d+\.[\w.]+|norm)\.weight|lm_head\.weight")
_BACKBONES = {"qwen3": (Qwen3Config, Qwen3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@dataclass
class ConvertedModel:
    llm: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    backbone: str
    v2t: dict[str, torch.Tensor]  # VisionToTextProjector keys (mlp.*)
    t2v: dict[str, torch.Tensor]  # TextToVisionProjector keys (mlp.*)
    region_rows: dict[str, torch.Tensor]  # RegionTokenEmbeddings keys
    num_modalities: int
    codes_per_modality: int
    name_map: dict[str, str]  # "[M0_3]" -> "[C0_3]"
    token_ids: dict[str, int]  # platform name -> id (the same id as the authors')
    ignored: dict[str, str] = field(default_factory=dict)


def read_model_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors shards (the release is safetensors)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files; pass the folder of the final model (medsight_full_instruct)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                state[key] = handle.get_tensor(key)
    return state


def _hf_config(folder: Path):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the final model folder holds a Hugging Face config.json")
    raw = json.loads(path.read_text())
    kind = " ".join([str(raw.get("model_type", ""))] + [str(a) for a in raw.get("architectures", [])]).lower()
    backbone = "qwen2" if "qwen2" in kind else "qwen3"
    config_cls, _ = _BACKBONES[backbone]
    # Keep the LLM's own fields; LLaVA's mm_* and training flags are not part of the LLM.
    allowed = set(config_cls().to_dict()) | {"rope_theta", "rope_scaling"}
    kept = {key: value for key, value in raw.items() if key in allowed and key not in ("model_type", "architectures")}
    return config_cls.from_dict(kept), backbone


def _split_authors_tokens(tokenizer_dir: Path) -> tuple[PreTrainedTokenizerFast, dict[str, str], dict[str, int]]:
    """Rename ``[M{m}_{k}]`` to ``[C{m}_{k}]`` in place (same ids) -> (tokenizer, name map, ids)."""
    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{tokenizer_file}: missing; the final model folder ships its tokenizer")
    original = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    data = json.loads(tokenizer_file.read_text())
    name_map: dict[str, str] = {}
    for entry in data.get("added_tokens", []):
        match = AUTHORS_TOKEN.fullmatch(entry["content"])
        if match:
            new = token_name(int(match.group(1)), int(match.group(2)))
            name_map[entry["content"]] = new
            entry.update(content=new, special=True, normalized=False)
    if not name_map:
        raise CheckpointError(f"{tokenizer_file}: no [M<m>_<k>] region tokens; is this the segmentation-trained final model?")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)),
        eos_token=original.eos_token,
        pad_token=original.pad_token if original.pad_token is not None else original.eos_token,
    )
    tokenizer.chat_template = original.chat_template
    ids = {new: tokenizer.convert_tokens_to_ids(new) for new in name_map.values()}
    return tokenizer, name_map, ids


def _grid(name_map: dict[str, str], where: Path) -> tuple[int, int, list[str]]:
    """(M, K, authors' names in (m, k) order); the tokens must form a full M x K grid."""
    pairs = sorted((int(m), int(k)) for m, k in (AUTHORS_TOKEN.fullmatch(n).groups() for n in name_map))
    modalities = max(m for m, _ in pairs) + 1
    codes = max(k for _, k in pairs) + 1
    if len(pairs) != modalities * codes:
        raise CheckpointError(f"{where}: region tokens do not form a full {modalities} x {codes} grid ({len(pairs)} tokens)")
    return modalities, codes, [f"[M{m}_{k}]" for m, k in pairs]


def _region_rows(state: dict[str, torch.Tensor], names: list[str], name_map: dict, ids: dict, folder: Path) -> dict[str, torch.Tensor]:
    """Input/output rows of the region tokens, in (m, k) order."""
    order = [ids[name_map[name]] for name in names]
    if "model.embed_tokens.base_emb.weight" in state:  # unmerged SplitEmbedding layout
        inputs = state.pop("model.embed_tokens.codebook_emb.weight")
        state["model.embed_tokens.weight"] = state.pop("model.embed_tokens.base_emb.weight")
    else:
        inputs = state["model.embed_tokens.weight"][order]
    lm_head = state.get("lm_head.weight")
    if lm_head is None or lm_head.shape[0] <= max(order):
        raise CheckpointError(f"{folder}: lm_head.weight is missing or has fewer rows than the region token ids")
    return {"input_rows": inputs.clone(), "output_rows": lm_head[order].clone()}


def convert_final_model(folder: Path) -> ConvertedModel:
    folder = Path(folder)
    state = read_model_folder(folder)
    hf_config, backbone = _hf_config(folder)
    tokenizer, name_map, ids = _split_authors_tokens(folder)
    modalities, codes, names = _grid(name_map, folder)
    base_size = min(ids.values())
    if sorted(ids.values()) != list(range(base_size, base_size + len(ids))) or base_size + len(ids) != len(tokenizer):
        raise CheckpointError(f"{folder}: the region tokens are not the last {len(ids)} ids of the tokenizer")
    region_rows = _region_rows(state, names, name_map, ids, folder)
    ignored: dict[str, str] = {}
    extras = {key: state.pop(key) for key in list(state) if not _LLM_KEY.fullmatch(key)}
    v2t = apply_rules({k: v for k, v in extras.items() if k.startswith("model.mm_projector.")}, PROJECTOR_RULES, f"{folder} (P_v2t)")
    t2v = apply_rules({k: v for k, v in extras.items() if k.startswith("model.token_projection.")}, T2V_RULES, f"{folder} (P_t2v)")
    if not v2t or not t2v:
        raise CheckpointError(f"{folder}: model.mm_projector.* and model.token_projection.* must both be present")
    for key in extras:
        if key.startswith(("model.mm_projector.", "model.token_projection.")):
            continue
        reason = next((why for prefix, why in MODEL_EXTRA_IGNORED.items() if re.match(prefix, key)), None)
        if reason is None:
            raise CheckpointError(f"{folder}: key {key!r} is neither the LLM nor a known MedSIGHT module; not importing a model this importer does not understand")
        ignored[key] = reason
    # Region rows now live in RegionTokenEmbeddings: the LLM keeps the base vocabulary only,
    # padded to a multiple of 64 rows with zeros (never read: ids >= base go to the region rows).
    rows = -(-base_size // 64) * 64
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        matrix = state[key]
        kept = matrix.new_zeros((rows, matrix.shape[1]))
        kept[: min(base_size, matrix.shape[0])] = matrix[:base_size]
        state[key] = kept
    hf_config.vocab_size = rows
    _, model_cls = _BACKBONES[backbone]
    with torch.device("meta"):
        llm = model_cls(hf_config)
    missing, unexpected = llm.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: the LLM weights do not fit {model_cls.__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return ConvertedModel(
        llm=llm, tokenizer=tokenizer, backbone=backbone, v2t=v2t, t2v=t2v, region_rows=region_rows,
        num_modalities=modalities, codes_per_modality=codes, name_map=name_map, token_ids=ids, ignored=ignored,
    )


def translate_region_tokens(text: str, name_map: dict[str, str]) -> str:
    """Authors' ``[M3_16]`` -> this platform's ``[C3_16]`` (or back, with the inverted map)."""
    return re.sub(r"\[[MC]\d+_\d+\]", lambda match: name_map.get(match.group(0), match.group(0)), text)
