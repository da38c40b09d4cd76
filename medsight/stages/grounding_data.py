"""Build the paper's two grounding sets (App. C): each ground-truth region gets the region token
of the quantized query Hungarian-matched to it, and conversations are written around the tokens.

- Stage 4's grounding set: ``grounding_data.t2v_samples`` conversations (paper: 60K) around train
  images drawn uniformly (seeded rank), taken in rank order until the count is reached.
- Stage 5's codebook conversations: ``grounding_data.instruct_images`` images (paper: 12K) drawn
  uniformly from BiomedParse train by an independent rank.
Both go through the template generator, plus the LLM generator with ``generator=llm``. Only the
drawn images are read and encoded, in chunks, so the stage's memory does not grow with the release.

Outputs (paths inside are relative to the dataset root, so the data can move between machines):
  conversations/{train,val,test}.json    stage 4's set (train) and val/test questions
  instruct_conversations/train.json      stage 5's codebook conversations
  diagseg_test.json                      diagnosis-then-segment questions (lesion images, test)
  region_codes/{train,instruct,val,test}.json   the extracted codes per region (inspection / LLM)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from medsight.config.schema import ExperimentConfig
from medsight.data.biomedparse import SegmentationRecord
from medsight.data.phrasing import stable_choice
from medsight.data.prepare.sampling import chunked, smallest_ranked
from medsight.data.prepared_index import iter_index, record_from_entry
from medsight.data.safe_paths import prepared_roots
from medsight.data.taxonomy import Taxonomy
from medsight.io_utils import atomic_write_json
from medsight.model.matcher import HungarianMatcher
from medsight.model.region_vocabulary import RegionVocabulary
from medsight.model.bundle import find_modules, load_module, stage_taxonomy
from medsight.model.vision_modules import load_encoder, new_codebook, new_perceiver
from medsight.stages.segmentation_data import FrozenEncoder, SegmentationSamples, eval_loader, iterate
from medsight.train import distributed
from medsight.train.tracker import Tracker

CHUNK_IMAGES = 256  # images encoded at a time


@dataclass
class CodedRegion:
    class_name: str
    mask_file: str  # relative to the dataset root
    token: str
    host: str | None  # structure containing a lesion, by mask overlap


@torch.no_grad()
def extract_region_tokens(
    batch: dict, encoder: FrozenEncoder, perceiver, codebook, matcher: HungarianMatcher, vocabulary: RegionVocabulary
) -> list[list[str]]:
    """Per image of ``batch``, per ground-truth region (record order): the token of its matched quantized query."""
    tokens: list[list[str]] = []
    names = vocabulary.names
    out = perceiver(encoder(batch).patch_tokens)
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
                mask_file=os.path.relpath(region.mask_path, data_root),
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


def _llm_conversations(codes: list[dict], records: list[SegmentationRecord], work: Path, data_root: Path,
                       seed: int, taxonomy: Taxonomy) -> list[dict]:
    """Extra multi-turn conversations from an OpenAI-compatible endpoint (env-configured);
    resumable, validated against each region's mask and description, template fallback."""
    import json

    from medsight.data.datagen.grounding_conversations import build_grounding_conversations
    from medsight.data.datagen.llm_client import ChatClient
    from medsight.data.datagen.llm_generator import LLMGenerator
    from medsight.data.datagen.records import triples_from_records
    from medsight.data.datagen.templates import TemplateGenerator

    tokens = {r["mask_file"]: r["token"] for entry in codes for r in entry["regions"]}
    hosts = {r["mask_file"]: r["host"] for entry in codes for r in entry["regions"] if r.get("host")}
    triples = triples_from_records(records, data_root, taxonomy, tokens, hosts)
    generator = LLMGenerator(ChatClient.from_env(), fallback=TemplateGenerator(seed))
    target = work / "conversations.json"
    build_grounding_conversations(triples, generator, target, work_dir=work / "progress")
    return json.loads(target.read_text())


@dataclass
class CodedImage:
    record: SegmentationRecord
    conversations: list[dict]
    codes: dict  # region_codes entry


class GroundingBuilder:
    """Encodes records chunk by chunk and writes conversations around their region tokens."""

    def __init__(self, config: ExperimentConfig, inputs: dict[str, Path], taxonomy: Taxonomy) -> None:
        self.config, self.taxonomy, self.data_root = config, taxonomy, Path(inputs["data"])
        modules = find_modules(inputs)
        self.device = distributed.device()
        self.encoder = FrozenEncoder(load_encoder(config, inputs), self.device)
        self.perceiver = load_module(new_perceiver(config, taxonomy), modules, "perceiver",
                                     "perceiver-pretrain").eval().to(self.device)
        self.codebook = load_module(new_codebook(config, taxonomy), modules, "codebook",
                                    "codebook-pretrain").eval().to(self.device)
        self.matcher = HungarianMatcher(config.model.loss)
        self.vocabulary = RegionVocabulary(config.model.codebook.num_modalities, config.model.codebook.codes_per_modality,
                                           config.model.grounding)
        self.used_tokens: set[str] = set()

    def code(self, records: list[SegmentationRecord], phrasing_seed: int | None) -> list[CodedImage]:
        max_masks = self.config.codebook_pretrain.max_masks_per_image
        on_too_many = self.config.data.too_many_masks
        out = []
        # "skip" drops images over max_masks (the authors do); "error" lets the dataset refuse them.
        usable = records if on_too_many == "error" else [r for r in records if len(r.regions) <= max_masks]
        samples = SegmentationSamples(usable, self.config.model.encoder.image_size, max_masks, on_too_many=on_too_many)
        ordered = iter(samples.records)
        # In order, images and masks streamed a batch at a time, never held together.
        loader = eval_loader(samples, 64, self.config.codebook_pretrain.num_workers, shard=False)
        for batch in iterate(loader, self.device):
            tokens = extract_region_tokens(batch, self.encoder, self.perceiver, self.codebook, self.matcher,
                                           self.vocabulary)
            for masks, image_tokens in zip(batch["masks"], tokens):
                record = next(ordered)
                self.used_tokens.update(image_tokens)
                regions = coded_regions(record, masks.cpu(), image_tokens, self.data_root, self.taxonomy)
                image = os.path.relpath(record.image_path, self.data_root)
                conversations = template_conversations(record, regions, image, phrasing_seed)
                codes = {"image": image, "modality": record.modality, "regions": [vars(r) for r in regions]}
                out.append(CodedImage(record, conversations, codes))
        return out


