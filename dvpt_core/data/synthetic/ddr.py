"""A synthetic DR-grading dataset written in DDR's on-disk layout.

Real fundus data cannot ship with the project, yet every step (validation, preprocessing,
training, the DVC and Kubeflow pipelines) must run out of the box. This module draws fundus-like
photographs (an orange-red retina on black, optic disc, macula, branching vessels) whose lesions
follow the international clinical DR scale DDR is graded on: mild = a few microaneurysms,
moderate = more of them plus haemorrhages and hard exudates, severe = many haemorrhages,
proliferative = all that plus new vessels near the disc. The grade is thus visible in the pixels
and a model can learn it.

Output is byte-identical for a given seed on the same library versions: every image has its own
seeded ``numpy.random.Generator`` (so order and threading do not matter), Pillow draws and encodes
with fixed settings, and nothing time-dependent (EXIF, timestamps) is written.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dvpt_core.config import SyntheticConfig
from dvpt_core.data.atomic import atomic_directory
from dvpt_core.data.parallel import map_ordered
from dvpt_core.data.records import SPLITS

log = logging.getLogger(__name__)

# Drawn at this multiple of the output size, then box-downsampled: cheap anti-aliasing.
SUPERSAMPLE = 2
JPEG_QUALITY = 90
NOISE_STD = 2.0
# DDR's gradable images per grade (train + valid + test). Their square roots keep DDR's order of
# frequency (no DR > moderate > proliferative > mild > severe) while leaving the rarest grade
# enough images to learn from in a small synthetic set.
DDR_GRADE_COUNTS = (6266, 630, 4477, 236, 913)

Colour = tuple[int, int, int]
Point = tuple[float, float]

DISC_COLOUR: Colour = (245, 205, 140)
CUP_COLOUR: Colour = (252, 232, 190)
VESSEL_COLOUR = np.array([165.0, 45.0, 32.0])
MICROANEURYSM_COLOUR: Colour = (120, 18, 14)
HAEMORRHAGE_COLOUR: Colour = (105, 14, 10)
EXUDATE_COLOUR: Colour = (240, 215, 95)
COTTON_WOOL_COLOUR: Colour = (232, 214, 182)
NEOVASCULAR_COLOUR: Colour = (190, 45, 40)


@dataclass(frozen=True)
class LesionLoad:
    """Inclusive (low, high) count ranges of each lesion type for one grade."""

    microaneurysms: tuple[int, int]
    haemorrhages: tuple[int, int]
    exudates: tuple[int, int]
    cotton_wool: tuple[int, int]
    neovascular: tuple[int, int]


# One row per grade of the 5-grade scale; ranges of neighbouring grades do not overlap (or grow),
# so the lesion load is monotone in the grade.
LESION_LOADS: tuple[LesionLoad, ...] = (
    LesionLoad((0, 0), (0, 0), (0, 0), (0, 0), (0, 0)),
    LesionLoad((2, 5), (0, 0), (0, 0), (0, 0), (0, 0)),
    LesionLoad((6, 10), (2, 4), (3, 6), (0, 1), (0, 0)),
    LesionLoad((11, 16), (7, 11), (7, 11), (2, 3), (0, 0)),
    LesionLoad((14, 20), (9, 13), (9, 13), (2, 4), (2, 4)),
)


@dataclass(frozen=True)
class Eye:
    """Where the retina, optic disc and macula sit on the canvas, in canvas pixels."""

    cx: float
    cy: float
    radius: float
    side: int  # +1: disc right of centre (a right eye), -1: left
    disc: Point
    disc_radius: float
    macula: Point
    base: np.ndarray  # the retina's RGB at its centre

    def inside(self, point: Point, margin: float = 0.97) -> bool:
        return math.hypot(point[0] - self.cx, point[1] - self.cy) < margin * self.radius

    def shade(self, point: Point) -> float:
        """Brightness fall-off towards the rim (the vignetting of a fundus camera)."""
        d2 = ((point[0] - self.cx) ** 2 + (point[1] - self.cy) ** 2) / self.radius**2
        return 1.0 - 0.3 * min(d2, 1.0)


def generate_ddr(
    root: Path, cfg: SyntheticConfig, class_names: list[str], overwrite: bool = False
) -> None:
    """Write the synthetic dataset to ``root`` in DDR's layout, atomically.

    ``root/{train,valid,test}/<name>.jpg`` with ``root/{train,valid,test}.txt`` beside them, one
    ``filename label`` line per image. Every grade appears in every split, so each split needs at
    least ``len(class_names)`` images. A non-empty ``root`` is only replaced when ``overwrite``.
    """
    root = Path(root)
    n_classes = len(class_names)
    sizes = {"train": cfg.train, "valid": cfg.valid, "test": cfg.test}
    _check_sizes(sizes, n_classes)
    with atomic_directory(root, replace=overwrite) as tmp:
        for split_index, split in enumerate(SPLITS):
            _write_split(tmp, split, split_index, sizes[split], n_classes, cfg)
    log.info("wrote synthetic DDR dataset to %s (%s)", root, ", ".join(f"{s}: {n}" for s, n in sizes.items()))


def _check_sizes(sizes: dict[str, int], n_classes: int) -> None:
    if n_classes < 2:
        raise ValueError(f"data.class_names must name at least 2 grades, got {n_classes}")
    for split, n in sizes.items():
        if n < n_classes:
            raise ValueError(
                f"synthetic.{split}={n} is fewer than the {n_classes} grades; "
                "every grade must appear in every split"
            )


def _write_split(
    root: Path, split: str, split_index: int, n: int, n_classes: int, cfg: SyntheticConfig
) -> None:
    labels = split_labels(n, n_classes, np.random.default_rng([cfg.seed, split_index]))
    names = [f"{split}_{i:05d}.jpg" for i in range(n)]
    (root / split).mkdir()

    def write(i: int) -> None:
        rng = np.random.default_rng([cfg.seed, split_index, i])
        image = render_fundus(int(labels[i]), n_classes, cfg.image_size, rng)
        (root / split / names[i]).write_bytes(encode_jpeg(image))

    map_ordered(write, range(n), desc=f"synthetic {split}")
    lines = "".join(f"{name} {label}\n" for name, label in zip(names, labels))
    (root / f"{split}.txt").write_text(lines)


def grade_shares(n_classes: int) -> np.ndarray:
    """DDR's grade frequencies, square-root flattened; uniform for a scale other than DDR's."""
    if n_classes == len(DDR_GRADE_COUNTS):
        weights = np.sqrt(np.asarray(DDR_GRADE_COUNTS, dtype=float))
    else:
        weights = np.ones(n_classes)
    return weights / weights.sum()


def split_labels(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """One image of every grade, the rest drawn with DDR-like imbalance, in shuffled order."""
    extra = rng.choice(n_classes, size=n - n_classes, p=grade_shares(n_classes))
    return rng.permutation(np.concatenate([np.arange(n_classes), extra]))


def lesion_load(grade: int, n_classes: int) -> LesionLoad:
    """The lesion recipe for ``grade``; other scales map onto the 5-grade rows proportionally."""
    row = round(grade * (len(LESION_LOADS) - 1) / (n_classes - 1))
    return LESION_LOADS[row]


def encode_jpeg(image: Image.Image) -> bytes:
    """Baseline JPEG with fixed settings and no metadata, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0", optimize=False)
    return buffer.getvalue()


