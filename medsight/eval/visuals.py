"""Images in and out of evaluation: decode samples, read ground-truth masks, draw overlays.

Ground-truth masks may be legitimately empty in evaluation (an "is there a lesion?" case with
none), so they are read here without the training reader's non-empty check.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from medsight.data.image_io import DataError, load_image, open_image
from medsight.eval.benchmarks.common import EvalSample

# Distinct, colour-blind-friendly colours (Okabe-Ito), one per region token of an answer.
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167))
GT_COLOR = (0, 200, 80)


def decode_image_bytes(data: bytes, where: str) -> torch.Tensor:
    """Encoded PNG/JPEG bytes (parquet-embedded images) -> [3, H, W] float in [0, 1]."""
    try:
        with Image.open(io.BytesIO(data)) as handle:
            handle.load()
            image = handle.copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"{where}: cannot decode embedded image ({error})") from error
    return pil_to_tensor(image, where)


def pil_to_tensor(image: Image.Image, where: str) -> torch.Tensor:
    """PIL image -> [3, H, W] float in [0, 1]; 1-channel is replicated, alpha is dropped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32) / 65535.0
        array = np.repeat(np.clip(array, 0, 1)[:, :, None], 3, axis=2)
    elif image.mode in ("1", "L", "LA"):
        array = np.repeat((np.asarray(image.convert("L"), dtype=np.float32) / 255.0)[:, :, None], 3, axis=2)
    elif image.mode in ("RGB", "RGBA", "P"):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        raise DataError(
            f"{where}: unsupported image with {len(image.getbands())} channel(s) (PIL mode {image.mode}); "
            "expected grayscale or RGB"
        )
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def load_sample_image(sample: EvalSample) -> torch.Tensor:
    """The sample's image at its own resolution: [3, H, W] float in [0, 1]."""
    if sample.image_bytes is not None:
        return decode_image_bytes(sample.image_bytes, f"{sample.benchmark}/{sample.sample_id}")
    assert sample.image_path is not None
    return load_image(sample.image_path)


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] -> [3, size, size] (bilinear, antialiased when shrinking), clamped to [0, 1]."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    resized = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp(0.0, 1.0)


def load_gt_mask(path: Path) -> torch.Tensor:
    """Mask file -> bool [H, W]; 0/1 and 0/255 masks both work; an all-zero mask is allowed."""
    image = open_image(Path(path))
    if image.mode in ("RGB", "RGBA", "P", "LA"):
        values = np.asarray(image.convert("RGB")).max(axis=2)
    else:
        values = np.asarray(image)
    peak = values.max() if values.size else 0
    if peak <= 0:
        return torch.zeros(values.shape[:2], dtype=torch.bool)
    return torch.from_numpy(values >= peak / 2.0)


# ---------------------------------------------------------------------------- drawing


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] float in [0, 1] -> RGB PIL image."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array, "RGB")


def mask_to_pil(mask: torch.Tensor, threshold: float = 0.5) -> Image.Image:
    """[H, W] probabilities or bool -> black/white 'L' PNG-able image."""
    bits = mask if mask.dtype == torch.bool else mask > threshold
    return Image.fromarray(bits.numpy().astype(np.uint8) * 255, "L")


def overlay(
    image: torch.Tensor,
    masks: list[tuple[torch.Tensor, tuple[int, int, int]]],
    boxes: list[tuple[tuple[float, float, float, float], tuple[int, int, int]]] = (),
    alpha: float = 0.45,
    min_size: int = 192,
) -> Image.Image:
    """Image with coloured masks and box outlines drawn on it.

    image [3, H, W]; each mask [h, w] (resized to H, W); boxes normalised xyxy. Small images are
    upscaled (nearest) to ``min_size`` first so a 64-px synthetic case is readable in a report.
    """
    canvas = np.asarray(to_pil(image), dtype=np.float32)
    height, width = canvas.shape[:2]
    for mask, color in masks:
        if tuple(mask.shape) != (height, width):
            mask = F.interpolate(mask[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        bits = (mask > 0.5).numpy() if mask.dtype != torch.bool else mask.numpy()
        canvas[bits] = (1 - alpha) * canvas[bits] + alpha * np.asarray(color, dtype=np.float32)
    picture = Image.fromarray(canvas.round().astype(np.uint8), "RGB")
    scale = max(1, -(-min_size // max(height, width)))
    if scale > 1:
        picture = picture.resize((width * scale, height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(picture)
    for (x1, y1, x2, y2), color in boxes:
        w, h = picture.size
        draw.rectangle([x1 * w, y1 * h, x2 * w - 1, y2 * h - 1], outline=color, width=max(1, scale))
    return picture


def png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(picture: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii")


def load_gt_regions(sample: EvalSample) -> list[torch.Tensor]:
    """One bool [H, W] mask per ground-truth region: the union of a region's files when the
    benchmark groups several (``mask_groups``), else one file each."""
    masks = [load_gt_mask(path) for path in sample.mask_paths]
    if not sample.mask_groups:
        return masks
    regions, start = [], 0
    for size in sample.mask_groups:
        union = masks[start]
        for mask in masks[start + 1 : start + size]:
            union = union | mask
        regions.append(union)
        start += size
    return regions
