"""The synthetic SOURCE task the stand-in foundation model is pre-trained on (the pretrain step).

No pretrained weights can be downloaded here, so the project makes its own "ImageNet": a generic
scene task, not a medical one, whose features are worth transferring without being tailored to
the target. Each image is a smooth background of a random muted colour with a brightness ramp,
zero to two large discs of random colours (distractors), and a scatter of small dots whose hue
lies in one of four bands; the label is that hue band crossed with how many dots there are
(few: 3-6, many: 12-20), 8 classes. The backbone thus learns to find small objects against a
background, tell their colours apart and gauge how many there are, while the target (the
fundus-like DR grading set) differs in domain (a retina, not a scene), palette (orange-red) and
label semantics (lesion types and counts on an ordinal scale).

``render_split`` returns a split as arrays for the pretrain step; ``generate_source`` writes it in
the ``folder`` layout (``{train,valid,test}/<class>/<id>.png``) for anyone who wants to look at it
or run it through the other steps. ``source_segmentation`` draws its scenes on the same
backgrounds in the same colours (``background``, ``colour``).
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HUE_BANDS = ("red", "green", "cyan", "violet")
COUNTS = {"few": (3, 6), "many": (12, 20)}
CLASS_NAMES = [f"{hue}-{count}" for hue in HUE_BANDS for count in COUNTS]
SUPERSAMPLE = 2


def render_split(n: int, image_size: int, seed: int, split_index: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, n x S x S x 3) with classes balanced, and their labels (int64)."""
    labels = np.arange(n, dtype=np.int64) % len(CLASS_NAMES)
    images = np.stack([np.asarray(render(int(label), image_size, np.random.default_rng([seed, split_index, i])))
                       for i, label in enumerate(labels)])
    return images, labels


def generate_source(root: Path, sizes: dict[str, int], image_size: int, seed: int) -> None:
    """Write ``sizes[split]`` images per split, classes balanced, to ``root``."""
    for split_index, (split, n) in enumerate(sizes.items()):
        images, labels = render_split(n, image_size, seed, split_index)
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = Path(root) / split / CLASS_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{split}_{i:05d}.png")


def render(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB scene of class ``label`` (see ``CLASS_NAMES``)."""
    band = label // len(COUNTS)
    low, high = list(COUNTS.values())[label % len(COUNTS)]
    canvas = size * SUPERSAMPLE
    image = Image.fromarray(background(canvas, rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):
        _disc(draw, rng.uniform(0, canvas, size=2), canvas * rng.uniform(0.08, 0.16),
              colour(rng.random(), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0)))
    for _ in range(int(rng.integers(low, high + 1))):
        hue = (band + rng.uniform(0.15, 0.85)) / len(HUE_BANDS)
        _disc(draw, rng.uniform(0, canvas, size=2), canvas * rng.uniform(0.02, 0.04),
              colour(hue, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)))
    return image.reduce(SUPERSAMPLE)


def colour(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return round(255 * r), round(255 * g), round(255 * b)


def background(canvas: int, rng: np.random.Generator) -> np.ndarray:
    """A random muted colour with a linear brightness ramp in a random direction and faint noise."""
    axis = np.linspace(-1, 1, canvas, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = math.cos(angle) * axis[None, :] + math.sin(angle) * axis[:, None]
    base = np.asarray(colour(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.3, 0.9)), dtype=np.float32)
    rgb = base * (1 + 0.25 * ramp[..., None]) + rng.normal(0, 6, size=(canvas, canvas, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _disc(draw: ImageDraw.ImageDraw, centre: np.ndarray, radius: float, colour: tuple[int, int, int]) -> None:
    x, y = (float(v) for v in centre)
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