def render_fundus(grade: int, n_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB fundus-like image showing the lesions of ``grade``."""
    canvas = size * SUPERSAMPLE
    eye = _eye_geometry(canvas, rng)
    image = Image.fromarray(_retina(canvas, eye))
    draw = ImageDraw.Draw(image)
    _draw_optic_disc(draw, eye)
    _draw_vessels(draw, eye, rng)
    _draw_lesions(draw, eye, lesion_load(grade, n_classes), rng)
    image = image.reduce(SUPERSAMPLE)
    return _add_noise(image, rng)


def _eye_geometry(canvas: int, rng: np.random.Generator) -> Eye:
    # Python floats, so float32 pixel maths is not promoted to float64 by numpy scalars.
    cx, cy = (float(v) for v in canvas / 2 + rng.normal(0, 0.01 * canvas, size=2))
    radius = canvas * 0.46 * (1 + float(rng.uniform(-0.02, 0.02)))
    side = 1 if rng.random() < 0.5 else -1
    disc = (cx + side * 0.32 * radius, cy + float(rng.normal(0, 0.03 * radius)))
    macula = (cx - side * 0.05 * radius, cy + float(rng.normal(0, 0.03 * radius)))
    base = np.array([200.0, 88.0, 38.0]) + rng.normal(0, [12.0, 10.0, 6.0])
    return Eye(cx, cy, radius, side, disc, 0.1 * radius, macula, base)


def _retina(canvas: int, eye: Eye) -> np.ndarray:
    """The retina's colour with rim vignetting and a darker macula, black outside the retina."""
    axis = np.arange(canvas, dtype=np.float32)
    xs, ys = axis[None, :], axis[:, None]
    d2 = ((xs - eye.cx) ** 2 + (ys - eye.cy) ** 2) / np.float32(eye.radius**2)
    macula2 = ((xs - eye.macula[0]) ** 2 + (ys - eye.macula[1]) ** 2) / np.float32((0.13 * eye.radius) ** 2)
    shade = (1.0 - 0.3 * np.minimum(d2, 1.0)) * (1.0 - 0.3 * np.exp(-macula2 / 2))
    shade[d2 > 1.0] = 0.0
    rgb = np.clip(eye.base.astype(np.float32), 0, 255)[None, None, :] * shade[..., None]
    return rgb.astype(np.uint8)


def _draw_optic_disc(draw: ImageDraw.ImageDraw, eye: Eye) -> None:
    x, y = eye.disc
    r = eye.disc_radius
    draw.ellipse((x - r, y - 1.1 * r, x + r, y + 1.1 * r), fill=DISC_COLOUR)
    draw.ellipse((x - 0.45 * r, y - 0.5 * r, x + 0.45 * r, y + 0.5 * r), fill=CUP_COLOUR)


def _draw_vessels(draw: ImageDraw.ImageDraw, eye: Eye, rng: np.random.Generator) -> None:
    """Four arcades leave the disc (the temporal two sweep round the macula), each with branches."""
    up_temporal = math.atan2(-1.0, -0.6 * eye.side)
    down_temporal = math.atan2(1.0, -0.6 * eye.side)
    arcades = (
        (up_temporal, -eye.side * 0.07, 0.026),
        (down_temporal, eye.side * 0.07, 0.026),
        (math.atan2(-1.0, 0.8 * eye.side), eye.side * 0.03, 0.018),
        (math.atan2(1.0, 0.8 * eye.side), -eye.side * 0.03, 0.018),
    )
    for heading, curvature, width in arcades:
        path = _walk(eye.disc, heading, 0.05 * eye.radius, 22, curvature, 0.08, eye, rng)
        _draw_tapered(draw, path, width * eye.radius, eye)
        for start in rng.choice(len(path), size=min(3, len(path)), replace=False):
            branch_heading = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)
            branch = _walk(path[start], branch_heading, 0.04 * eye.radius, 8, 0.0, 0.15, eye, rng)
            _draw_tapered(draw, branch, 0.5 * width * eye.radius, eye)


