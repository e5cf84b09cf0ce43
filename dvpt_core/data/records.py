"""The record every format reader returns, so the manifest, splits and preprocessing need not know formats.

One type covers both tasks: a classification sample has a ``label`` and no ``mask``; a segmentation
sample has a ``mask`` and no ``label``. 3D data (ACDC, Synapse volumes) is read slice by slice, so
a sample may point into a volume file with ``slice_index``; ``group`` (the patient) keeps every
slice of one patient in the same split, and ``volume`` lets evaluation restack the slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The split names every step uses, in the order every step reports them (DDR's own names).
SPLITS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class Sample:
    """One image (or one slice of a volume) and its annotation, as the dataset's files name it.

    ``path``: the image file (or the volume / ``.npz`` / ``.h5`` file holding the slice); not
        checked for escapes from the dataset root here (the manifest does that).
    ``label``: the class index for classification, ``None`` for segmentation.
    ``split``: one of :data:`SPLITS` where the dataset's layout names it (DDR's lists, ISIC's
        Training/Test folders), ``None`` where it does not (Kvasir-SEG, ACDC);
        ``dvpt_core.data.splits`` carves the splits a dataset lacks.
    ``mask``: the label-map file for segmentation (for Synapse the same file as ``path``, whose
        ``label`` array holds it), ``None`` for classification.
    ``group``: the patient (or case) id; samples sharing it never straddle splits. ``None`` means
        the sample is its own group.
    ``volume``: the id of the 3D volume a slice belongs to (ACDC: one per patient and frame, so a
        patient's ED and ES volumes share a group but not a volume), ``None`` for 2D images.
        Evaluation restacks a volume's slices in ``slice_index`` order.
    ``slice_index``: the slice's position in its volume, ``None`` for 2D images. Where ``path`` is
        a volume file (``.nii.gz``, ``.h5``) it also says which slice of the file to read; a
        ``.npz`` slice file holds a single slice and the index comes from its name.
    """

    path: Path
    label: int | None
    split: str | None
    mask: Path | None = None
    group: str | None = None
    volume: str | None = None
    slice_index: int | None = None

    @property
    def unit(self) -> str:
        """What splits must keep together: the group, else the file itself."""
        return self.group if self.group is not None else str(self.path)
