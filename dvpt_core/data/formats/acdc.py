"""Reader of ACDC (cardiac cine MRI) as downloaded: ``training/patientNNN/`` folders.

Each patient folder holds ``Info.cfg`` (``ED: 1``, ``ES: 12``, ...), the two annotated frames
``patientNNN_frameNN.nii.gz`` with their label volumes ``patientNNN_frameNN_gt.nii.gz``
(0 = background, 1 = RV, 2 = MYO, 3 = LV) and the unannotated cine ``patientNNN_4d.nii.gz``,
which is never read. Volumes are read slice by slice (NIfTI's last axis); every slice of a
patient, ED and ES alike, shares the patient as its group so a patient never straddles splits.

The paper splits the 100 ``training/`` patients 70 / 10 / 20 (the default val/test fractions);
the 50 ``testing/`` patients of the full release are not part of that protocol and are not read.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.common import DatasetFormatError, read_list_text, require_dir
from dvpt_core.data.records import Sample

log = logging.getLogger(__name__)

PATIENT = re.compile(r"patient\d{3}")
INFO_FILE = "Info.cfg"
PHASES = ("ED", "ES")


def detect(root: Path, data: DataConfig) -> bool:
    training = root / "training"
    return training.is_dir() and any(PATIENT.fullmatch(p.name) for p in training.iterdir())


def read(root: Path, data: DataConfig) -> list[Sample]:
    """Every slice of every patient's ED and ES frames, by patient, frame and slice."""
    training = require_dir(root / "training", "ACDC training patients")
    patients = sorted(p for p in training.iterdir() if p.is_dir() and PATIENT.fullmatch(p.name))
    if not patients:
        raise DatasetFormatError(f"{training}: no patientNNN folders")
    testing = root / "testing"
    if testing.is_dir():
        log.info("%s is not read: the paper's protocol splits the training/ patients 70/10/20", testing)
    return [sample for patient in patients for sample in read_patient(patient)]


def read_patient(folder: Path) -> list[Sample]:
    info = parse_info(folder / INFO_FILE)
    samples = []
    for frame in sorted({frame_number(info, phase, folder / INFO_FILE) for phase in PHASES}):
        volume = f"{folder.name}_frame{frame:02d}"
        image, truth = folder / f"{volume}.nii.gz", folder / f"{volume}_gt.nii.gz"
        for path in (image, truth):
            if not path.is_file():
                raise DatasetFormatError(f"{path} does not exist ({folder / INFO_FILE} names frame {frame})")
        samples += [
            Sample(path=image, label=None, split=None, mask=truth, group=folder.name, volume=volume, slice_index=k)
            for k in range(slice_count(image, truth))
        ]
    return samples


def parse_info(path: Path) -> dict[str, str]:
    """``Key: value`` lines of ``Info.cfg``."""
    if not path.is_file():
        raise DatasetFormatError(f"{path} does not exist (every ACDC patient folder has one)")
    info = {}
    for number, line in enumerate(read_list_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DatasetFormatError(f"{path}:{number}: expected 'Key: value', got {line!r}")
        info[key.strip()] = value.strip()
    return info


def frame_number(info: dict[str, str], phase: str, source: Path) -> int:
    try:
        return int(info[phase])
    except KeyError:
        raise DatasetFormatError(f"{source}: no {phase} field") from None
    except ValueError:
        raise DatasetFormatError(f"{source}: {phase} {info[phase]!r} is not a frame number") from None


def slice_count(image: Path, truth: Path) -> int:
    """Slices along NIfTI's last axis, from the headers only (no voxel is decompressed)."""
    import nibabel

    shapes = [nibabel.load(path).shape for path in (image, truth)]
    if len(shapes[0]) != 3:
        raise DatasetFormatError(f"{image}: expected a 3-D volume (x, y, slices), got shape {shapes[0]}")
    if shapes[0] != shapes[1]:
        raise DatasetFormatError(f"{truth}: expected a 3-D volume shaped like {image} {shapes[0]}, got {shapes[1]}")
    return int(shapes[0][2])
