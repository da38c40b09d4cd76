"""Procedural medical-looking images with one binary mask per region (the tiny preset's world).

Every modality has its own look (CT/MRI/X-ray intensity bodies, ultrasound speckle, dermoscopy
skin colour, H&E pathology) so a modality-aware model has something to tell apart, and every
lesion kind has its own appearance so "what kind of lesion" can only be answered from pixels.
Geometry is written in 64-pixel units and scaled, so any image size draws the same scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter

from medsight.data.synthetic_world import ModalitySpec

# (min radius, max radius, boundary wobble) in 64-px units; effusion is shaped separately.
_LESION_SHAPES = MappingProxyType(
    {
        "tumor": (6.0, 11.0, 0.22),
        "cyst": (5.0, 9.0, 0.03),
        "edema": (8.0, 12.0, 0.15),
        "nodule": (5.0, 6.5, 0.04),
        "melanoma": (7.0, 12.0, 0.28),
        "nevus": (5.0, 9.0, 0.04),
        "inflammation": (7.0, 12.0, 0.15),
    }
)
# Smallest lesion kept, in 64-px pixels (about a radius-4 disc): smaller cannot be segmented.
_MIN_LESION_AREA = 50.0
_PLACEMENT_TRIES = 20

Structures = dict[str, np.ndarray]  # name -> [S,S] bool, the full organ


@dataclass(frozen=True)
class Region:
    name: str
    mask: np.ndarray  # [S,S] bool
    is_lesion: bool


@dataclass(frozen=True)
class Lesion:
    kind: str
    structure: str  # the structure whose tissue holds the lesion


@dataclass(frozen=True)
class SyntheticScene:
    modality: ModalitySpec
    pixels: np.ndarray  # [S,S] uint8 (grayscale modality) or [S,S,3] uint8 (colour modality)
    regions: tuple[Region, ...]  # structures in taxonomy order, then the lesion if any
    lesion: Lesion | None

    @property
    def lesion_mask(self) -> np.ndarray | None:
        """[S,S] bool of the lesion, or None; text answers about lesions derive from this."""
        for region in self.regions:
            if region.is_lesion and region.mask.any():
                return region.mask
        return None


class Canvas:
    """Pixel grids plus the random source; sizes are given in 64-px units and scaled here."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rng = rng
        self.scale = size / 64.0
        grid = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        self.yy, self.xx = grid[0], grid[1]  # [S,S] pixel-centre coordinates

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def jitter(self, centre: float, amount: float) -> float:
        return centre + self.uniform(-amount, amount)

    def blob(
        self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0, wobble: float = 0.0
    ) -> np.ndarray:
        """[S,S] bool ellipse whose radius is perturbed by low harmonics (organ-like outline)."""
        s = self.scale
        dy, dx = self.yy - cy * s, self.xx - cx * s
        cos, sin = np.cos(angle), np.sin(angle)
        u = (dx * cos + dy * sin) / (rx * s)
        v = (-dx * sin + dy * cos) / (ry * s)
        radius_sq = u * u + v * v
        if wobble == 0.0:
            return radius_sq < 1.0
        # cos(k*theta + phase) as Re(z**k * e^(i*phase)) with z = e^(i*theta): no trig per pixel.
        z = (u + 1j * v) / (np.sqrt(radius_sq) + 1e-6)
        bound = np.ones_like(u)
        power = z
        for harmonic in (2, 3, 4, 5):
            power = power * z
            amplitude = self.uniform(-wobble, wobble) / harmonic**0.5
            phase = np.exp(1j * self.uniform(0.0, 2 * np.pi))
            bound += amplitude * (power * phase).real
        return radius_sq < bound * bound

    def noise(self, sigma: float) -> np.ndarray:
        """[S,S] float32 smooth noise, zero mean and unit std; sigma in 64-px units."""
        white = self.rng.standard_normal((self.size, self.size))
        field = gaussian_filter(white, sigma * self.scale)
        return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)

    def dots(self, density: float, radius: float) -> np.ndarray:
        """[S,S] bool scattered round dots (cell nuclei); density = dots per 64-px pixel."""
        seeds = self.rng.random((self.size, self.size)) < density / self.scale**2
        sigma = radius * self.scale / 1.18  # a half-peak threshold gives radius ~1.18 sigma
        field = gaussian_filter(seeds.astype(np.float32), sigma)
        return field > 0.5 / (2 * np.pi * sigma**2)

    def soften(self, mask: np.ndarray, sigma: float) -> np.ndarray:
        """[S,S] bool -> [S,S] float alpha with blurred edges (painting only, never labels)."""
        return gaussian_filter(mask.astype(np.float32), sigma * self.scale)

    def below(self, mask: np.ndarray) -> np.ndarray:
        """[S,S] bool of pixels under the mask in the same column (acoustic shadow path)."""
        return np.maximum.accumulate(mask, axis=0) & ~mask


