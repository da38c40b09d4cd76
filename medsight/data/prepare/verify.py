"""Checking one image and its masks on disk: the part of ``prepare`` that runs in worker processes.

``full`` decodes every file (a truncated PNG only shows when decoded) and measures each mask's
area; ``header`` reads sizes only (a quick pass over a release already checked once). Every
problem is returned as (file, reason) for the report instead of being raised, so one bad file
never stops a million-image run.
"""

from __future__ import annotations

import math
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: str) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk (24 bytes read), or None when it is not a PNG:
    the header level reads millions of files, and PIL's open costs ten times more."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) == 24 and head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def _header(path: str) -> tuple[tuple[int, int] | None, str | None]:
    try:
        size = png_size(path)
    except FileNotFoundError:
        return None, "file does not exist"
    except OSError as error:
        return None, f"cannot read ({error})"
    if size is None:
        image, problem = _open(path, decode=False)
        if image is None:
            return None, problem
        with image:
            size = image.size
    return size, None


def _verify_header(job: ImageJob) -> Verified:
    result = Verified()
    size, problem = _header(job.image)
    if size is None:
        result.image_problem = f"image {problem}"
        return result
    result.width, result.height = size
    for index, path in enumerate(job.masks):
        mask_size, problem = _header(path)
        result.areas.append(float("nan"))
        if mask_size is None:
            result.mask_problems[index] = f"mask {problem}"
        elif mask_size != size:
            result.mask_problems[index] = f"mask is {mask_size[1]}x{mask_size[0]} but its image is {size[1]}x{size[0]}"
    return result


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
    """Foreground fraction of a 0/1 or 0/255 mask (any channel); None when it is empty.

    Counted from the image's histogram (C code, no array copy): masks are most of the files."""
    if mask.mode not in ("1", "L"):
        if mask.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            values = np.asarray(mask)
            peak = values.max() if values.size else 0
            return float((values >= peak / 2.0).mean()) if peak > 0 else None
        mask = mask.convert("L")
    histogram = np.asarray(mask.histogram())
    peak = int(np.flatnonzero(histogram)[-1])
    if peak == 0:
        return None
    return float(histogram[math.ceil(peak / 2.0):].sum()) / (mask.size[0] * mask.size[1])


def verify_job(job: ImageJob, level: str = "full") -> Verified:
    if level == "header":
        return _verify_header(job)
    decode = True
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
