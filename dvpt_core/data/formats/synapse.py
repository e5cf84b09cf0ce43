"""Reader of Synapse multi-organ CT as TransUNet preprocessed it.

``train_npz/caseXXXX_sliceNNN.npz`` (one axial slice each) and ``test_vol_h5/caseXXXX.npy.h5``
(whole volumes, slices on the first axis, as TransUNet's ``test.py`` reads them), both with the
arrays ``image`` (HU clipped to [-125, 275], scaled to [0, 1]) and ``label``. The ``train_npz``
cases are the training split (the validation split is carved from them by case); the
``test_vol_h5`` cases are the test split. A case in both is a leak and fails the split check.

Labels: TransUNet evaluates 8 of the 13 BTCV organs as classes 1-8 in the order aorta,
gallbladder, left kidney, right kidney, liver, pancreas, spleen, stomach (TransUNet's ``test.py``
and the files its authors distribute, whose labels are already 0-8: ``data.synapse_labels =
transunet8``). Files keeping the raw BTCV labels (1 spleen, 2 right kidney, 3 left kidney,
4 gallbladder, 5 oesophagus, 6 liver, 7 stomach, 8 aorta, 9 inferior vena cava, 10 portal and
splenic veins, 11 pancreas, 12 right adrenal gland, 13 left adrenal gland), as TransUNet's
community ``preprocess_data.py`` writes them, need ``data.synapse_labels = btcv13``: they are
mapped to the 8 classes and the other 5 organs become background.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.common import DatasetFormatError, check_arrays, matching_files
from dvpt_core.data.records import Sample

TRAIN_DIR = "train_npz"
TEST_DIR = "test_vol_h5"
SLICE_NAME = re.compile(r"(case\d{4})_slice(\d{3})\.npz")
VOLUME_NAME = re.compile(r"(case\d{4})\.npy\.h5")
# Raw BTCV label -> TransUNet's class, in TransUNet's class order.
BTCV_TO_CLASS = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
BTCV_LABELS = 14  # background + 13 organs


def btcv_lut() -> np.ndarray:
    """Raw BTCV label -> class index, for ``pixels.MaskPolicy.lut``."""
    lut = np.zeros(BTCV_LABELS, dtype=np.uint8)
    for raw, cls in BTCV_TO_CLASS.items():
        lut[raw] = cls
    return lut


def detect(root: Path, data: DataConfig) -> bool:
    return (root / TRAIN_DIR).is_dir() or (root / TEST_DIR).is_dir()


def read(root: Path, data: DataConfig) -> list[Sample]:
    """Training slices sorted by case and slice, then every slice of each test volume."""
    samples = read_train(root / TRAIN_DIR) if (root / TRAIN_DIR).is_dir() else []
    if (root / TEST_DIR).is_dir():
        samples += read_test(root / TEST_DIR)
    if not samples:
        raise DatasetFormatError(f"{root}: no {TRAIN_DIR}/caseXXXX_sliceNNN.npz or {TEST_DIR}/caseXXXX.npy.h5 files")
    return samples


def read_train(folder: Path) -> list[Sample]:
    return [
        Sample(path=path, label=None, split="train", mask=path, group=m[1], volume=m[1], slice_index=int(m[2]))
        for path, m in matching_files(folder, SLICE_NAME)
    ]


def read_test(folder: Path) -> list[Sample]:
    return [
        Sample(path=path, label=None, split="test", mask=path, group=m[1], volume=m[1], slice_index=k)
        for path, m in matching_files(folder, VOLUME_NAME) for k in range(volume_depth(path))
    ]


def volume_depth(path: Path) -> int:
    """Slices of an h5 volume, from the dataset shapes only."""
    import h5py

    with h5py.File(path, "r") as handle:
        check_arrays(handle, 3, path)
        return int(handle["image"].shape[0])
