"""DICOM files -> model input, with the stored display windowing applied.

Order of operations follows the DICOM grayscale pipeline: modality LUT (RescaleSlope /
RescaleIntercept, e.g. to Hounsfield units), then the VOI transform stored in the file
(WindowCenter/WindowWidth, or a VOI LUT), then MONOCHROME1 inversion. Without stored windowing
the full value range is used. Each failure names the file and says what is wrong with it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from medsight.data.image_io import DataError
from medsight.io_utils import missing_reason

logger = logging.getLogger(__name__)


def is_dicom(path: Path) -> bool:
    """By extension, or by the 'DICM' magic at byte 128 (many DICOM files have no extension)."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _first(value) -> float:
    """WindowCenter/Width may be multi-valued (several presets): the first is the default."""
    try:
        return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)
    except (TypeError, ValueError, IndexError) as error:
        raise ValueError(f"unreadable window value {value!r}") from error


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values.astype(np.float32) - low) / (high - low), 0.0, 1.0)


def window_grayscale(dataset, pixels: np.ndarray, path: Path | str) -> np.ndarray:
    """Raw stored values [H, W] -> [H, W] float in [0, 1] after modality LUT + stored VOI."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, dataset).astype(np.float32)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        try:
            center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        except ValueError as error:
            raise DataError(f"{path}: {error} in WindowCenter/WindowWidth") from error
        if width <= 0:
            raise DataError(f"{path}: WindowWidth must be positive, got {width}")
        unit = _scale(values, center - width / 2, center + width / 2)
    elif "VOILUTSequence" in dataset:
        looked_up = apply_voi_lut(pixels, dataset).astype(np.float32)
        unit = _scale(looked_up, float(looked_up.min()), float(looked_up.max()))
    else:
        unit = _scale(values, float(values.min()), float(values.max()))
    if str(dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values as white
    return unit


def read_dicom(path: Path) -> torch.Tensor:
    """DICOM file -> [3, H, W] float in [0, 1] (grayscale replicated to three channels)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file {missing_reason(path)}")
    return dicom_to_tensor(_parse(path, str(path)), str(path))


def read_dicom_bytes(data: bytes, where: str, max_pixels: int | None = None) -> torch.Tensor:
    """An uploaded DICOM (bytes) -> [3, H, W]; ``max_pixels`` is checked from the header, before
    the pixel data is decoded."""
    import io

    dataset = _parse(io.BytesIO(data), where)
    if max_pixels is not None and "PixelData" in dataset:
        from medsight.model.input_limits import InputLimits

        InputLimits(max_image_pixels=max_pixels).check_image(int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0)), where)
    return dicom_to_tensor(dataset, where)


def _parse(source, where: str):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(source)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{where}: not a readable DICOM file ({error})") from error


def dicom_to_tensor(dataset, where: str) -> torch.Tensor:
    """A parsed DICOM dataset -> [3, H, W] float in [0, 1]; ``where`` names it in errors."""
    path = where
    if "PixelData" not in dataset:
        kind = dataset.get("Modality", "unknown modality")
        raise DataError(f"{path}: DICOM has no pixel data (modality {kind}; a report or structured document?)")
    samples = int(dataset.get("SamplesPerPixel", 1))
    if samples not in (1, 3):
        raise DataError(f"{path}: DICOM has {samples} samples per pixel; expected 1 (grayscale) or 3 (RGB)")
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for missing codecs or bad data
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise DataError(
            f"{path}: cannot decode DICOM pixel data (transfer syntax {syntax}): {error}. "
            "Compressed files may need pylibjpeg or gdcm installed."
        ) from error
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        logger.warning("%s: %d frames; using the middle one", path, frames)
        pixels = pixels[frames // 2]
    if samples == 1:
        if pixels.ndim != 2:
            raise DataError(f"{path}: grayscale DICOM pixel array has shape {pixels.shape}, expected 2-D")
        unit = window_grayscale(dataset, pixels, path)
        array = np.repeat(unit[:, :, None], 3, axis=2)
    else:
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise DataError(f"{path}: colour DICOM pixel array has shape {pixels.shape}, expected H x W x 3")
        photometric = str(dataset.get("PhotometricInterpretation", "RGB")).upper()
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        peak = float(2 ** int(dataset.get("BitsStored", 8)) - 1)
        array = np.clip(pixels.astype(np.float32) / peak, 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
