"""Uploaded images -> model input: base64 / data URLs, PNG/JPEG or DICOM, with the input caps.

Decoding goes through the same functions as ``medsight predict`` (``load_image_bytes`` and
``dicom_to_tensor``), so a file gives the same pixels whichever way it arrives; DICOM gets its
stored windowing applied. Every failure is a ``DataError`` naming the request field.
"""

from __future__ import annotations

import base64
import binascii
import re

import torch

from medsight.data.errors import DataError
from medsight.data.image_io import load_image_bytes
from medsight.eval.dicom_io import read_dicom_bytes
from medsight.model.input_limits import InputLimits

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+/-]*)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
DICOM_MIMES = frozenset({"application/dicom", "application/dicom+octet-stream"})


def looks_like_dicom(data: bytes) -> bool:
    """The 'DICM' magic after the 128-byte preamble (Part 10 files)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def decode_base64(text: str, where: str) -> tuple[bytes, str | None]:
    """A base64 string or a ``data:`` URL -> (bytes, declared MIME type or None)."""
    mime = None
    match = _DATA_URL.match(text)
    if match:
        mime = (match.group("mime") or "").lower() or None
        if not match.group("b64"):
            raise DataError(f"{where}: data URL must be base64-encoded (data:<type>;base64,...)")
        text = text[match.end() :]
    elif text.startswith(("http://", "https://", "file:")):
        raise DataError(f"{where}: image URLs are not fetched; send the image as a base64 data URL")
    try:
        return base64.b64decode(text.strip(), validate=True), mime
    except (binascii.Error, ValueError) as error:
        raise DataError(f"{where}: not valid base64 ({error})") from error


def decode_upload(data: bytes, where: str, limits: InputLimits, mime: str | None = None) -> torch.Tensor:
    """Image bytes -> [3, H, W] float in [0, 1]; DICOM by MIME type or magic, else PIL formats."""
    if not data:
        raise DataError(f"{where}: empty image")
    if (mime or "") in DICOM_MIMES or looks_like_dicom(data):
        return read_dicom_bytes(data, where, limits.max_image_pixels)
    return load_image_bytes(data, where, limits.max_image_pixels)