def _walk(
    start: Point,
    heading: float,
    step: float,
    steps: int,
    curvature: float,
    wiggle: float,
    eye: Eye,
    rng: np.random.Generator,
) -> list[Point]:
    """A curving random walk from ``start`` that stops at the retina's rim."""
    points = [start]
    x, y = start
    for _ in range(steps):
        heading += curvature + rng.normal(0, wiggle)
        x, y = x + step * math.cos(heading), y + step * math.sin(heading)
        if not eye.inside((x, y)):
            break
        points.append((x, y))
    return points


def _draw_tapered(draw: ImageDraw.ImageDraw, path: list[Point], width: float, eye: Eye) -> None:
    """A vessel that thins along its length and darkens with the retina towards the rim."""
    for i in range(len(path) - 1):
        taper = 1.0 - 0.6 * i / max(len(path) - 1, 1)
        colour = tuple(int(c) for c in VESSEL_COLOUR * eye.shade(path[i]))
        draw.line((path[i], path[i + 1]), fill=colour, width=max(1, round(width * taper)))


def _draw_lesions(
    draw: ImageDraw.ImageDraw, eye: Eye, load: LesionLoad, rng: np.random.Generator
) -> None:
    r = eye.radius
    for _ in range(_count(load.microaneurysms, rng)):
        _dot(draw, _spot(eye, rng), rng.uniform(0.010, 0.014) * r, MICROANEURYSM_COLOUR)
    for _ in range(_count(load.haemorrhages, rng)):
        _blot(draw, _spot(eye, rng), rng.uniform(0.025, 0.05) * r, rng)
    for _ in range(_count(load.exudates, rng)):
        _exudate_cluster(draw, _spot(eye, rng), r, rng)
    for _ in range(_count(load.cotton_wool, rng)):
        x, y = _spot(eye, rng)
        a, b = rng.uniform(0.035, 0.055, size=2) * r
        draw.ellipse((x - a, y - b, x + a, y + b), fill=COTTON_WOOL_COLOUR)
    for _ in range(_count(load.neovascular, rng)):
        _neovascular_tuft(draw, eye, rng)


