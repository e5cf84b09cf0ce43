"""Segmentation metrics (paper section 4.1.4): Dice, IoU and HD95 per foreground class and per case.

A case is a 2D image or a 3D volume (``dvpt_core.data.cases``); the same functions score both.
Background (class 0) is not scored: it is most of every image and would flatter every mean. The
reported numbers are means over cases, per class, and their mean over the foreground classes,
as TransUNet's ``test.py`` and the authors' released ``D3test.py`` average them.

Empty masks follow the published numbers' convention (TransUNet's ``calculate_metric_percase``,
copied by the authors' ``D3test.py``), per class and case:

==============  ============  ========  ========  ==========
prediction      ground truth  Dice      IoU       HD95
==============  ============  ========  ========  ==========
non-empty       non-empty     medpy dc  medpy jc  medpy hd95
non-empty       empty         1         1         0
empty           non-empty     0         0         0
empty           empty         0         0         0
==============  ============  ========  ========  ==========

(medpy alone gives Dice and IoU 0 for a prediction where the ground truth is empty, Dice NaN
and IoU 1 when both are empty, and raises for HD95 on an empty mask.)
IoU is not in TransUNet's function; it follows Dice, so IoU = Dice / (2 - Dice) holds in every row.
Every value is finite, so every case counts in every mean: MONAI's Hausdorff metric returns NaN
for a missed structure and its mean drops it (MONAI issue 9095), which would hide the miss. A
missed structure's HD95 of 0 still flatters the HD95 mean, as it does in the published numbers,
so the per-class table also counts the misses.

HD95 is medpy's: the 95th percentile of the surface distances in both directions pooled (not
MONAI's maximum of the two directed 95th percentiles), between the masks' one-voxel borders, in
mm when a voxel spacing is given and in voxels (pixels for 2D) otherwise. The surface distances
come from MONAI (``get_mask_edges``, ``get_surface_distance``: exact Euclidean distances over the
border voxels only, cropped to the masks' bounding box).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

METRICS = ("dice", "iou", "hd95")
HD95_PERCENTILE = 95


@dataclass(frozen=True)
class CaseScores:
    """One case's scores, one entry per foreground class (classes 1..C-1, in class order).

    ``missed``: the class is in the ground truth but not in the prediction (scored Dice 0, HD95 0).
    ``hd95_unit``: "mm" when the case was scored with a voxel spacing, else "voxel".
    """

    case: str
    dice: tuple[float, ...]
    iou: tuple[float, ...]
    hd95: tuple[float, ...]
    missed: tuple[bool, ...]
    hd95_unit: str

    @property
    def mean_dice(self) -> float:
        """Dice averaged over the foreground classes (an overlay's caption)."""
        return float(np.mean(self.dice))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """medpy's ``hd95`` of two non-empty boolean masks, in the units of ``spacing`` (voxels if None)."""
    # Imported here: importing MONAI takes several seconds, which every importer of this module would pay.
    from monai.metrics.utils import get_mask_edges, get_surface_distance

    edges_pred, edges_truth = get_mask_edges(*_cropped(pred, truth), crop=False)
    forward = get_surface_distance(edges_pred, edges_truth, spacing=spacing)
    backward = get_surface_distance(edges_truth, edges_pred, spacing=spacing)
    return float(np.percentile(np.concatenate([forward, backward]).astype(np.float64), HD95_PERCENTILE))


def _cropped(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box with one voxel of background around it, so the
    borders and distances are those of the whole image. MONAI's own ``crop=True`` finds the box
    through a torch transform that takes about 1 s per class on a 512 x 512 x 100 CT volume."""
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(np.any(union, axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1))
    return np.pad(pred[tuple(box)], 1), np.pad(truth[tuple(box)], 1)


def overlap_scores(predicted: ArrayLike, present: ArrayLike, overlap: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(Dice, IoU) from voxel counts under the module's empty-mask convention, elementwise.

    ``predicted``, ``present`` and ``overlap``: how many voxels the prediction, the ground truth
    and both hold (arrays of any one shape). Counts add up over slices, so a volume's scores can
    come from its slices' counts without holding the volume (the train step's validation does).
    """
    # Counting by hand: MONAI's compute_dice/compute_iou want one-hot float tensors (C times a
    # volume's memory) and apply the opposite convention to an empty ground truth.
    predicted, present, overlap = (np.asarray(c, dtype=np.float64) for c in (predicted, present, overlap))
    total = np.maximum(predicted + present, 1.0)
    dice = np.where(predicted == 0, 0.0, np.where(present == 0, 1.0, 2.0 * overlap / total))
    iou = np.where(predicted == 0, 0.0, np.where(present == 0, 1.0, overlap / np.maximum(total - overlap, 1.0)))
    return dice, iou


def class_counts(preds: np.ndarray, truths: np.ndarray, num_classes: int) -> np.ndarray:
    """Per label map of N (any dimensions) and foreground class: the (predicted, present, overlap)
    voxel counts, int64 N x (C-1) x 3, for :func:`overlap_scores`."""
    preds, truths = np.asarray(preds), np.asarray(truths)
    if preds.shape != truths.shape:
        raise ValueError(f"prediction shape {preds.shape} differs from ground truth shape {truths.shape}")
    axes = tuple(range(1, preds.ndim))
    counts = np.empty((preds.shape[0], num_classes - 1, 3), dtype=np.int64)
    for k in range(1, num_classes):
        predicted, present = preds == k, truths == k
        counts[:, k - 1] = np.stack([predicted.sum(axes), present.sum(axes), (predicted & present).sum(axes)], -1)
    return counts


def binary_scores(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[float, float, float]:
    """(Dice, IoU, HD95) of one class's boolean masks under the module's empty-mask convention."""
    predicted, present = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    dice, iou = overlap_scores(predicted, present, int(np.count_nonzero(pred & truth)))
    distance = hd95(pred, truth, spacing) if predicted and present else 0.0
    return float(dice), float(iou), distance


def score_case(
    case: str, pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: Sequence[float] | None = None
) -> CaseScores:
    """Scores of one 2D or 3D label map (integer class indices) against its ground truth.

    ``spacing``: the voxel size per array axis (mm) for HD95 in mm; ``None`` gives voxels."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"case {case}: prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"case {case}: spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}-D mask")
    if num_classes < 2:
        raise ValueError(f"num_classes is {num_classes}: segmentation needs background and at least one class")
    scores, missed = [], []
    for cls in range(1, num_classes):
        predicted, present = pred == cls, truth == cls
        scores.append(binary_scores(predicted, present, spacing))
        missed.append(bool(present.any()) and not predicted.any())
    dice, iou, distance = (tuple(float(s[i]) for s in scores) for i in range(3))
    return CaseScores(case, dice, iou, distance, tuple(missed), "voxel" if spacing is None else "mm")


def score_images(names: Sequence[str], preds: np.ndarray, truths: np.ndarray, num_classes: int) -> list[CaseScores]:
    """Per-image scores of N x H x W predicted and true label maps (a 2D split; HD95 in pixels)."""
    if not len(names) == len(preds) == len(truths):
        raise ValueError(f"{len(names)} case names, {len(preds)} predictions and {len(truths)} ground truths")
    return [score_case(name, pred, truth, num_classes) for name, pred, truth in zip(names, preds, truths)]


def class_table(cases: Sequence[CaseScores], class_names: Sequence[str]) -> list[dict]:
    """One row per foreground class: mean Dice, IoU and HD95 over the cases, how many cases, how
    many missed the class; then a ``mean`` row over the classes (the headline numbers)."""
    if not cases:
        raise ValueError("no cases to average")
    foreground = list(class_names[1:])
    if len(cases[0].dice) != len(foreground):
        raise ValueError(f"cases are scored over {len(cases[0].dice)} classes, class_names has {len(foreground)} "
                         f"foreground classes ({', '.join(foreground)})")
    units = sorted({case.hd95_unit for case in cases})
    if len(units) > 1:
        raise ValueError(f"cases mix HD95 units {units}: score every case of a split with a spacing, or none")
    values = {m: np.array([getattr(case, m) for case in cases], dtype=np.float64) for m in METRICS}
    missed = np.array([case.missed for case in cases]).sum(axis=0)
    rows = [
        {"class": name, **{m: float(values[m][:, k].mean()) for m in METRICS},
         "cases": len(cases), "missed": int(missed[k])}
        for k, name in enumerate(foreground)
    ]
    rows.append({"class": "mean", **{m: float(np.mean([row[m] for row in rows])) for m in METRICS},
                 "cases": len(cases), "missed": int(missed.sum())})
    return rows


def summary_metrics(cases: Sequence[CaseScores], class_names: Sequence[str]) -> dict[str, float]:
    """Flat numbers for MLflow and DVC: ``dice``, ``iou``, ``hd95`` (means over cases and classes),
    the same per class as ``dice_<class>`` and so on, and ``cases``."""
    rows = class_table(cases, class_names)
    *per_class, mean = rows
    metrics = {m: mean[m] for m in METRICS}
    for row in per_class:
        metrics.update({f"{m}_{row['class']}": row[m] for m in METRICS})
    metrics["cases"] = float(len(cases))
    return metrics
