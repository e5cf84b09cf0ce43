"""What evaluation needs to name a segmentation cache's cases and rebuild its 3D volumes.

A case is what one score is computed for: a 2D image (named by its file's stem, from
``splits.csv``), or a 3D volume (ACDC: a patient's frame; Synapse: a case). The cache holds 3D
volumes slice by slice at the training size, which loses each volume's shape, spacing and
orientation, and its ground truth at the original resolution. So the preprocess step also writes,
per split with volumes, ``volumes.json`` (one :class:`VolumeRecord` per volume) and, for the
evaluated splits (:data:`EVALUATED_SPLITS`), each volume's label volume at its original
resolution in ``volume_labels.npz``: the evaluate step then scores restacked predictions against
the ground truth as the dataset holds it, without reading the raw dataset again.

Array layout: a volume keeps the layout of the files it came from. NIfTI (ACDC) is x, y, z with
slices on the last axis; TransUNet's h5 volumes and npz slices (Synapse) are z, y, x with slices
on the first. ``spacing`` is per array axis in millimetres: NIfTI's pixel dimensions, converted
from the header's spatial unit. TransUNet's Synapse files carry no spacing, so it is ``None``
there and HD95 is in voxels, which is also how TransUNet's ``test.py`` (and the papers comparing
with it) report Synapse HD95.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dvpt_core.data.cache_layout import SPLITS_FILE, VOLUME_INFO_FILE, VOLUME_LABELS_FILE, VOLUMES_FILE
from dvpt_core.data.formats.common import DatasetFormatError
from dvpt_core.data.formats.pixels import H5_SUFFIX, NIFTI_SUFFIXES, NPZ_SUFFIX, MaskPolicy, read_array_slices
from dvpt_core.data.records import Sample

# The splits scored at the original resolution; training reads only the resized slices.
EVALUATED_SPLITS = ("valid", "test")
# NIfTI's spatial units (``xyzt_units``) in millimetres; "unknown" is read as mm, as every
# clinical NIfTI writer (and ACDC) means it.
MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}
NIFTI_SLICE_AXIS, ARRAY_SLICE_AXIS = 2, 0


@dataclass(frozen=True)
class VolumeRecord:
    """One volume of a split: how to put its cached slices back together and where it lies.

    ``shape``: the restacked volume's shape in the file's array layout (module docstring).
    ``slice_axis``: the axis the slices are stacked on (2 for NIfTI, 0 for TransUNet's arrays).
    ``slices``: the slice indices the cache holds, ascending; the restacked volume has them in
        this order (for NIfTI and h5 every slice of the file, for npz every cached slice file).
    ``spacing``: voxel size in mm per array axis, ``None`` where the files do not record it.
    ``affine``: the input NIfTI's 4 x 4 voxel-to-world affine, ``None`` for other files.
    """

    volume: str
    shape: tuple[int, int, int]
    slice_axis: int
    slices: tuple[int, ...]
    spacing: tuple[float, float, float] | None
    affine: tuple[tuple[float, ...], ...] | None

    @property
    def in_plane(self) -> tuple[int, int]:
        """A slice's original (rows, columns)."""
        rows, columns = (n for axis, n in enumerate(self.shape) if axis != self.slice_axis)
        return rows, columns

    @classmethod
    def from_json(cls, entry: dict) -> VolumeRecord:
        spacing, affine = entry["spacing"], entry["affine"]
        return cls(
            volume=entry["volume"], shape=tuple(entry["shape"]), slice_axis=int(entry["slice_axis"]),
            slices=tuple(entry["slices"]), spacing=None if spacing is None else tuple(spacing),
            affine=None if affine is None else tuple(tuple(row) for row in affine),
        )


def by_volume(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    """The samples of each volume, sorted by slice index; volumes in order of first appearance."""
    groups: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        if sample.volume is not None:
            groups[sample.volume].append(sample)
    return {volume: sorted(group, key=lambda s: s.slice_index) for volume, group in groups.items()}


def volume_record(volume: str, samples: Sequence[Sample]) -> VolumeRecord:
    """The record of one volume's samples (sorted by slice index), from file headers only."""
    path = samples[0].path
    slices = tuple(int(s.slice_index) for s in samples)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _nifti_record(volume, path, slices)
    if name.endswith(H5_SUFFIX):
        import h5py

        with h5py.File(path, "r") as handle:
            depth, rows, columns = handle["label"].shape
        _check_every_slice(volume, path, slices, depth)
        return VolumeRecord(volume, (depth, rows, columns), ARRAY_SLICE_AXIS, slices, None, None)
    if name.endswith(NPZ_SUFFIX):
        with np.load(path, allow_pickle=False) as npz:
            rows, columns = npz["label"].shape
        return VolumeRecord(volume, (len(slices), rows, columns), ARRAY_SLICE_AXIS, slices, None, None)
    raise DatasetFormatError(f"{path}: volume {volume} is not in a NIfTI, h5 or npz file")


def _nifti_record(volume: str, path: Path, slices: tuple[int, ...]) -> VolumeRecord:
    import nibabel

    image = nibabel.load(path)
    unit = image.header.get_xyzt_units()[0]
    if unit not in MM_PER_UNIT:
        raise DatasetFormatError(f"{path}: spatial unit {unit!r} is not one of {', '.join(MM_PER_UNIT)}")
    x, y, z = (int(n) for n in image.shape[:3])
    _check_every_slice(volume, path, slices, z)
    spacing = tuple(float(size) * MM_PER_UNIT[unit] for size in image.header.get_zooms()[:3])
    affine = tuple(tuple(float(v) for v in row) for row in image.affine)
    return VolumeRecord(volume, (x, y, z), NIFTI_SLICE_AXIS, slices, spacing, affine)


def _check_every_slice(volume: str, path: Path, slices: tuple[int, ...], depth: int) -> None:
    """A volume file's slices are all cached (readers list them all): anything else is a bug to stop at."""
    if slices != tuple(range(depth)):
        raise ValueError(f"{path}: volume {volume} has {depth} slices but the cache holds slices {list(slices)}")


def truth_volume(record: VolumeRecord, samples: Sequence[Sample], policy: MaskPolicy) -> np.ndarray:
    """The volume's label map at the original resolution, uint8 class indices, in ``record.shape``."""
    by_file: dict[Path, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_file[sample.path].append(sample)
    label_maps = {}
    for file_samples in by_file.values():
        for sample, (_, label) in zip(file_samples, read_array_slices(file_samples, policy), strict=True):
            label_maps[sample.slice_index] = label
    volume = np.stack([label_maps[k] for k in record.slices], axis=record.slice_axis)
    if volume.shape != record.shape:
        raise DatasetFormatError(
            f"{samples[0].mask}: label volume {record.volume} is {volume.shape}, expected {record.shape}"
        )
    return volume


def write_volume_cache(split_dir: Path, samples: Sequence[Sample], policy: MaskPolicy) -> None:
    """Writes ``volumes.json`` (and for an evaluated split ``volume_labels.npz``) when the split holds
    volumes. Called by the preprocess step once per segmentation split."""
    groups = by_volume(samples)
    if not groups:
        return
    records = [volume_record(volume, group) for volume, group in groups.items()]
    payload = {"volumes": [asdict(record) for record in records]}
    (Path(split_dir) / VOLUME_INFO_FILE).write_text(json.dumps(payload, indent=1) + "\n")
    if samples[0].split in EVALUATED_SPLITS:
        truths = {r.volume: truth_volume(r, groups[r.volume], policy) for r in records}
        np.savez_compressed(Path(split_dir) / VOLUME_LABELS_FILE, **truths)


def has_volumes(split_dir: Path) -> bool:
    """Whether a cached split holds 3D volumes (its cases are volumes, not images)."""
    return (Path(split_dir) / VOLUME_INFO_FILE).is_file()


def read_volume_records(split_dir: Path) -> dict[str, VolumeRecord]:
    path = Path(split_dir) / VOLUME_INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the split holds no volumes, or its cache predates "
                                "volume records (run the preprocess step again)")
    records = [VolumeRecord.from_json(entry) for entry in json.loads(path.read_text())["volumes"]]
    return {record.volume: record for record in records}


def read_truth_volume(split_dir: Path, volume: str) -> np.ndarray:
    """One volume's ground truth at its original resolution (an evaluated split only)."""
    path = Path(split_dir) / VOLUME_LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: only the {' and '.join(EVALUATED_SPLITS)} splits "
                                "keep label volumes (or the cache predates them: run the preprocess step again)")
    with np.load(path, allow_pickle=False) as npz:
        if volume not in npz.files:
            raise KeyError(f"{path} holds no label volume {volume!r}")
        return npz[volume]


def image_names(cache_dir: Path, split: str) -> list[str]:
    """The 2D cases of a cached split in cache order: each image file's stem, from ``splits.csv``."""
    with (Path(cache_dir) / SPLITS_FILE).open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == split and row["labelled"] == "1"]
    return [Path(row["path"]).stem for row in rows]


def sample_cases(split_dir: Path) -> np.ndarray:
    """Per cached sample of a segmentation split, the number of its case (cases numbered in order
    of first appearance): its volume's for a 3D slice, its own for a 2D image."""
    volumes = np.load(Path(split_dir) / VOLUMES_FILE).tolist()
    keys = [volume or f"image {i}" for i, volume in enumerate(volumes)]
    number = {key: n for n, key in enumerate(dict.fromkeys(keys))}
    return np.asarray([number[key] for key in keys], dtype=np.int64)
