"""``medsight predict``: one image (PNG/JPEG or DICOM) + a question -> grounded answer on disk.

Writes into the output folder: ``answer.txt``, ``prediction.json`` (answer, region tokens,
files, boxes), ``boxes.json``, and per region token ``regionNN_<token>_mask.png`` (binary mask at
the image's own resolution) and ``regionNN_<token>_overlay.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medsight.data.image_io import load_image
from medsight.data.taxonomy import Taxonomy
from medsight.eval.dicom_io import is_dicom, read_dicom
from medsight.eval.examples import write_prediction_files
from medsight.eval.metrics import Box, box_from_mask, resize_probabilities
from medsight.data.region_tokens import known_token_masks
from medsight.eval.runner import GroundedModel
from medsight.eval.visuals import resize_image
from medsight.io_utils import atomic_write_json, atomic_write_text


@dataclass
class Prediction:
    text: str
    region_tokens: list[str]
    masks: torch.Tensor  # [K, H, W] probabilities at the input image's resolution
    boxes: list[Box | None]  # normalised xyxy per region token (None for an empty mask)
    ignored_tokens: list[str]
    class_probs: torch.Tensor | None = None  # [K, C+1] per kept region token (last = no-object)
    generated_tokens: int = 0


def load_input_image(path: Path) -> torch.Tensor:
    """PNG/JPEG/... or DICOM -> [3, H, W] float in [0, 1]; bad files raise DataError."""
    path = Path(path)
    return read_dicom(path) if is_dicom(path) else load_image(path)


def predict_images(
    model: GroundedModel,
    images: list[torch.Tensor],
    questions: list[str],
    modality: str | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    repetition_penalty: float = 1.2,
    taxonomy: Taxonomy | None = None,
) -> list[Prediction]:
    """Each image [3, H_i, W_i] in [0, 1] with its question, answered in one batch; masks come
    back at each image's own resolution. ``modality`` (a name of the model's ``taxonomy``) picks
    the sub-codebook for every image, else the model predicts it."""
    modality_tensor = None
    if modality is not None:
        if taxonomy is None:
            raise ValueError(f"--modality {modality!r} needs the model's taxonomy to look it up")
        modality_tensor = torch.tensor([taxonomy.modality_index(modality, "--modality")] * len(images))
    batch = torch.stack([resize_image(image, model.image_size) for image in images])  # [B, 3, S, S]
    with torch.inference_mode():
        answers = model.answer(
            batch,
            questions,
            modality=modality_tensor,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
        )
    predictions = []
    for image, answer in zip(images, answers):
        masks = answer.masks.detach().float().cpu()
        tokens, masks, dropped = known_token_masks(answer.region_tokens, masks, model.region_token_names(), "predict")
        masks = resize_probabilities(masks, tuple(image.shape[-2:]))  # [K, H, W]
        class_probs = getattr(answer, "class_probs", None)
        if class_probs is not None:
            vocabulary = set(model.region_token_names())
            kept = [i for i, token in enumerate(answer.region_tokens[: class_probs.shape[0]]) if token in vocabulary]
            class_probs = class_probs[kept]
        predictions.append(
            Prediction(answer.text, tokens, masks, [box_from_mask(m) for m in masks], dropped,
                       class_probs, getattr(answer, "generated_tokens", 0))
        )
    return predictions


def predict_image(
    model: GroundedModel,
    image: torch.Tensor,
    question: str,
    modality: str | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    repetition_penalty: float = 1.2,
    taxonomy: Taxonomy | None = None,
) -> Prediction:
    """image [3, H, W] in [0, 1]: one image through ``predict_images``."""
    return predict_images(model, [image], [question], modality, max_new_tokens, temperature, repetition_penalty, taxonomy)[0]


def write_prediction(output: Path, image: torch.Tensor, question: str, prediction: Prediction, image_path: Path) -> dict:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    height, width = image.shape[-2:]
    files = write_prediction_files(output, image, prediction.region_tokens, prediction.masks, prediction.boxes)
    boxes = [
        {
            "token": entry["token"],
            "box_xyxy_normalized": entry["box_xyxy_normalized"],
            "box_xyxy_pixels": None if box is None else [round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)],
        }
        for entry, box in zip(files, prediction.boxes)
    ]
    summary = {
        "image": str(image_path),
        "image_size_hw": [int(height), int(width)],
        "question": question,
        "answer": prediction.text,
        "region_tokens": prediction.region_tokens,
        "ignored_region_tokens": prediction.ignored_tokens,
        "regions": files,
    }
    atomic_write_text(output / "answer.txt", prediction.text + "\n")
    atomic_write_json(output / "boxes.json", boxes)
    atomic_write_json(output / "prediction.json", summary)
    return summary
