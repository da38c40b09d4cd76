"""Per-region-token results of an answer: token, class, modality, mask, box and confidence.

- class: the perceiver's class head on the token's P_t2v query (the query its mask decodes
  from), best real class; ``class_probability`` is its softmax share, no-object included.
- modality: the sub-codebook the token belongs to (``[C<m>_<k>]`` -> modality m of the model's
  taxonomy); the one-token ``[SEG]`` ablation has none.
- confidence: class probability x mean mask probability inside the predicted mask (the
  Mask2Former-style score), so a confident class with a vague mask still scores low; 0 for an
  empty mask.
- mask: binary (probability > 0.5) at the input image's resolution, as a base64 PNG or as
  COCO-style uncompressed RLE (column-major run lengths starting with background; decodes with
  ``pycocotools.mask.frPyObjects``).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

from medsight.data.taxonomy import Taxonomy
from medsight.eval.predict import Prediction
from medsight.eval.visuals import PALETTE, mask_to_pil, png_bytes
from medsight.model.region_vocabulary import REGION_TOKEN_PATTERN

MASK_FORMATS = ("png", "rle")
MASK_THRESHOLD = 0.5


def rle_encode(bits: np.ndarray) -> dict[str, Any]:
    """bool [H, W] -> {"size": [H, W], "counts": [...]} (column-major, background run first)."""
    flat = np.asarray(bits, dtype=bool).flatten(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(bits.shape[0]), int(bits.shape[1])], "counts": [int(c) for c in counts]}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of ``rle_encode``: bool [H, W]."""
    height, width = rle["size"]
    values = np.zeros(height * width, dtype=bool)
    position, value = 0, False
    for count in rle["counts"]:
        values[position : position + count] = value
        position += count
        value = not value
    return values.reshape((height, width), order="F")


def encode_mask(mask: torch.Tensor, mask_format: str) -> dict[str, Any]:
    """[H, W] probabilities -> {"format": ..., ...} with the binary mask in the asked encoding."""
    if mask_format == "png":
        return {"format": "png", "data": base64.b64encode(png_bytes(mask_to_pil(mask, MASK_THRESHOLD))).decode("ascii")}
    if mask_format == "rle":
        return {"format": "rle", **rle_encode((mask > MASK_THRESHOLD).numpy())}
    raise ValueError(f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")


def token_modality(token: str, taxonomy: Taxonomy | None) -> str | None:
    match = REGION_TOKEN_PATTERN.fullmatch(token)
    if not match or match.group(1) is None or taxonomy is None:
        return None
    index = int(match.group(1))
    return taxonomy.modalities[index] if index < len(taxonomy.modalities) else None


def _mask_score(mask: torch.Tensor) -> float:
    inside = mask > MASK_THRESHOLD
    return float(mask[inside].mean()) if bool(inside.any()) else 0.0


def region_results(prediction: Prediction, taxonomy: Taxonomy | None, mask_format: str = "png") -> list[dict[str, Any]]:
    """One JSON-ready dict per kept region token, in answer order."""
    height, width = prediction.image_size
    results = []
    for index, token in enumerate(prediction.region_tokens):
        mask = prediction.mask(index)  # [H, W]: one full-size mask in memory at a time
        class_name, class_probability = None, 0.0
        if prediction.class_probs is not None and index < prediction.class_probs.shape[0]:
            real = prediction.class_probs[index, :-1]  # drop no-object
            best = int(real.argmax())
            class_probability = float(real[best])
            names = taxonomy.region_classes if taxonomy is not None else ()
            class_name = names[best] if best < len(names) else str(best)
        box = prediction.boxes[index]
        results.append(
            {
                "index": index,
                "token": token,
                "class": class_name,
                "class_probability": round(class_probability, 4),
                "modality": token_modality(token, taxonomy),
                "confidence": round(class_probability * _mask_score(mask), 4),
                "color": "#%02x%02x%02x" % PALETTE[index % len(PALETTE)],
                "box": None
                if box is None
                else {
                    "xyxy_normalized": [round(v, 6) for v in box],
                    "xyxy_pixels": [round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)],
                },
                "mask": encode_mask(mask, mask_format),
            }
        )
    return results
