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
from medsight.eval.metrics import Box, box_from_mask, resize_probabilities
from medsight.eval.runner import GroundedModel
from medsight.eval.visuals import resize_image
from medsight.io_utils import atomic_write_json, atomic_write_text, missing_reason
from medsight.model.input_limits import DEFAULT_MAX_PIXELS, InputLimits, question_token_limit


@dataclass
class Prediction:
    text: str
    region_tokens: list[str]
    masks: torch.Tensor  # [K, S, S] probabilities at the model's resolution (resized when used)
    boxes: list[Box | None]  # normalised xyxy per region token (None for an empty mask)
    ignored_tokens: list[str]
    image_size: tuple[int, int] = (0, 0)  # (H, W) of the input image the masks belong to
    class_probs: torch.Tensor | None = None  # [K, C+1] per kept region token (last = no-object)
    generated_tokens: int = 0

    def mask(self, index: int) -> torch.Tensor:
        """Region ``index``'s mask at the input image's resolution [H, W] (one at a time: memory
        holds one full-size mask, never K of them)."""
        return resize_probabilities(self.masks[index : index + 1], self.image_size)[0]


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
    ``max_pixels`` raise InputLimitError before they are decoded."""
    path = Path(path)
    width, height = input_image_size(path)
    if width and height:  # a DICOM without Rows/Columns: its reader says what is wrong
        InputLimits(max_image_pixels=max_pixels).check_image(height, width, str(path), raise_with="--max-pixels")
    return read_dicom(path) if is_dicom(path) else load_image(path)


def check_question_fits(tokenizer, question: str, max_positions: int, visual_tokens: int, max_new_tokens: int,
                        llm=None) -> None:
    """Refuse a question whose prompt, with the image tokens and the answer, overflows the context.
    ``llm``: the model's LLM config (its prompt format: medsight markers or the chat template)."""
    from medsight.data.conversation_dataset import PromptFormat, encode_prompt

    prompt_format = PromptFormat.from_tokenizer(tokenizer, llm)
    # What the prompt adds around the question: turn markers, or the chat template's scaffolding.
    overhead = len(encode_prompt(tokenizer, prompt_format, "", visual_tokens)) - visual_tokens

    def count(text: str) -> int:
        return len(encode_prompt(tokenizer, prompt_format, text, visual_tokens)) - visual_tokens - overhead

    room = question_token_limit(max_positions, visual_tokens, overhead, max_new_tokens)
    # The character cap is the server's; a local run only needs the question to fit the context.
    limits = InputLimits(max_question_chars=max(len(question), 1), max_question_tokens=max(room, 1))
    limits.check_question(question, count, "--question", room=room)


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
    """Each image [3, H_i, W_i] in [0, 1] with its question, answered in one batch (the server's
    micro-batches and ``medsight predict`` take this same path). ``modality`` (a name of the
    model's ``taxonomy``) picks the sub-codebook for every image, else the model predicts it."""
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
    vocabulary = model.region_token_names()
    for image, answer in zip(images, answers):
        tokens, masks, dropped = known_token_masks(answer.region_tokens, answer.masks.detach().float().cpu(), vocabulary,
                                                   "predict")
        class_probs = getattr(answer, "class_probs", None)
        if class_probs is not None:
            known = set(vocabulary)
            kept = [i for i, token in enumerate(answer.region_tokens[: class_probs.shape[0]]) if token in known]
            class_probs = class_probs[kept]
        # [K, S, S]: normalised boxes need no resize; each mask is resized only when it is used.
        predictions.append(Prediction(answer.text, tokens, masks, [box_from_mask(m) for m in masks], dropped,
                                      (int(image.shape[-2]), int(image.shape[-1])), class_probs,
                                      getattr(answer, "generated_tokens", 0)))
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