def _drawn_records(data_root: Path, split: str, taxonomy: Taxonomy, draws: dict[str, tuple[int, str]],
                   seed: int) -> dict[str, list[SegmentationRecord]]:
    """Per draw name: ``count`` records of ``split`` of smallest seeded rank (salt), in rank order.
    Two passes over the index: ids first (bounded by the counts), then the chosen records."""
    ranked = {name: smallest_ranked(((str(e["id"]), str(e["id"])) for _, e in iter_index(data_root, split)), count, seed, salt)
              for name, (count, salt) in draws.items()}
    wanted = {image_id for ids in ranked.values() for image_id in ids}
    roots = prepared_roots(data_root)
    records = {str(e["id"]): record_from_entry(e, data_root, taxonomy, where, roots)
               for where, e in iter_index(data_root, split) if str(e["id"]) in wanted}
    return {name: [records[i] for i in ids] for name, ids in ranked.items()}


def run(config: ExperimentConfig, inputs: dict[str, Path], output: Path, tracker: Tracker) -> dict[str, float]:
    settings = config.grounding_data
    if settings.generator not in ("template", "llm"):
        raise ValueError(f"grounding_data.generator={settings.generator!r}: use template or llm")
    for key in ("t2v_samples", "instruct_images", "eval_images"):
        if getattr(settings, key) < 1:
            raise ValueError(f"grounding_data.{key} must be >= 1, got {getattr(settings, key)}")
    if distributed.world_size() > 1:
        raise ValueError("grounding-data runs in one process (it writes files as it goes); run it without --nproc-per-node")
    data_root = Path(inputs["data"])
    taxonomy = stage_taxonomy(config, inputs)
    builder = GroundingBuilder(config, inputs, taxonomy)
    train = _drawn_records(data_root, "train", taxonomy, {"t2v": (settings.t2v_samples, "t2v"),
                                                          "instruct": (settings.instruct_images, "instruct")}, settings.seed)
    metrics: dict[str, float] = {}

    # Stage 4: images in rank order until t2v_samples conversations exist.
    t2v: list[CodedImage] = []
    for chunk in chunked(train["t2v"], CHUNK_IMAGES):
        if sum(len(c.conversations) for c in t2v) >= settings.t2v_samples:
            break
        t2v += builder.code(chunk, settings.seed)
    t2v_conversations = [c for image in t2v for c in image.conversations][: settings.t2v_samples]
    coded = {image.record.image_id: image for image in t2v}
    instruct = [coded.get(r.image_id) for r in train["instruct"]]
    missing = [r for r, image in zip(train["instruct"], instruct) if image is None]
    fresh = {image.record.image_id: image for image in builder.code(missing, settings.seed)}
    instruct = [image or fresh[r.image_id] for r, image in zip(train["instruct"], instruct) if image or r.image_id in fresh]
    instruct_conversations = [c for image in instruct for c in image.conversations]
    if settings.generator == "llm":
        # App. C: an LLM writes training conversations around the extracted codes; val/test
        # questions stay templated so evaluation is comparable across runs.
        for name, images, target in (("t2v", t2v, t2v_conversations), ("instruct", instruct, instruct_conversations)):
            target += _llm_conversations([i.codes for i in images], [i.record for i in images],
                                         output / "checkpoints" / f"llm_{name}", data_root, settings.seed, taxonomy)
    atomic_write_json(output / "region_codes" / "train.json", [image.codes for image in t2v])
    atomic_write_json(output / "region_codes" / "instruct.json", [image.codes for image in instruct])
    atomic_write_json(output / "conversations" / "train.json", t2v_conversations)
    atomic_write_json(output / "instruct_conversations" / "train.json", instruct_conversations)
    metrics.update({"train_conversations": float(len(t2v_conversations)), "t2v_images": float(len(t2v)),
                    "instruct_conversations": float(len(instruct_conversations)), "instruct_images": float(len(instruct))})

    for split_name in ("val", "test"):
        (records,) = _drawn_records(data_root, split_name, taxonomy, {"eval": (settings.eval_images, split_name)},
                                    settings.seed).values()
        if not records:
            raise ValueError(f"{data_root}: the prepared {split_name} split has no images")
        images = builder.code(records, None)
        conversations = [c for image in images for c in image.conversations]
        atomic_write_json(output / "region_codes" / f"{split_name}.json", [image.codes for image in images])
        atomic_write_json(output / "conversations" / f"{split_name}.json", conversations)
        metrics[f"{split_name}_conversations"] = float(len(conversations))
        if split_name == "test":
            diagseg = [c for c in conversations if c.get("task") == "diagseg" and c["mask_files"]]
            atomic_write_json(output / "diagseg_test.json", diagseg)
            metrics["diagseg_test_questions"] = float(len(diagseg))
    metrics["distinct_region_tokens"] = float(len(builder.used_tokens))
    return metrics
