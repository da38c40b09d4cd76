"""Checking one image and its masks on disk: the part of ``prepare`` that runs in worker processes.

``full`` decodes every file (a truncated PNG only shows when decoded) and measures each mask's
area; ``header`` reads sizes only (a quick pass over a release already checked once). Every
problem is returned as (file, reason) for the report instead of being raised, so one bad file
never stops a million-image run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

LEVELS = ("full", "header")
_IMAGE_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I", "RGB", "P", "RGBA", "LA")


@dataclass(frozen=True)
class ImageJob:
    """One image of the release and its masks, by absolute path."""

    image: str
    masks: tuple[str, ...]


@dataclass
class Verified:
    height: int = 0
    width: int = 0
    image_problem: str | None = None  # the image itself is unusable: drop it
    mask_problems: dict[int, str] = field(default_factory=dict)  # mask index -> reason
    empty_masks: set[int] = field(default_factory=set)  # subset of mask_problems: only that region goes
    areas: list[float] = field(default_factory=list)  # per mask, fraction of the image (NaN if unknown)


def _open(path: str, decode: bool) -> tuple[Image.Image | None, str | None]:
    try:
        handle = Image.open(path)
        if decode:
            handle.load()
        return handle, None
    except FileNotFoundError:
        return None, "file does not exist"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return None, f"cannot decode ({error})"


def _mask_area(mask: Image.Image) -> float | None:
    """Foreground fraction of a 0/1 or 0/255 mask (any channel); None when it is empty."""
    values = np.asarray(mask.convert("L") if mask.mode not in ("1", "L", "I", "I;16") else mask)
    peak = values.max() if values.size else 0
    if peak <= 0:
        return None
    return float((values >= peak / 2.0).mean())


def verify_job(job: ImageJob, level: str = "full") -> Verified:
    decode = level == "full"
    result = Verified()
    image, problem = _open(job.image, decode)
    if image is None:
        result.image_problem = f"image {problem}"
        return result
    with image:
        result.width, result.height = image.size
        if image.mode not in _IMAGE_MODES:
            result.image_problem = f"unsupported image mode {image.mode}"
            return result
    for index, path in enumerate(job.masks):
        mask, problem = _open(path, decode)
        if mask is None:
            result.mask_problems[index] = f"mask {problem}"
            result.areas.append(float("nan"))
            continue
        with mask:
            if mask.size != (result.width, result.height):
                result.mask_problems[index] = (
                    f"mask is {mask.size[1]}x{mask.size[0]} but its image is {result.height}x{result.width}"
                )
                result.areas.append(float("nan"))
                continue
            area = _mask_area(mask) if decode else float("nan")
        if area is None:
            result.mask_problems[index] = "mask is empty (all pixels are zero)"
            result.empty_masks.add(index)
            result.areas.append(0.0)
        else:
            result.areas.append(area)
    return result


def verify_full(job: ImageJob) -> Verified:
    return verify_job(job, "full")


def verify_header(job: ImageJob) -> Verified:
    return verify_job(job, "header")
