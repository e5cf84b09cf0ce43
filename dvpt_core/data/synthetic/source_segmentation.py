"""The synthetic SOURCE segmentation task a stand-in SegFormer is pre-trained on (the pretrain step).

The segmentation counterpart of ``source``'s scene task, for the same reason: no pretrained
weights can be downloaded here, and adapting a random SegFormer learns nothing worth comparing.
Each image is ``source``'s cluttered scene (a muted background with a brightness ramp and faint
noise, a scatter of small dots) with larger filled shapes of random colours on top: one disc,
one square and one triangle, and sometimes one more of any kind, each at a random size, place and
rotation, in random order (later shapes occlude earlier ones). The label map marks every shape's
visible pixels with its kind (4 classes, the dots and the rest being background). Every kind
being in every scene keeps the per-case Dice meaningful: under the published convention
(``dvpt_core.metrics.segmentation``) a class absent from both prediction and ground truth scores 0. The backbone thus learns to delineate objects of any
colour from a textured background and tell shapes apart by their outline, while the target (the
Kvasir-style polyp set) differs in domain (endoscopy, not a scene), palette (pink-red mucosa),
objects (one smooth dome that differs from its surround by shading more than colour) and
classes (polyp or not).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from dvpt_core.data.synthetic.source import SUPERSAMPLE, background, colour

CLASS_NAMES = ["background", "disc", "square", "triangle"]
STREAM = 2  # keeps these draws apart from the classification source's for the same seed
EXTRA = 1  # shapes of a random kind beyond one of each
DOTS = (0, 8)
# Object radii (circumradius of squares and triangles) as a share of the image's side.
RADIUS = (0.08, 0.2)
DOT_RADIUS = (0.015, 0.03)


def render_split(n: int, image_size: int, seed: int, split_index: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes: images (uint8, n x S x S x 3) and label maps (uint8, n x S x S, class indices
    of ``CLASS_NAMES``)."""
    pairs = [render(image_size, np.random.default_rng([seed, STREAM, split_index, i])) for i in range(n)]
    return np.stack([image for image, _ in pairs]), np.stack([mask for _, mask in pairs])


def render(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ``size`` x ``size`` scene and its label map. Both are drawn at ``SUPERSAMPLE`` times the
    size; the image is then box-averaged (anti-aliased edges), the label map sampled (nearest)."""
    canvas = size * SUPERSAMPLE
    image = Image.fromarray(background(canvas, rng))
    mask = Image.new("L", (canvas, canvas), 0)
    draw, label = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(DOTS[0], DOTS[1] + 1))):
        centre, radius = rng.uniform(0, canvas, size=2), canvas * rng.uniform(*DOT_RADIUS)
        draw.polygon(_outline(0, centre, radius, 0.0), fill=colour(rng.random(), rng.uniform(0.4, 1.0),
                                                                   rng.uniform(0.4, 1.0)))
    kinds = [*range(1, len(CLASS_NAMES)), *rng.integers(1, len(CLASS_NAMES), size=int(rng.integers(0, EXTRA + 1)))]
    for kind in rng.permutation(kinds).tolist():
        centre = rng.uniform(0.1 * canvas, 0.9 * canvas, size=2)
        outline = _outline(kind - 1, centre, canvas * rng.uniform(*RADIUS), rng.uniform(0, 2 * math.pi))
        draw.polygon(outline, fill=colour(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)))
        label.polygon(outline, fill=kind)
    return (np.asarray(image.reduce(SUPERSAMPLE)),
            np.asarray(mask.resize((size, size), Image.Resampling.NEAREST)))


def _outline(shape: int, centre: np.ndarray, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a disc (a 48-gon), square or triangle (``shape`` 0, 1, 2) around ``centre``."""
    corners = (48, 4, 3)[shape]
    x, y = (float(v) for v in centre)
    return [(x + radius * math.cos(angle + 2 * math.pi * k / corners),
             y + radius * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)]
