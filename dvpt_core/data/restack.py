"""Predicted slices back into volumes: restack, resample to the original size, write NIfTI.

The model predicts each cached slice at the training size; 3D scores and the predicted volumes
a user opens in a viewer need each volume as the dataset holds it. Slices may come in any order
(a shuffled or sharded prediction run): they are grouped by volume and put in slice-index order.

Resampling: each predicted label map (the argmax at the training size) is resized back to the
slice's original rows x columns nearest-neighbour, as the authors' released code
(``zoom(out, ..., order=0)`` after the argmax) and TransUNet do. Resizing the logits and taking
the argmax at the original size would be smoother but needs every slice's C x H x W float logits
held at once (a Synapse test split at 512 px: about 17 GB), and it is not the published protocol.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from dvpt_core.data.atomic import atomic_file
from dvpt_core.data.cases import NIFTI_SLICE_AXIS, VolumeRecord
from dvpt_core.data.formats.pixels import resize_label_map

log = logging.getLogger(__name__)


def group_slices(volumes: Sequence[str], slice_indices: Sequence[int]) -> dict[str, list[int]]:
    """Per volume id, the positions of its slices in the prediction arrays (in the order given)."""
    if len(volumes) != len(slice_indices):
        raise ValueError(f"{len(volumes)} volume ids but {len(slice_indices)} slice indices")
    positions: dict[str, list[int]] = defaultdict(list)
    for position, volume in enumerate(volumes):
        positions[str(volume)].append(position)
    return dict(positions)


def restack(record: VolumeRecord, slice_indices: Sequence[int], label_maps: Sequence[np.ndarray]) -> np.ndarray:
    """One volume's predicted label maps (any order, any one 2D size), as a uint8 volume of ``record.shape``.

    ``slice_indices[i]`` is the slice ``label_maps[i]`` predicts; together they must cover exactly
    ``record.slices``, each once."""
    order = np.argsort(np.asarray(slice_indices), kind="stable")
    found = tuple(int(slice_indices[i]) for i in order)
    if found != record.slices:
        missing = sorted(set(record.slices) - set(found))
        extra = sorted(k for k in set(found) if found.count(k) > 1 or k not in record.slices)
        raise ValueError(f"volume {record.volume}: predictions for slices {list(found)} do not match the cached "
                         f"slices {list(record.slices)} (missing {missing}, duplicated or unknown {extra})")
    resized = [resize_label_map(_as_uint8(label_maps[i], record.volume), record.in_plane) for i in order]
    return np.stack(resized, axis=record.slice_axis)


def restack_split(
    records: Mapping[str, VolumeRecord],
    volumes: Sequence[str],
    slice_indices: Sequence[int],
    label_maps: np.ndarray | Sequence[np.ndarray],
) -> Iterator[tuple[str, np.ndarray]]:
    """Every volume of a split, in ``records`` order, from its per-slice predictions (parallel
    sequences, any order). Checked as a whole first; volumes are built one at a time, so only one
    is held at the original resolution."""
    positions = group_slices(volumes, slice_indices)
    if len(label_maps) != len(volumes):
        raise ValueError(f"{len(label_maps)} predicted label maps but {len(volumes)} volume ids")
    unknown = sorted(set(positions) - set(records))
    if unknown:
        raise ValueError(f"predictions for volume(s) {unknown} that the split's records do not hold")
    absent = sorted(set(records) - set(positions))
    if absent:
        raise ValueError(f"no predictions for volume(s) {absent}")

    def volumes_in_order() -> Iterator[tuple[str, np.ndarray]]:
        for volume, record in records.items():
            at = positions[volume]
            yield volume, restack(record, [slice_indices[i] for i in at], [label_maps[i] for i in at])

    return volumes_in_order()


def _as_uint8(label_map: np.ndarray, volume: str) -> np.ndarray:
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"volume {volume}: a predicted slice must be a 2D label map, got shape {label_map.shape}")
    if label_map.dtype != np.uint8:
        if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
            raise ValueError(
                f"volume {volume}: label values {label_map.min()}..{label_map.max()} are not uint8 class indices"
            )
        label_map = label_map.astype(np.uint8)
    return label_map


def nifti_affine(record: VolumeRecord) -> np.ndarray:
    """The input NIfTI's affine; for TransUNet's arrays (no affine) a diagonal of the spacing (1 where
    unknown), as TransUNet's ``test.py`` writes its predictions (``SetSpacing((1, 1, z))``)."""
    if record.affine is not None:
        return np.asarray(record.affine, dtype=np.float64)
    spacing = record.spacing if record.spacing is not None else (1.0, 1.0, 1.0)
    return np.diag([*reversed(spacing), 1.0])


def write_nifti(path: Path, volume: np.ndarray, record: VolumeRecord) -> Path:
    """Writes a restacked label volume as NIfTI with the input's affine, atomically.

    NIfTI stores x, y, z: a NIfTI input's volume is written as it is; TransUNet's z, y, x arrays
    are transposed, so a viewer shows them the way TransUNet's own ``.nii.gz`` predictions look.
    """
    import nibabel

    if volume.shape != record.shape:
        raise ValueError(f"volume {record.volume}: shape {volume.shape} is not its record's {record.shape}")
    data = volume if record.slice_axis == NIFTI_SLICE_AXIS else volume.transpose(2, 1, 0)
    image = nibabel.Nifti1Image(np.ascontiguousarray(data, dtype=np.uint8), nifti_affine(record))
    with atomic_file(Path(path)) as tmp:
        nibabel.save(image, tmp)
    log.debug("wrote %s", path)
    return Path(path)
