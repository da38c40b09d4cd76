"""Build the grounding data (App. C): each ground-truth region gets the region token of the
quantized query Hungarian-matched to it, and conversations are written around those tokens.

Outputs (paths inside are relative to the dataset root, so the data can move between machines):
  conversations/{train,val,test}.json   LLaVA conversations with ``mask_files`` in token order
  diagseg_test.json                      diagnosis-then-segment questions (lesion images)
  region_codes/{split}.json              the extracted codes per region (for inspection / LLM generators)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medsight.config.schema import ExperimentConfig
from medsight.data.biomedparse import SegmentationRecord
from medsight.data.phrasing import stable_choice
from medsight.data.taxonomy import Taxonomy
from medsight.io_utils import atomic_write_json
from medsight.model.matcher import HungarianMatcher
from medsight.model.region_vocabulary import RegionVocabulary
from medsight.model.bundle import find_modules, load_encoder, load_module, new_codebook, new_perceiver, stage_taxonomy
from medsight.stages.segmentation_data import SegmentationSplit, encode_split, iterate_batches, load_split
from medsight.train.tracker import Tracker

SPLITS = ("train", "val", "test")


@dataclass
class CodedRegion:
    class_name: str
    mask_file: str  # relative to the dataset root
    token: str
    host: str | None  # structure containing a lesion, by mask overlap


@torch.no_grad()
def extract_region_tokens(
    split: SegmentationSplit, perceiver, codebook, matcher: HungarianMatcher, vocabulary: RegionVocabulary
) -> list[list[str]]:
    """Per image, per ground-truth region (record order): the token of its matched quantized query."""
    tokens: list[list[str]] = []
    names = vocabulary.names
    for batch in iterate_batches(split, list(range(len(split))), 64):
        out = perceiver(batch["patch_tokens"])
        quantized = codebook(out.queries, batch["modality"])
        masks, classes = codebook.decode(perceiver, quantized.quantized, out.pixel_features)
        for b, (query_index, target_index) in enumerate(matcher(masks, classes, batch["masks"], batch["labels"])):
            per_region = [""] * len(target_index)
            modality = int(batch["modality"][b])
            for q, t in zip(query_index.tolist(), target_index.tolist()):
                per_region[t] = names[vocabulary.index(modality, int(quantized.indices[b, q]))]
            tokens.append(per_region)
    return tokens


def _host_structure(lesion: torch.Tensor, structures: list[tuple[str, torch.Tensor]]) -> str | None:
    best, best_overlap = None, 0.0
    for name, mask in structures:
        overlap = float((lesion * mask).sum())
        if overlap > best_overlap:
            best, best_overlap = name, overlap
    return best


def coded_regions(
    record: SegmentationRecord, masks: torch.Tensor, tokens: list[str], data_root: Path, taxonomy: Taxonomy
) -> list[CodedRegion]:
    structures = [
        (region.class_name, masks[i]) for i, region in enumerate(record.regions) if not taxonomy.is_lesion(region.class_name)
    ]
    coded = []
    for i, region in enumerate(record.regions):
        is_lesion = taxonomy.is_lesion(region.class_name)
        coded.append(
            CodedRegion(
                class_name=region.class_name,
                mask_file=str(Path(region.mask_path).resolve().relative_to(data_root.resolve())),
                token=tokens[i],
                host=_host_structure(masks[i], structures) if is_lesion else None,
            )
        )
    return coded


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# Phrasings of each request. The first is canonical (val/test, so evaluation questions stay fixed
# across runs); training draws among all, so the model learns the request rather than one
# sentence (a tiny LLM trained on a single wording answers "yes" to an unseen one).
SEGMENT_REQUESTS = (
    "Please segment the {name}.",
    "Segment the {name}.",
    "Can you segment the {name} in the image?",
    "Show me the {name} and give its mask.",
    "Where is the {name}? Outline it.",
    "Please outline the {name} in this scan.",
)
ABNORMALITY_REQUESTS = (
    "Is there an abnormality in this {modality} image? If so, segment it.",
    "Does this {modality} image show a lesion? Segment it if present.",
    "Find any abnormal region in this image and segment it.",
    "Is anything abnormal here? If yes, outline it.",
)
ALL_STRUCTURES_REQUESTS = (
    "Segment all visible structures.",
    "Please segment every structure in this image.",
    "Outline each structure you can see.",
)


def _phrasing(options: tuple[str, ...], key: str, seed: int | None) -> str:
    """The canonical wording when ``seed`` is None (val/test), else a stable per-request choice."""
    return options[0] if seed is None else stable_choice(options, key, seed)


def template_conversations(
    record: SegmentationRecord, regions: list[CodedRegion], image: str, phrasing_seed: int | None = None
) -> list[dict]:
    """Deterministic offline generator: structure, diagnosis and multi-region grounding turns.
    ``phrasing_seed``: vary the request wording (training); None keeps the canonical one."""
    modality = record.modality
    entries = []

    def entry(kind: str, question: str, answer: str, used: list[CodedRegion], **extra) -> dict:
        return {
            "id": f"{record.image_id}_{kind}",
            "image": image,
            "modality": modality,
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
            "mask_files": [r.mask_file for r in used],
            **extra,
        }

    structures = [r for r in regions if r.host is None]
    lesions = [r for r in regions if r.host is not None]
    for region in structures:
        kind = f"seg_{region.class_name.replace(' ', '_')}"
        request = _phrasing(SEGMENT_REQUESTS, f"{record.image_id}/{kind}", phrasing_seed)
        entries.append(entry(kind, request.format(name=region.class_name),
                             f"Here is the {region.class_name} {region.token}.", [region], task="segmentation"))
    question = _phrasing(ABNORMALITY_REQUESTS, f"{record.image_id}/diagnosis", phrasing_seed).format(modality=modality)
    if lesions:
        lesion = lesions[0]
        entries.append(entry("diagnosis", question, f"Yes, there is {_article(lesion.class_name)} {lesion.class_name} in the {lesion.host} {lesion.token}.",
                             [lesion], task="diagseg", diagnosis=lesion.class_name))
    else:
        entries.append(entry("diagnosis", question, "No, there is no abnormality in this image.", [],
                             task="diagseg", diagnosis="none"))
    if len(structures) > 1:
        parts = [f"the {r.class_name} {r.token}" for r in structures]
        answer = ", ".join(parts[:-1]) + f" and {parts[-1]}."
        request = _phrasing(ALL_STRUCTURES_REQUESTS, f"{record.image_id}/all_structures", phrasing_seed)
        entries.append(entry("all_structures", request, answer[0].upper() + answer[1:],
                             structures, task="multi_segmentation"))
    return entries


def _llm_conversations(output: Path, data_root: Path, seed: int, taxonomy: Taxonomy) -> list[dict]:
    """Extra multi-turn conversations from an OpenAI-compatible endpoint (env-configured);
    resumable, validated against each region's mask and description, template fallback."""
    import json

    from medsight.data.datagen.grounding_conversations import build_grounding_conversations
    from medsight.data.datagen.llm_client import ChatClient
    from medsight.data.datagen.llm_generator import LLMGenerator
    from medsight.data.datagen.records import triples_from_region_codes
    from medsight.data.datagen.templates import TemplateGenerator

    triples = triples_from_region_codes(output / "region_codes" / "train.json", data_root, "train", taxonomy)
    generator = LLMGenerator(ChatClient.from_env(), fallback=TemplateGenerator(seed))
    target = output / "llm_conversations" / "train.json"
    build_grounding_conversations(triples, generator, target, work_dir=output / "checkpoints" / "llm_generation")
    return json.loads(target.read_text())


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    if config.grounding_data.generator not in ("template", "llm"):
        raise ValueError(f"grounding_data.generator={config.grounding_data.generator!r}: use template or llm")
    data_root = Path(inputs["data"])
    taxonomy = stage_taxonomy(config, inputs)
    modules = find_modules(inputs)
    encoder = load_encoder(config, inputs)
    perceiver = load_module(new_perceiver(config, taxonomy), modules, "perceiver", "perceiver-pretrain").eval()
    codebook = load_module(new_codebook(config, taxonomy), modules, "codebook", "codebook-pretrain").eval()
    matcher = HungarianMatcher(config.model.loss)
    vocabulary = RegionVocabulary(config.model.codebook.num_modalities, config.model.codebook.codes_per_modality, config.model.grounding)
    metrics: dict[str, float] = {}
    for split_name in SPLITS:
        split = load_split(data_root, split_name, config.model.encoder.image_size, config.codebook_pretrain.max_masks_per_image, taxonomy)
        encode_split(split, encoder)
        tokens = extract_region_tokens(split, perceiver, codebook, matcher, vocabulary)
        conversations, codes = [], []
        for record, masks, image_tokens in zip(split.records, split.masks, tokens):
            regions = coded_regions(record, masks, image_tokens, data_root, taxonomy)
            image = str(Path(record.image_path).resolve().relative_to(data_root.resolve()))
            conversations += template_conversations(
                record, regions, image, config.grounding_data.seed if split_name == "train" else None
            )
            codes.append({"image": image, "modality": record.modality, "regions": [vars(r) for r in regions]})
        atomic_write_json(output / "region_codes" / f"{split_name}.json", codes)
        if config.grounding_data.generator == "llm" and split_name == "train":
            # App. C: an LLM writes the training conversations around the extracted codes; the
            # val/test questions stay templated so evaluation is comparable across runs.
            conversations += _llm_conversations(output, data_root, config.grounding_data.seed, taxonomy)
        atomic_write_json(output / "conversations" / f"{split_name}.json", conversations)
        if split_name == "test":
            diagseg = [c for c in conversations if c.get("task") == "diagseg" and c["mask_files"]]
            atomic_write_json(output / "diagseg_test.json", diagseg)
            metrics["diagseg_test_questions"] = float(len(diagseg))
        metrics[f"{split_name}_conversations"] = float(len(conversations))
        used = {token for image_tokens in tokens for token in image_tokens}
        metrics[f"{split_name}_distinct_region_tokens"] = float(len(used))
    return metrics
