"""Reading images and masks from disk, with errors that name the offending file.

Real datasets contain truncated downloads, RGBA screenshots, masks of the wrong size and empty
masks; each is caught here, at load time, instead of surfacing as a shape error deep inside a
training step.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsight.data.errors import DataError  # noqa: F401  (re-exported: readers raise it)
from medsight.io_utils import missing_reason

# PIL modes holding one intensity channel; 16/32-bit ones are rescaled from their integer range.
_GRAY_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I")
_COLOR_MODES = ("RGB", "P")


def open_image(path: Path) -> Image.Image:
    """Open and fully decode ``path``; PIL decodes lazily, so truncation shows only on load."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file {missing_reason(path)}")
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from error


def _to_unit_array(image: Image.Image, path: Path) -> np.ndarray:
    """PIL image -> float32 [H,W,3] in [0,1]; grayscale is replicated to three channels."""
    if image.mode in _GRAY_MODES:
        if image.mode == "1":
            gray = np.asarray(image, dtype=np.float32)
        elif image.mode == "L":
            gray = np.asarray(image, dtype=np.float32) / 255.0
        else:
            gray = np.asarray(image, dtype=np.float32) / 65535.0
        gray = np.clip(gray, 0.0, 1.0)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode in _COLOR_MODES:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    channels = len(image.getbands())
    raise DataError(
        f"{path}: unsupported image with {channels} channel(s) (PIL mode {image.mode}); "
        "expected 1-channel grayscale or 3-channel RGB"
    )


def load_image_bytes(data: bytes, where: str, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded PNG/JPEG/... bytes (an upload) -> [3, H, W] float in [0, 1], converted exactly as
    ``load_image`` converts a file. ``max_pixels`` is checked from the header, before decoding."""
    import io

    try:
        with Image.open(io.BytesIO(data)) as handle:
            if max_pixels is not None:
                from medsight.model.input_limits import InputLimits

                InputLimits(max_image_pixels=max_pixels).check_image(handle.size[1], handle.size[0], where)
            handle.load()
            image = handle.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{where}: cannot decode image ({error})") from error
    array = _to_unit_array(image, Path(where))
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file {missing_reason(path)}")
    try:
        with Image.open(path) as handle:
            width, height = handle.size
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{path}: cannot read image header ({error})") from error
    return height, width


def load_image_array(path: Path, size: int | None = None) -> np.ndarray:
    """Image file -> float32 [H,W,3] in [0,1], optionally resized (bilinear) to size x size."""
    path = Path(path)
    image = open_image(path)
    if size is not None and image.size != (size, size):
        # Resize in a float mode so 16-bit images keep their precision and nothing clips.
        array = _to_unit_array(image, path)
        channels = [
            np.asarray(
                Image.fromarray(array[:, :, c]).resize((size, size), Image.Resampling.BILINEAR)
            )
            for c in range(3)
        ]
        return np.clip(np.stack(channels, axis=2), 0.0, 1.0).astype(np.float32)
    return _to_unit_array(image, path)


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """Image file -> FloatTensor [3,H,W] in [0,1] (not normalised; the encoder does that)."""
    array = load_image_array(path, size)  # [H,W,3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _mask_bits(image: Image.Image, path: Path) -> np.ndarray:
    """PIL mask -> bool [H,W]. Masks come as 0/1 or 0/255; half the maximum separates both."""
    if image.mode in ("RGB", "RGBA", "P", "LA"):
        values = np.asarray(image.convert("RGB")).max(axis=2)
    elif image.mode in _GRAY_MODES:
        values = np.asarray(image)
    else:
        raise DataError(f"{path}: unsupported mask mode {image.mode}")
    peak = values.max()
    if peak <= 0:
        raise DataError(f"{path}: mask is empty (all pixels are zero)")
    return values >= peak / 2.0


def load_mask_array(
    path: Path, size: int | None = None, expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Mask file -> bool [H,W] (or [size,size]); checks it is non-empty and matches its image."""
    path = Path(path)
    image = open_image(path)
    height, width = image.size[1], image.size[0]
    if expected_hw is not None and (height, width) != tuple(expected_hw):
        raise DataError(
            f"{path}: mask is {height}x{width} but its image is "
            f"{expected_hw[0]}x{expected_hw[1]} (height x width)"
        )
    bits = _mask_bits(image, path)
    if size is None or (height, width) == (size, size):
        return bits
    as_uint8 = Image.fromarray(bits.astype(np.uint8) * 255)
    resized = np.asarray(as_uint8.resize((size, size), Image.Resampling.NEAREST)) > 0
    if not resized.any():
        # Nearest sampling can miss a thin or tiny region entirely; keep any pixel it touches
        # so a valid annotation never turns into an empty target after downscaling.
        box = np.asarray(as_uint8.resize((size, size), Image.Resampling.BOX))
        resized = box > 0
    return resized


def load_mask(
    path: Path, size: int | None = None, expected_hw: tuple[int, int] | None = None
) -> torch.Tensor:
    """Mask file -> BoolTensor [H,W] (see ``load_mask_array``)."""
    return torch.from_numpy(load_mask_array(path, size, expected_hw))


def tile_images(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """[3,size,size] images -> one [3,size,size] grid of them, in reading order.

    The model takes one image; a multi-image question or caption (PubMedVision, MMMU) is shown
    as one picture holding all its images rather than losing all but the first.
    """
    if len(images) == 1:
        return images[0]
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = torch.zeros(3, rows * size, columns * size)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas[:, row * size:(row + 1) * size, column * size:(column + 1) * size] = image
    return torch.nn.functional.interpolate(canvas[None], size=(size, size), mode="bilinear",
                                           align_corners=False, antialias=True)[0].clamp(0.0, 1.0)


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """Every image of an entry at ``size`` (tiled when there are several): [3,size,size]."""
    return tile_images([load_image(path, size) for path in paths], size)
