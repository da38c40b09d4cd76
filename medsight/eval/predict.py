"""``medsight predict``: one image (PNG/JPEG or DICOM) + a question -> grounded answer on disk.

Writes into the output folder: ``answer.txt``, ``prediction.json`` (answer, region tokens,
files, boxes), ``boxes.json``, and per region token ``regionNN_<token>_mask.png`` (binary mask at
the image's own resolution) and ``regionNN_<token>_overlay.png``.

Memory stays bounded by the image, not by the image times the number of region tokens: masks are
kept at the model's resolution and each is resized to the image only while it is written. The
image's pixel count and the question's token count are capped (``model/input_limits.py``) before
anything large is decoded or generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medsight.data.image_io import DataError, image_size, load_image
from medsight.data.region_tokens import known_token_masks
from medsight.data.taxonomy import Taxonomy
from medsight.eval.dicom_io import is_dicom, read_dicom
from medsight.eval.examples import write_prediction_files
from medsight.eval.metrics import Box, box_from_mask
from medsight.eval.runner import GroundedModel
from medsight.eval.visuals import resize_image
from medsight.io_utils import atomic_write_json, atomic_write_text, missing_reason
from medsight.model.input_limits import DEFAULT_MAX_PIXELS, check_image_size, check_question_tokens, question_token_limit


@dataclass
class Prediction:
    text: str
    region_tokens: list[str]
    masks: torch.Tensor  # [K, S, S] probabilities at the model's resolution (resized when written)
    boxes: list[Box | None]  # normalised xyxy per region token (None for an empty mask)
    ignored_tokens: list[str]


def input_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file {missing_reason(path)}")
    if is_dicom(path):
        import pydicom

        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as error:  # pydicom raises many types for a damaged header
            raise DataError(f"{path}: not a readable DICOM file ({error})") from error
        return int(header.get("Columns", 0) or 0), int(header.get("Rows", 0) or 0)
    height, width = image_size(path)
    return width, height


def load_input_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """PNG/JPEG/... or DICOM -> [3, H, W] float in [0, 1]; bad files raise DataError, images over
    ``max_pixels`` raise InputTooLargeError before they are decoded."""
    path = Path(path)
    width, height = input_image_size(path)
    if width and height:  # a DICOM without Rows/Columns: its reader says what is wrong
        check_image_size(width, height, max_pixels, where=str(path))
    return read_dicom(path) if is_dicom(path) else load_image(path)


def check_question_fits(tokenizer, question: str, max_positions: int, visual_tokens: int, max_new_tokens: int) -> None:
    """Refuse a question whose prompt, with the image tokens and the answer, overflows the context."""
    from medsight.data.conversation_dataset import PromptFormat, encode_prompt

    prompt = encode_prompt(tokenizer, PromptFormat.from_tokenizer(tokenizer), question, visual_tokens)
    question_tokens = len(prompt) - visual_tokens - 2  # minus the user and assistant markers
    limit = question_token_limit(max_positions, visual_tokens, 2, max_new_tokens)
    check_question_tokens(question_tokens, limit, where="--question")


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
    """image [3, H, W] in [0, 1]; ``modality`` (a name of the model's ``taxonomy``) picks the
    sub-codebook, else the model predicts it."""
    modality_tensor = None
    if modality is not None:
        if taxonomy is None:
            raise ValueError(f"--modality {modality!r} needs the model's taxonomy to look it up")
        modality_tensor = torch.tensor([taxonomy.modality_index(modality, "--modality")])
    with torch.inference_mode():
        answer = model.answer(
            resize_image(image, model.image_size)[None],
            [question],
            modality=modality_tensor,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
        )[0]
    tokens, masks, dropped = known_token_masks(answer.region_tokens, answer.masks.detach().float().cpu(), model.region_token_names(), "predict")
    # [K, S, S]: normalised boxes need no resize; each mask is resized only as it is written.
    return Prediction(answer.text, tokens, masks, [box_from_mask(m) for m in masks], dropped)


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