def _blend(image: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> np.ndarray:
    """Alpha-composite ``value`` over a [S,S] or [S,S,3] image; alpha is [S,S]."""
    if image.ndim == 3:
        alpha = alpha[:, :, None]
    return image * (1.0 - alpha) + np.asarray(value, dtype=np.float32) * alpha


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    return np.array([r, g, b], dtype=np.float32)


# --- modality bases: background anatomy and the structure masks ------------------------------


def _ct_base(c: Canvas) -> tuple[np.ndarray, Structures]:
    cy, cx = c.jitter(32, 1.5), c.jitter(32, 1.5)
    ry, rx = c.uniform(23, 26), c.uniform(28, 30.5)
    body, inner = c.blob(cy, cx, ry, rx, wobble=0.03), c.blob(cy, cx, ry - 2.5, rx - 2.5)
    image = np.where(inner, 0.42, np.where(body, 0.27, 0.0)).astype(np.float32)
    liver = inner & c.blob(
        c.jitter(cy - 3, 3), c.jitter(19.5, 1.5), c.uniform(11, 14), c.uniform(9.5, 12),
        angle=c.uniform(-0.4, 0.4), wobble=0.08,
    )
    kidney = inner & ~liver & c.blob(
        c.jitter(cy + 4, 3), c.jitter(45, 1.5), c.uniform(9, 11), c.uniform(7, 8.5),
        angle=c.uniform(-0.3, 0.3), wobble=0.05,
    )
    spine = c.blob(cy + ry - 8, cx, 4.0, 4.5)
    image[liver] = 0.58
    image[kidney] = 0.7
    image[spine] = 0.92
    image += 0.03 * c.noise(2.0) * body
    return image, {"liver": liver, "kidney": kidney}


def _mri_base(c: Canvas) -> tuple[np.ndarray, Structures]:
    cy, cx = c.jitter(32, 1.5), c.jitter(32, 1.5)
    ry, rx = c.uniform(21, 24), c.uniform(17, 20)
    brain = c.blob(cy, cx, ry, rx, wobble=0.04)
    skull = c.blob(cy, cx, ry + 2.5, rx + 2.5) & ~brain
    scalp = c.blob(cy, cx, ry + 4.5, rx + 4.5) & ~brain & ~skull
    white = brain & c.blob(cy, cx, ry * 0.75, rx * 0.72, wobble=0.15)
    ventricle = white & c.blob(
        c.jitter(cy - 1, 1.5), c.jitter(cx, 1.5), c.uniform(8, 10), c.uniform(6, 8), wobble=0.1
    )
    image = np.zeros((c.size, c.size), np.float32)
    image[scalp], image[skull] = 0.72, 0.08
    # Grey matter with dark sulci, brighter white matter: the folded look of a T1 slice.
    image[brain] = 0.45 - 0.12 * (c.noise(0.9) > 1.0)[brain]
    image[white] = 0.62
    image[ventricle] = 0.12
    return image, {"brain": brain, "ventricle": ventricle}


def _xray_base(c: Canvas) -> tuple[np.ndarray, Structures]:
    body = c.blob(c.jitter(36, 1), c.jitter(32, 1), 36, c.uniform(29, 31))
    image = np.where(body, 0.55, 0.06).astype(np.float32)
    lung_y = c.jitter(30, 2)
    right = c.blob(lung_y, c.jitter(20, 1.5), c.uniform(17, 21), c.uniform(8.5, 10.5),
                   angle=c.uniform(-0.15, 0.05), wobble=0.05)
    heart = c.blob(c.jitter(42, 1.5), c.jitter(37, 1.5), c.uniform(8, 10), c.uniform(10, 12))
    left = ~heart & c.blob(lung_y, c.jitter(44, 1.5), c.uniform(16, 20), c.uniform(8, 10),
                           angle=c.uniform(-0.05, 0.15), wobble=0.05)
    lungs = right | left
    image[lungs] = 0.2
    image[heart & body] = 0.68
    period = c.uniform(5.5, 7.0) * c.scale
    bend = 0.012 / c.scale
    ribs = np.sin(2 * np.pi * (c.yy + bend * (c.xx - c.size / 2) ** 2) / period) > 0.75
    image[lungs & ribs] += 0.12
    image[body & (np.abs(c.xx - c.size / 2) < 2.5 * c.scale)] += 0.15  # spine shadow
    return image, {"right lung": right, "left lung": left}


def _ultrasound_fan(c: Canvas) -> np.ndarray:
    apex_y, apex_x = -10.0 * c.scale, 32.0 * c.scale
    radius = np.hypot(c.yy - apex_y, c.xx - apex_x)
    angle = np.arctan2(c.xx - apex_x, c.yy - apex_y)
    return (np.abs(angle) < 0.62) & (radius > 14 * c.scale) & (radius < 80 * c.scale)


def _ultrasound_base(c: Canvas) -> tuple[np.ndarray, Structures]:
    fan = _ultrasound_fan(c)
    image = np.where(fan, 0.38, 0.0).astype(np.float32)
    image[fan & (c.yy < 6 * c.scale)] = 0.75  # skin line
    image[fan & (c.yy >= 6 * c.scale) & (c.yy < 14 * c.scale)] = 0.2  # subcutaneous fat
    gland = fan & c.blob(c.jitter(34, 3), c.jitter(32, 4), c.uniform(11, 14), c.uniform(17, 21),
                         angle=c.uniform(-0.25, 0.25), wobble=0.1)
    image[gland] = 0.62
    return image, {"gland": gland}


def _dermoscopy_base(c: Canvas) -> tuple[np.ndarray, Structures]:
    tone = c.uniform(0.0, 1.0)
    skin_colour = (1 - tone) * _rgb(0.95, 0.8, 0.7) + tone * _rgb(0.78, 0.56, 0.43)
    mottling = 1.0 + 0.04 * c.noise(3.0)[:, :, None] * _rgb(0.6, 1.0, 1.0)
    image = np.broadcast_to(skin_colour, (c.size, c.size, 3)) * mottling
    skin = c.blob(c.jitter(32, 1), c.jitter(32, 1), c.uniform(29, 31.5), c.uniform(29, 31.5))
    return image.astype(np.float32), {"skin": skin}


def _pathology_base(c: Canvas) -> tuple[np.ndarray, Structures]:
    eosin = _rgb(0.93, 0.7, 0.83)
    fibres = 1.0 + 0.06 * c.noise(1.2)[:, :, None]
    image = np.broadcast_to(eosin, (c.size, c.size, 3)) * fibres
    image = _blend(image, c.dots(0.012, 0.8), _rgb(0.45, 0.25, 0.6))  # stromal nuclei
    cy, cx = c.jitter(32, 5), c.jitter(32, 5)
    ry, rx = c.uniform(16, 21), c.uniform(16, 21)
    gland = c.blob(cy, cx, ry, rx, angle=c.uniform(0, np.pi), wobble=0.12)
    lumen = c.blob(cy, cx, ry * 0.55, rx * 0.55, wobble=0.15)
    basal = gland & ~c.blob(cy, cx, ry * 0.8, rx * 0.8)
    image = _blend(image, (gland & ~lumen).astype(np.float32), _rgb(0.84, 0.6, 0.8))
    image = _blend(image, (basal & c.dots(0.15, 0.9)).astype(np.float32), _rgb(0.3, 0.15, 0.5))
    image = _blend(image, lumen.astype(np.float32), _rgb(0.97, 0.94, 0.96))
    return image.astype(np.float32), {"gland": gland}


def _paint_base(c: Canvas, modality: str) -> tuple[np.ndarray, Structures]:
    match modality:
        case "CT":
            return _ct_base(c)
        case "MRI":
            return _mri_base(c)
        case "X-Ray":
            return _xray_base(c)
        case "Ultrasound":
            return _ultrasound_base(c)
        case "Dermoscopy":
            return _dermoscopy_base(c)
        case "Pathology":
            return _pathology_base(c)
    raise ValueError(f"no synthetic look defined for modality {modality!r}")


# --- lesion appearance ---------------------------------------------------------------------


def _paint_gray_lesion(c: Canvas, modality: str, kind: str, image: np.ndarray,
                       mask: np.ndarray) -> np.ndarray:
    hard = mask.astype(np.float32)
    if modality == "Ultrasound":
        if kind == "cyst":  # anechoic, smooth, brighter behind (posterior enhancement)
            image = np.where(c.below(mask), image * 1.35, image)
            return _blend(image, hard, 0.03)
        shadowed = np.where(c.below(mask), image * 0.45, image)  # hypoechoic mass, shadowing
        return _blend(shadowed, hard, 0.16 + 0.05 * c.noise(0.8))
    if kind == "cyst":  # dark smooth fluid with a thin bright wall
        rim = mask & (distance_transform_edt(mask) <= 1.2 * c.scale)
        return _blend(_blend(image, hard, 0.1), rim.astype(np.float32), 0.78)
    if kind == "edema":  # diffuse, soft-edged brightening
        return _blend(image, c.soften(mask, 1.3) * 0.85, 0.8)
    if kind == "nodule":  # small, round, dense
        return _blend(image, c.soften(mask, 0.5), 0.86)
    if kind == "effusion":  # homogeneous fluid opacity
        return _blend(image, c.soften(mask, 0.6), 0.76)
    texture = 0.82 + 0.1 * c.noise(0.7)  # tumor: bright and heterogeneous
    if modality == "MRI":  # ring enhancement around a darker necrotic core
        core = distance_transform_edt(mask) > 2.2 * c.scale
        texture = np.where(core, 0.35 + 0.08 * c.noise(0.7), texture)
    return _blend(image, hard, texture)


def _paint_colour_lesion(c: Canvas, kind: str, image: np.ndarray,
                         mask: np.ndarray) -> np.ndarray:
    if kind == "melanoma":  # irregular, variegated brown, black and blue-grey
        pattern = c.noise(1.2)
        colour = np.where((pattern > 0.6)[:, :, None], _rgb(0.12, 0.08, 0.08),
                          np.where((pattern < -0.8)[:, :, None], _rgb(0.42, 0.45, 0.55),
                                   _rgb(0.38, 0.22, 0.13)))
        return _blend(image, c.soften(mask, 0.5), colour)
    if kind == "nevus":  # round, even tan-brown, a touch darker in the middle
        depth = distance_transform_edt(mask) / c.scale
        colour = _rgb(0.62, 0.42, 0.3) - np.clip(depth, 0, 6)[:, :, None] * 0.02
        return _blend(image, c.soften(mask, 0.6), colour)
    inside = mask.astype(np.float32)
    if kind == "tumor":  # crowded, large, dark, irregular nuclei on a purple background
        image = _blend(image, inside, _rgb(0.66, 0.45, 0.74))
        nuclei = mask & c.dots(0.09, 1.3)
        return _blend(image, nuclei.astype(np.float32), _rgb(0.22, 0.08, 0.38))
    if kind == "inflammation":  # dense small round dark-blue lymphocytes
        cells = mask & c.dots(0.3, 0.55)
        return _blend(image, cells.astype(np.float32), _rgb(0.17, 0.12, 0.45))
    raise ValueError(f"no synthetic appearance defined for lesion kind {kind!r}")


# --- finishing: acquisition artefacts, applied after lesions -------------------------------


def _finish(
    c: Canvas, modality: ModalitySpec, image: np.ndarray, structures: Structures
) -> np.ndarray:
    if modality.name == "Ultrasound":
        fan = _ultrasound_fan(c)
        speckle = gaussian_filter(c.rng.gamma(2.0, 0.5, (c.size, c.size)), 0.6 * c.scale)
        attenuation = 1.0 - 0.35 * c.yy / c.size
        return np.where(fan, image * speckle * 1.05 * attenuation, 0.0)
    if modality.name == "Dermoscopy":
        for _ in range(int(c.rng.integers(0, 4))):  # hairs lying over skin and lesion
            py, px = c.uniform(0, c.size), c.uniform(0, c.size)
            theta, bend = c.uniform(0, np.pi), c.uniform(-0.03, 0.03) / c.scale
            along = (c.xx - px) * np.cos(theta) + (c.yy - py) * np.sin(theta)
            across = -(c.xx - px) * np.sin(theta) + (c.yy - py) * np.cos(theta)
            hair = np.abs(across - bend * along**2) < 0.55 * c.scale
            image = _blend(image, hair.astype(np.float32) * 0.8, _rgb(0.2, 0.13, 0.1))
        # The dermatoscope's round field of view: edge fall-off, black outside the skin disc.
        radius = np.hypot(c.yy - c.size / 2, c.xx - c.size / 2) / (c.size / 2)
        vignette = np.clip(1.0 - 0.3 * radius**4, 0.0, 1.0)
        image = image * (vignette * structures["skin"])[:, :, None]
    sigma = 0.6 if modality.color else 0.4
    image = gaussian_filter(image, (sigma * c.scale,) * 2 + (0,) * (image.ndim - 2))
    return image + c.rng.normal(0.0, 0.012 if modality.color else 0.025, image.shape)


# --- scene assembly --------------------------------------------------------------------------


def _own_tissue(structures: Structures) -> Structures:
    """Each structure minus the structures nested in it (brain minus ventricle), so a lesion
    placed "in the brain" never spills into the ventricle and its host is unambiguous."""
    own: Structures = {}
    for name, mask in structures.items():
        tissue = mask.copy()
        for other_name, other in structures.items():
            other_contains_this = not np.any(mask & ~other)
            if other_name != name and not other_contains_this:
                tissue &= ~other
        own[name] = tissue
    return own


def _blob_lesion(c: Canvas, kind: str, host: np.ndarray) -> np.ndarray:
    """An elliptic, wobbly lesion centred where the host is thick enough to hold it."""
    low, high, wobble = _LESION_SHAPES[kind]
    depth = distance_transform_edt(host)  # [S,S] px to the host boundary
    radius = min(c.uniform(low, high) * c.scale, float(depth.max()))
    candidates = np.argwhere(depth >= 0.85 * radius)
    y, x = candidates[c.rng.integers(len(candidates))] + 0.5
    aspect = c.uniform(0.8, 1.2)
    radius /= c.scale
    shape = c.blob(y / c.scale, x / c.scale, radius * aspect, radius / aspect,
                   angle=c.uniform(0.0, np.pi), wobble=wobble)
    return shape & host


def _effusion(c: Canvas, host: np.ndarray) -> np.ndarray:
    """Fluid filling the base of a lung, its upper edge rising laterally (a meniscus)."""
    rows = np.flatnonzero(host.any(axis=1))
    top, bottom = float(rows[0]), float(rows[-1])
    level = bottom - c.uniform(0.3, 0.45) * (bottom - top)
    centre_x = float(np.argwhere(host)[:, 1].mean())
    outward = 1.0 if centre_x < c.size / 2 else -1.0
    lateral = np.clip((centre_x - c.xx) * outward, 0.0, None)
    return host & (c.yy > level - 0.5 * lateral)


def _place_lesion(c: Canvas, modality: ModalitySpec, own: Structures) -> tuple[Lesion, np.ndarray]:
    """Pick kind and host structure at random; retry until the lesion is big enough."""
    min_area = _MIN_LESION_AREA * c.scale**2
    for _ in range(_PLACEMENT_TRIES):
        kind = modality.lesions[int(c.rng.integers(len(modality.lesions)))]
        structure = modality.structures[int(c.rng.integers(len(modality.structures)))]
        host = own[structure]
        if host.sum() < min_area:
            continue
        if kind == "effusion":
            mask = _effusion(c, host)
        elif kind in _LESION_SHAPES:
            mask = _blob_lesion(c, kind, host)
        else:
            raise ValueError(f"no synthetic shape defined for lesion kind {kind!r}")
        if mask.sum() >= min_area:
            return Lesion(kind, structure), mask
    raise RuntimeError(f"could not place a large enough lesion in a {modality.name} image")


def render_scene(
    modality: ModalitySpec, size: int, rng: np.random.Generator, with_lesion: bool
) -> SyntheticScene:
    """Draw one image of ``modality`` with all its structures and, if asked, exactly one lesion."""
    c = Canvas(size, rng)
    image, drawn = _paint_base(c, modality.name)  # [S,S] or [S,S,3] float
    missing = [name for name in modality.structures if not drawn.get(name, np.zeros(1)).any()]
    if missing:
        raise RuntimeError(f"{modality.name} look drew no pixels for {missing}")
    structures = {name: drawn[name] for name in modality.structures}
    regions = [Region(name, mask, False) for name, mask in structures.items()]
    lesion = None
    if with_lesion:
        lesion, mask = _place_lesion(c, modality, _own_tissue(structures))
        if modality.color:
            image = _paint_colour_lesion(c, lesion.kind, image, mask)
        else:
            image = _paint_gray_lesion(c, modality.name, lesion.kind, image, mask)
        regions.append(Region(lesion.kind, mask, True))
    image = _finish(c, modality, image, structures)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return SyntheticScene(modality, pixels, tuple(regions), lesion)
