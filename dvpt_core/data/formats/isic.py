"""Reader of the ISIC 2016 part 1 (lesion segmentation) challenge data as downloaded.

``ISBI2016_ISIC_Part1_Training_Data/ISIC_<7 digits>.jpg`` (900) with their masks in
``ISBI2016_ISIC_Part1_Training_GroundTruth/ISIC_<id>_Segmentation.png`` (0/255), and the same for
``..._Test_Data`` / ``..._Test_GroundTruth`` (379). The official test set becomes the test
split; the validation split is carved from the training images. Without the test folders the
test split is carved too (and a warning says so).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.common import DatasetFormatError, matching_files, require_dir
from dvpt_core.data.records import Sample

log = logging.getLogger(__name__)

PREFIX = "ISBI2016_ISIC_Part1"
FOLDERS = {"train": "Training", "test": "Test"}
IMAGE_NAME = re.compile(r"ISIC_(\d{7})\.jpg")


def detect(root: Path, data: DataConfig) -> bool:
    return (root / f"{PREFIX}_Training_Data").is_dir()


def read(root: Path, data: DataConfig) -> list[Sample]:
    """Training images (split ``train``) then test images (split ``test``), each sorted by id."""
    samples = read_part(root, "train")
    if (root / f"{PREFIX}_Test_Data").is_dir():
        samples += read_part(root, "test")
    else:
        log.warning("%s: no %s_Test_Data folder; the test split is carved from the training images", root, PREFIX)
    return samples


def read_part(root: Path, split: str) -> list[Sample]:
    part = FOLDERS[split]
    images = require_dir(root / f"{PREFIX}_{part}_Data", f"ISIC 2016 {part.lower()} images")
    truth = require_dir(root / f"{PREFIX}_{part}_GroundTruth", f"ISIC 2016 {part.lower()} ground truth")
    samples = []
    for image, match in matching_files(images, IMAGE_NAME):
        mask = truth / f"ISIC_{match[1]}_Segmentation.png"
        if not mask.is_file():
            raise DatasetFormatError(f"{mask} does not exist (the ground truth of {image})")
        samples.append(Sample(path=image, label=None, split=split, mask=mask))
    if not samples:
        raise DatasetFormatError(f"{images}: no ISIC_<7 digits>.jpg images")
    return samples
