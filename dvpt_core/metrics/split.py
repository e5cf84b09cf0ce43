"""Scores of a whole cached segmentation split from the model's per-sample predictions.

2D splits (Kvasir-SEG, ISIC): a case is an image, scored at the cache's size against the cached
mask (HD95 in pixels). 3D splits (ACDC, Synapse), as the paper evaluates them: the model predicts
slice by slice; each volume is restacked in slice order, resized back to its original in-plane
size (``dvpt_core.data.restack``) and scored as one case against its label volume at the
original resolution, HD95 in mm from the voxel spacing (voxels where the files record none).
The predicted volumes can be written as NIfTI with the input's affine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dvpt_core.data.cache_layout import MASKS_FILE, SLICES_FILE, VOLUMES_FILE
from dvpt_core.data.cases import has_volumes, image_names, read_truth_volume, read_volume_records
from dvpt_core.data.restack import restack_split, write_nifti
from dvpt_core.metrics.segmentation import CaseScores, score_case, score_images

log = logging.getLogger(__name__)


def score_split(
    cache_dir: Path, split: str, label_maps: np.ndarray, num_classes: int, nifti_dir: Path | None = None
) -> list[CaseScores]:
    """Per-case scores of ``split``; ``label_maps`` are the predicted N x S x S class indices in the
    cache's sample order. For a 3D split, ``nifti_dir`` (if given) receives ``<volume>.nii.gz``."""
    split_dir = Path(cache_dir) / split
    if has_volumes(split_dir):
        volumes, slice_indices = np.load(split_dir / VOLUMES_FILE), np.load(split_dir / SLICES_FILE)
        return score_volumes(split_dir, volumes, slice_indices, label_maps, num_classes, nifti_dir)
    truths = np.load(split_dir / MASKS_FILE, mmap_mode="r")
    return score_images(image_names(cache_dir, split), label_maps, truths, num_classes)


def score_volumes(
    split_dir: Path,
    volumes: Sequence[str],
    slice_indices: Sequence[int],
    label_maps: np.ndarray | Sequence[np.ndarray],
    num_classes: int,
    nifti_dir: Path | None = None,
) -> list[CaseScores]:
    """Per-volume scores from per-slice predictions (``label_maps[i]`` is slice ``slice_indices[i]``
    of volume ``volumes[i]``, in any order), in the split's volume order."""
    records = read_volume_records(split_dir)
    cases = []
    for volume, predicted in restack_split(records, volumes, slice_indices, label_maps):
        record = records[volume]
        cases.append(score_case(volume, predicted, read_truth_volume(split_dir, volume), num_classes, record.spacing))
        if nifti_dir is not None:
            write_nifti(Path(nifti_dir) / f"{volume}.nii.gz", predicted, record)
    log.info("scored %d volumes of %s%s", len(cases), split_dir, f", predictions in {nifti_dir}" if nifti_dir else "")
    return cases
