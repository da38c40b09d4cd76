"""Batched evaluation of a grounded model over benchmarks, with per-sample scores.

The runner needs only what ``MedSightInference`` offers (``answer``, ``image_size``,
``region_token_names``), so tests drive it with a small fake model and benchmarks time it on
the real one. Each task is scored as the paper does (see ``score_sample``).
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm.auto import tqdm

from medsight.data.image_io import DataError
from medsight.data.taxonomy import Taxonomy
from medsight.eval import llava_med_scoring as llava_med
from medsight.eval import metrics
from medsight.eval.protocols import LLAVA_MED_SUFFIX
from medsight.eval.benchmarks.common import BenchmarkData, EvalSample, SkippedEntry, model_modality
from medsight.data.region_tokens import known_token_masks, strip_region_tokens
from medsight.eval.visuals import load_gt_regions, load_sample_image, resize_image
from medsight.train import distributed

logger = logging.getLogger(__name__)


class GroundedAnswerLike(Protocol):
    text: str
    region_tokens: list[str]
    masks: torch.Tensor  # [K, S, S] probabilities


class GroundedModel(Protocol):
    image_size: int

    def answer(
        self,
        images: torch.Tensor,
        questions: list[str],
        modality: torch.Tensor | None = None,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        repetition_penalty: float = 1.2,
    ) -> list[GroundedAnswerLike]: ...

    def region_token_names(self) -> list[str]: ...


@dataclass(frozen=True)
class GenerationSettings:
    batch_size: int = 16
    max_new_tokens: int = 48
    temperature: float = 0.0
    repetition_penalty: float = 1.2


@dataclass
class Example:
    """What the report shows for one case (kept only for a few samples per benchmark)."""

    image: torch.Tensor  # [3, H, W] at the sample's own resolution
    gt_masks: torch.Tensor  # [G, H, W] bool
    pred_masks: torch.Tensor  # [K, S, S] probabilities of the kept region tokens


@dataclass
class SampleResult:
    sample: EvalSample
    prediction: str
    region_tokens: list[str]  # generated tokens that are in the vocabulary, in order
    scores: dict[str, float]
    pred_boxes: list[metrics.Box] = field(default_factory=list)
    example: Example | None = None


@dataclass
class BenchmarkResult:
    name: str
    source: str
    metrics: dict[str, metrics.MetricSummary]
    results: list[SampleResult]
    skipped: list[SkippedEntry]
    seconds: float

    @property
    def samples_per_second(self) -> float:
        return len(self.results) / self.seconds if self.seconds > 0 else 0.0


def _modality_tensor(batch: list[EvalSample], taxonomy: Taxonomy | None) -> torch.Tensor | None:
    """Taxonomy indices when the model knows every sample's modality, else None (it predicts)."""
    if taxonomy is None:
        return None
    names = [None if s.source_modality is None else model_modality(s.source_modality, taxonomy) for s in batch]
    if any(name is None for name in names):
        return None
    return torch.tensor([taxonomy.modality_index(name) for name in names], dtype=torch.long)


def score_sample(
    sample: EvalSample,
    prediction: str,
    pred_masks: torch.Tensor,
    gt_masks: torch.Tensor,
) -> tuple[dict[str, float], list[metrics.Box]]:
    """Scores of one answer by task; pred_masks [K, S, S] probabilities, gt_masks [G, H, W] bool.

    closed: closed_accuracy (miss = 0); open: open_recall; both also feed all_score (the
    paper's "all" column). mc: mc_accuracy. diagseg: diagnosis_recall (+ diagnosis_hit when the
    entry names its diagnosis), dice, box_miou. grounding: dice, box_miou. box: box_miou.
    Text scores come in both protocols: the names above are ``strict``; the same names with
    ``LLAVA_MED_SUFFIX`` are LLaVA-Med's run_eval.py scoring (``llava_med_scoring``).
    """
    scores: dict[str, float] = {}
    boxes = [b for b in (metrics.box_from_mask(mask) for mask in pred_masks) if b is not None]
    if sample.task == "closed":
        scores["closed_accuracy"] = scores["all_score"] = metrics.closed_hit(prediction, sample.answer)
        scores["closed_accuracy" + LLAVA_MED_SUFFIX] = scores["all_score" + LLAVA_MED_SUFFIX] = llava_med.closed_hit(prediction, sample.answer)
    elif sample.task == "open":
        scores["open_recall"] = scores["all_score"] = metrics.open_recall(prediction, sample.answer)
        scores["open_recall" + LLAVA_MED_SUFFIX] = scores["all_score" + LLAVA_MED_SUFFIX] = llava_med.open_recall(prediction, sample.answer)
    elif sample.task == "mc":
        scores["mc_accuracy"] = metrics.mc_hit(prediction, sample.options, sample.answer_index)
    if sample.task == "diagseg":
        said, expected = strip_region_tokens(prediction), strip_region_tokens(sample.answer)
        scores["diagnosis_recall"] = metrics.open_recall(said, expected)
        scores["diagnosis_recall" + LLAVA_MED_SUFFIX] = llava_med.open_recall(said, expected)
        if sample.diagnosis:
            scores["diagnosis_hit"] = metrics.term_recalled(prediction, sample.diagnosis)
    if sample.task in ("diagseg", "grounding"):
        scores["dice"] = metrics.ordered_dice(pred_masks, gt_masks)
        gt_boxes = [b for b in (metrics.box_from_mask(mask) for mask in gt_masks) if b is not None]
        if gt_boxes:
            scores["box_miou"] = metrics.boxes_iou(boxes, gt_boxes)
    if sample.task == "box":
        scores["box_miou"] = metrics.boxes_iou(boxes, sample.boxes)
    if sample.task in ("diagseg", "grounding", "box"):
        scores["extra_region_tokens"] = float(max(0, pred_masks.shape[0] - max(1, gt_masks.shape[0])))
    return scores, boxes


