"""Checking one image and its masks on disk: the part of ``prepare`` that runs in worker processes.

``full`` decodes every file (a truncated PNG only shows when decoded): PNGs by walking their
chunks and inflating the image stream (a file that is cut short, or whose stream does not give
exactly the scanlines its header promises, is unreadable; an all-zero filtered payload is exactly
an all-zero image, so empty masks are found without unfiltering), anything else through PIL,
which also measures the mask area. ``header`` reads sizes only (a quick pass over a release
already checked once). Every problem is returned as (file, reason) for the report instead of
being raised, so one bad file never stops a million-image run.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

LEVELS = ("full", "header")
# What the stages' image loader takes (image_io): one intensity channel or RGB / palette.
_IMAGE_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I", "RGB", "P")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


class _NotFastPath(Exception):
    """A file the PNG fast path does not cover (not a PNG, interlaced, palette or alpha mask)."""


def png_payload(path: str, mask: bool) -> tuple[tuple[int, int], bool]:
    """((width, height), all-zero) of a complete, non-interlaced PNG; raises ``ValueError`` for a
    damaged file and ``_NotFastPath`` for one PIL must decode."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:8] != _PNG_SIGNATURE:
        raise _NotFastPath
    position, header, stream, complete = 8, None, [], False
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunk = data[position + 8 : position + 8 + length]
        if len(chunk) < length:
            raise ValueError(f"{kind.decode(errors='replace')} chunk cut short (file truncated)")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            stream.append(chunk)
        elif kind == b"IEND":
            complete = True
            break
        position += 12 + length
    if header is None or not complete:
        raise ValueError("no IEND chunk (file truncated)")
    width, height, depth, colour, _, _, interlace = header
    if interlace or colour not in _PNG_CHANNELS or (mask and colour in (3, 4, 6)):
        raise _NotFastPath
    if colour in (4, 6):
        raise ValueError(f"image has an alpha channel (PNG colour type {colour}); expected grayscale or RGB")
    try:
        raw = zlib.decompress(b"".join(stream))
    except zlib.error as error:
        raise ValueError(f"image stream corrupt ({error})") from None
    stride = (width * _PNG_CHANNELS[colour] * depth + 7) // 8
    if len(raw) != height * (stride + 1):
        raise ValueError(f"image stream holds {len(raw)} bytes, {height * (stride + 1)} expected (file truncated)")
    rows = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    return (width, height), not rows[:, 1:].any()


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


def _check(path: str, mask: bool) -> tuple[tuple[int, int] | None, bool, str | None]:
    """(size, empty, problem) through the PNG fast path."""
    try:
        size, empty = png_payload(path, mask)
        return size, empty, None
    except FileNotFoundError:
        return None, False, "file does not exist"
    except (OSError, ValueError) as error:
        return None, False, f"cannot decode ({error})"


def _verify_fast(job: ImageJob) -> Verified:
    """Every file a PNG the fast path covers; mask areas stay unknown (NaN): the index then takes
    the annotation's own ``area`` and ``medsight data check`` measures a sample."""
    result = Verified()
    size, _, problem = _check(job.image, mask=False)
    if size is None:
        result.image_problem = f"image {problem}"
        return result
    result.width, result.height = size
    for index, path in enumerate(job.masks):
        mask_size, empty, problem = _check(path, mask=True)
        result.areas.append(float("nan"))
        if mask_size is None:
            result.mask_problems[index] = f"mask {problem}"
        elif mask_size != size:
            result.mask_problems[index] = f"mask is {mask_size[1]}x{mask_size[0]} but its image is {size[1]}x{size[0]}"
        elif empty:
            result.mask_problems[index] = "mask is empty (all pixels are zero)"
            result.empty_masks.add(index)
    return result


def verify_job(job: ImageJob, level: str = "full") -> Verified:
    if level == "header":
        return _verify_header(job)
    try:
        return _verify_fast(job)
    except _NotFastPath:
        pass
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
