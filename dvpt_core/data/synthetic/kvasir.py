"""A synthetic polyp-segmentation dataset written in Kvasir-SEG's on-disk layout.

So the segmentation path runs out of the box, like the classification path does on synthetic
DDR. Each ``images/<id>.jpg`` is an endoscopy-like frame (pink-red mucosa with smooth folds, a
darker rim where the scope's light falls off, specular highlights) showing one polyp: a raised,
redder dome of one or two overlapping ellipses, brighter at its top and darker at its edge. Its
``masks/<id>.jpg`` marks the polyp's pixels white on black and, like Kvasir-SEG's own masks, is a
JPEG, so the readers' thresholding is exercised. Frames are wider than tall, as Kvasir's are.

Output is byte-identical for a given seed on the same library versions: each image has its own
seeded generator, and JPEGs are encoded with fixed settings and no metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from dvpt_core.config import SyntheticConfig
from dvpt_core.data.atomic import atomic_directory
from dvpt_core.data.parallel import map_ordered
from dvpt_core.data.synthetic.ddr import encode_jpeg

log = logging.getLogger(__name__)

STREAM = 1  # keeps these draws apart from the DDR generator's for the same seed
ASPECT = 1.25
MUCOSA = np.array([188.0, 92.0, 82.0])
POLYP = np.array([214.0, 112.0, 92.0])
NOISE_STD = 3.0


def generate_kvasir(root: Path, cfg: SyntheticConfig, overwrite: bool = False) -> None:
    """Write ``cfg.seg_images`` image/mask pairs to ``root/images`` and ``root/masks``, atomically."""
    root = Path(root)
    height, width = cfg.image_size, round(cfg.image_size * ASPECT)
    with atomic_directory(root, replace=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()

        def write(i: int) -> None:
            image, mask = render_polyp(height, width, np.random.default_rng([cfg.seed, STREAM, i]))
            name = f"synthetic{i:05d}.jpg"
            (tmp / "images" / name).write_bytes(encode_jpeg(Image.fromarray(image)))
            (tmp / "masks" / name).write_bytes(encode_jpeg(Image.fromarray(mask * np.uint8(255)).convert("RGB")))

        map_ordered(write, range(cfg.seg_images), desc="synthetic polyps")
    log.info("wrote %d synthetic polyp images in Kvasir-SEG layout to %s", cfg.seg_images, root)


def render_polyp(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 H x W x 3 frame, uint8 H x W mask with 1 on the polyp)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys, xs = ys / height, xs / height  # both in units of the height
    depth, mask = _polyp_dome(ys, xs, width / height, rng)
    shade = _mucosa_shading(ys, xs, width / height, rng)
    colour = MUCOSA + rng.normal(0, [8.0, 6.0, 5.0])
    rgb = colour * shade[..., None]
    # The dome: brighter towards its top, darker at its edge, in the polyp's own colour.
    dome = POLYP * (0.8 + 0.35 * depth)[..., None] * shade[..., None]
    rgb = np.where(mask[..., None], dome, rgb)
    rgb = _highlights(rgb, ys, xs, width / height, rng)
    rgb += rng.normal(0, NOISE_STD, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mask.astype(np.uint8)


def _polyp_dome(
    ys: np.ndarray, xs: np.ndarray, aspect: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One or two overlapping rotated ellipses: height of the dome (0 at the edge, 1 at the top) and its mask."""
    centre = np.array([rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7) * aspect])
    depth = np.zeros_like(ys)
    for lobe in range(int(rng.integers(1, 3))):
        offset = rng.normal(0, 0.06, size=2) if lobe else np.zeros(2)
        cy, cx = centre + offset
        a, b = rng.uniform(0.08, 0.2, size=2)
        angle = rng.uniform(0, np.pi)
        u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
        v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
        depth = np.maximum(depth, 1.0 - (u / a) ** 2 - (v / b) ** 2)
    return np.clip(depth, 0, 1), depth > 0


def _mucosa_shading(ys: np.ndarray, xs: np.ndarray, aspect: float, rng: np.random.Generator) -> np.ndarray:
    """Light fall-off from the frame's centre times a few soft folds."""
    r2 = (ys - 0.5) ** 2 + (xs - 0.5 * aspect) ** 2
    shade = 1.05 - 0.9 * r2
    for _ in range(3):
        fy, fx = rng.normal(0, 6.0, size=2)
        shade *= 1.0 + 0.06 * np.cos(fy * ys + fx * xs + rng.uniform(0, 2 * np.pi))
    return np.clip(shade, 0.2, 1.2)


def _highlights(
    rgb: np.ndarray, ys: np.ndarray, xs: np.ndarray, aspect: float, rng: np.random.Generator
) -> np.ndarray:
    """A few small near-white specular reflections of the scope's light."""
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9) * aspect
        radius = rng.uniform(0.006, 0.02)
        spot = ((ys - cy) ** 2 + (xs - cx) ** 2) < radius**2
        rgb = np.where(spot[..., None], np.array([250.0, 245.0, 240.0]), rgb)
    return rgb
