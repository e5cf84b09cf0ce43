"""A synthetic cardiac MRI dataset written in ACDC's on-disk layout.

So the 3D segmentation path (slices, patient splits, restacking) runs out of the box. Each
``training/patientNNN/`` holds ``Info.cfg``, the end-diastolic (frame 01) and end-systolic
frames as NIfTI volumes with their ``_gt`` label volumes, and the unannotated cine
``patientNNN_4d.nii.gz`` (which readers must skip), as in ACDC. The volumes are short-axis
stacks: a bright left-ventricular blood pool (label 3, LV) inside a dark myocardial ring
(2, MYO), a bright right-ventricular crescent beside it (1, RV), in a body with dark lungs. The
heart narrows from base to apex (the RV ends before the apex) and contracts at end-systole
(smaller cavities, thicker wall). Intensities have no fixed scale, as in MRI.

Output is byte-identical for a given seed on the same library versions: every frame has its own
seeded generator (so the 4D cine holds exactly the ED and ES volumes written beside it), and
nibabel writes gzip without a timestamp.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dvpt_core.config import SyntheticConfig
from dvpt_core.data.atomic import atomic_directory
from dvpt_core.data.parallel import map_ordered

log = logging.getLogger(__name__)

STREAM = 2  # keeps these draws apart from the other generators' for the same seed
SPACING_MM = (1.5, 1.5, 10.0)  # in-plane pixel size and slice thickness typical of ACDC
RV, MYO, LV = 1, 2, 3
BODY, LUNG, BLOOD, MUSCLE = 110.0, 25.0, 400.0, 55.0
NOISE_STD = 12.0


@dataclass(frozen=True)
class Heart:
    """A patient's anatomy, in units of the image size."""

    cy: float
    cx: float
    lv_radius: float
    wall: float
    rv_radius: float
    rv_angle: float
    es_frame: int
    frames: int
    gain: float  # the scanner's arbitrary intensity scale


def generate_acdc(root: Path, cfg: SyntheticConfig, overwrite: bool = False) -> None:
    """Write ``cfg.volumes`` patients of ``cfg.slices`` slices to ``root/training``, atomically."""
    root = Path(root)
    with atomic_directory(root, replace=overwrite) as tmp:
        (tmp / "training").mkdir()
        map_ordered(lambda p: write_patient(tmp / "training", p, cfg), range(1, cfg.volumes + 1),
                    desc="synthetic hearts")
    log.info("wrote %d synthetic cardiac patients in ACDC layout to %s", cfg.volumes, root)


def write_patient(training: Path, number: int, cfg: SyntheticConfig) -> None:
    import nibabel

    name = f"patient{number:03d}"
    folder = training / name
    folder.mkdir()
    heart = draw_heart(np.random.default_rng([cfg.seed, STREAM, number]))
    affine = np.diag([*SPACING_MM, 1.0])
    volumes = {}
    for frame in range(1, heart.frames + 1):
        rng = np.random.default_rng([cfg.seed, STREAM, number, frame])
        volumes[frame] = render_frame(heart, phase(frame, heart), cfg.image_size, cfg.slices, rng)
    for frame in (1, heart.es_frame):
        image, label = volumes[frame]
        nibabel.save(nibabel.Nifti1Image(image, affine), folder / f"{name}_frame{frame:02d}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(label, affine), folder / f"{name}_frame{frame:02d}_gt.nii.gz")
    cine = np.stack([volumes[f][0] for f in sorted(volumes)], axis=-1)
    nibabel.save(nibabel.Nifti1Image(cine, affine), folder / f"{name}_4d.nii.gz")
    (folder / "Info.cfg").write_text(
        f"ED: 1\nES: {heart.es_frame}\nGroup: NOR\nHeight: 170.0\nNbFrame: {heart.frames}\nWeight: 70.0\n"
    )


def draw_heart(rng: np.random.Generator) -> Heart:
    es_frame = int(rng.integers(3, 5))
    return Heart(
        cy=0.5 + float(rng.normal(0, 0.03)), cx=0.52 + float(rng.normal(0, 0.03)),
        lv_radius=float(rng.uniform(0.09, 0.12)), wall=float(rng.uniform(0.035, 0.05)),
        rv_radius=float(rng.uniform(0.11, 0.15)), rv_angle=np.pi + float(rng.normal(0, 0.25)),
        es_frame=es_frame, frames=es_frame + 1, gain=float(rng.uniform(0.8, 1.5)),
    )


def phase(frame: int, heart: Heart) -> float:
    """Contraction: 0 at end-diastole (frame 1), 1 at end-systole, relaxing after it."""
    if frame <= heart.es_frame:
        return (frame - 1) / (heart.es_frame - 1)
    return max(0.0, 1.0 - (frame - heart.es_frame) / (heart.frames - heart.es_frame + 1))


def render_frame(
    heart: Heart, contraction: float, size: int, slices: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(int16 image, uint8 labels), both size x size x slices (NIfTI's x, y, z)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, labels = [], []
    for z in range(slices):
        towards_apex = z / (slices - 1)
        label = _slice_labels(heart, contraction, towards_apex, ys, xs)
        images.append(_slice_intensity(label, ys, xs, heart.gain, rng))
        labels.append(label)
    return np.stack(images, axis=-1), np.stack(labels, axis=-1)


def _slice_labels(heart: Heart, contraction: float, towards_apex: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    narrowing = 1.0 - 0.6 * towards_apex**1.5
    lv = heart.lv_radius * narrowing * (1.0 - 0.3 * contraction)
    wall = heart.wall * (1.0 + 0.3 * contraction)
    distance = np.hypot(ys - heart.cy, xs - heart.cx)
    label = np.zeros(ys.shape, dtype=np.uint8)
    if towards_apex < 0.75:  # the RV ends before the apex
        rv = heart.rv_radius * narrowing * (1.0 - 0.25 * contraction)
        offset = lv + wall + 0.4 * rv
        rv_cy, rv_cx = heart.cy + offset * np.sin(heart.rv_angle), heart.cx + offset * np.cos(heart.rv_angle)
        label[np.hypot(ys - rv_cy, xs - rv_cx) < rv] = RV
    label[distance < lv + wall] = MYO
    label[distance < lv] = LV
    return label


def _slice_intensity(
    label: np.ndarray, ys: np.ndarray, xs: np.ndarray, gain: float, rng: np.random.Generator
) -> np.ndarray:
    body = ((ys - 0.5) / 0.42) ** 2 + ((xs - 0.5) / 0.47) ** 2 < 1
    lungs = (((ys - 0.45) / 0.25) ** 2 + ((np.abs(xs - 0.5) - 0.25) / 0.14) ** 2 < 1) & (label == 0)
    image = np.where(body, BODY, 0.0)
    image[lungs] = LUNG
    image[(label == LV) | (label == RV)] = BLOOD
    image[label == MYO] = MUSCLE
    image = gain * (image + rng.normal(0, NOISE_STD, size=image.shape))
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