def _count(bounds: tuple[int, int], rng: np.random.Generator) -> int:
    return int(rng.integers(bounds[0], bounds[1] + 1))


def _spot(eye: Eye, rng: np.random.Generator) -> Point:
    """A uniformly random point on the retina, clear of the rim."""
    distance = 0.85 * eye.radius * math.sqrt(rng.random())
    angle = rng.uniform(0, 2 * math.pi)
    return eye.cx + distance * math.cos(angle), eye.cy + distance * math.sin(angle)


def _dot(draw: ImageDraw.ImageDraw, centre: Point, radius: float, colour: Colour) -> None:
    x, y = centre
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


def _blot(draw: ImageDraw.ImageDraw, centre: Point, radius: float, rng: np.random.Generator) -> None:
    """A blot haemorrhage: a few overlapping ellipses, so the outline is irregular."""
    for _ in range(int(rng.integers(2, 4))):
        x, y = np.asarray(centre) + rng.normal(0, 0.35 * radius, size=2)
        a, b = radius * rng.uniform(0.6, 1.0, size=2)
        draw.ellipse((x - a, y - b, x + a, y + b), fill=HAEMORRHAGE_COLOUR)


def _exudate_cluster(
    draw: ImageDraw.ImageDraw, centre: Point, eye_radius: float, rng: np.random.Generator
) -> None:
    for _ in range(int(rng.integers(3, 8))):
        offset = rng.normal(0, 0.03 * eye_radius, size=2)
        _dot(draw, tuple(np.asarray(centre) + offset), rng.uniform(0.008, 0.018) * eye_radius, EXUDATE_COLOUR)


def _neovascular_tuft(draw: ImageDraw.ImageDraw, eye: Eye, rng: np.random.Generator) -> None:
    """New vessels: a tight, erratic tangle near the optic disc."""
    angle = rng.uniform(0, 2 * math.pi)
    distance = eye.disc_radius * rng.uniform(1.0, 2.5)
    start = (eye.disc[0] + distance * math.cos(angle), eye.disc[1] + distance * math.sin(angle))
    path = _walk(start, rng.uniform(0, 2 * math.pi), 0.025 * eye.radius, 16, 0.0, 0.9, eye, rng)
    if len(path) > 1:
        draw.line(path, fill=NEOVASCULAR_COLOUR, width=max(2, round(0.008 * eye.radius)))


def _add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Faint sensor noise, inside the retina only (the background stays pure black)."""
    pixels = np.asarray(image, dtype=np.float32)
    noisy = pixels + rng.normal(0, NOISE_STD, size=pixels.shape).astype(np.float32)
    noisy[pixels.max(axis=2) == 0] = 0
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