def _example_indices(count: int, keep: int) -> set[int]:
    """Evenly spread sample indices, so a report shows variety rather than the first few."""
    if keep <= 0 or count == 0:
        return set()
    if keep >= count:
        return set(range(count))
    return {round(i * (count - 1) / (keep - 1)) for i in range(keep)} if keep > 1 else {0}


def evaluate_benchmark(
    model: GroundedModel,
    data: BenchmarkData,
    settings: GenerationSettings,
    keep_examples: int = 8,
    progress: bool = True,
    taxonomy: Taxonomy | None = None,
) -> BenchmarkResult:
    """``taxonomy``: the model's label space, to tell it each sample's modality; None lets the
    model predict the modality (a model without a known taxonomy, or a test fake).

    In a multi-process job each rank answers every W-th sample (the model is replicated, so no
    collective runs inside generation) and rank 0 gathers the scored results, in sample order;
    the other ranks return their own share only."""
    vocabulary = model.region_token_names()
    rank, world = distributed.shard()
    mine = list(range(rank, len(data.samples), world))
    results: list[tuple[int, SampleResult]] = []  # (sample index, result)
    skipped: list[tuple[int, SkippedEntry]] = []
    keep = _example_indices(len(data.samples), keep_examples)
    unknown_tokens: set[str] = set()
    answers_with_unknown = 0
    started = time.perf_counter()
    bar = tqdm(total=len(mine), desc=f"eval {data.name}", unit="q", disable=not progress or rank != 0, leave=False)
    for start in range(0, len(mine), settings.batch_size):
        batch, images, gt = [], [], []
        for index in mine[start : start + settings.batch_size]:
            sample = data.samples[index]
            try:
                image = load_sample_image(sample)
                masks = load_gt_regions(sample)
            except DataError as error:
                skipped.append((index, SkippedEntry(sample.sample_id, str(error))))
                bar.update(1)
                continue
            batch.append((index, sample))
            images.append(image)
            gt.append(torch.stack(masks) if masks else torch.zeros((0, *image.shape[-2:]), dtype=torch.bool))
        if not batch:
            continue
        pixels = torch.stack([resize_image(image, model.image_size) for image in images])  # [B, 3, S, S]
        with torch.inference_mode():
            answers = model.answer(
                pixels,
                [sample.question for _, sample in batch],
                modality=_modality_tensor([sample for _, sample in batch], taxonomy),
                max_new_tokens=settings.max_new_tokens,
                temperature=settings.temperature,
                repetition_penalty=settings.repetition_penalty,
            )
        if len(answers) != len(batch):
            raise RuntimeError(f"{data.name}: model returned {len(answers)} answers for {len(batch)} questions")
        for (index, sample), image, gt_masks, answer in zip(batch, images, gt, answers):
            where = f"{data.name}/{sample.sample_id}"
            tokens, pred_masks, dropped = known_token_masks(answer.region_tokens, answer.masks.detach().float().cpu(), vocabulary, where)
            unknown_tokens.update(dropped)
            answers_with_unknown += bool(dropped)
            scores, boxes = score_sample(sample, answer.text, pred_masks, gt_masks)
            example = Example(image, gt_masks, pred_masks) if index in keep else None
            results.append((index, SampleResult(sample, answer.text, tokens, scores, boxes, example)))
        bar.update(len(batch))
    bar.close()
    if world > 1:
        results, skipped, unknown_tokens, answers_with_unknown = _gathered(
            results, skipped, unknown_tokens, answers_with_unknown
        )
    results_in_order = [result for _, result in sorted(results, key=lambda pair: pair[0])]
    seconds = time.perf_counter() - started
    book = metrics.ScoreBook()
    for result in results_in_order:
        for metric, value in result.scores.items():
            book.add(metric, result.sample.modality, value)
    if answers_with_unknown and rank == 0:
        logger.warning(
            "%s: %d answer(s) held region tokens not in the model vocabulary (%s); those tokens were ignored",
            data.name, answers_with_unknown, ", ".join(sorted(unknown_tokens)[:8]),
        )
    all_skipped = list(data.skipped) + [entry for _, entry in sorted(skipped, key=lambda pair: pair[0])]
    if all_skipped and rank == 0:
        logger.warning("%s: %d entries skipped (see results.json 'skipped')", data.name, len(all_skipped))
    return BenchmarkResult(data.name, str(data.source), book.summary(), results_in_order, all_skipped, seconds)


def _gathered(results: list, skipped: list, unknown: set[str], with_unknown: int):
    """Every rank's (index, result) pairs on rank 0 (the caller puts them in sample order)."""
    shares = distributed.gather_to_main((results, skipped, unknown, with_unknown))
    if shares is None:
        return results, skipped, unknown, with_unknown
    return ([pair for share in shares for pair in share[0]], [pair for share in shares for pair in share[1]],
            set().union(*(share[2] for share in shares)), sum(share[3] for share in shares))


def evaluate_all(
    model: GroundedModel,
    datasets: list[BenchmarkData],
    settings: GenerationSettings,
    keep_examples: int = 8,
    progress: bool = True,
    taxonomy: Taxonomy | None = None,
) -> list[BenchmarkResult]:
    return [evaluate_benchmark(model, data, settings, keep_examples, progress, taxonomy) for data in datasets]


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
