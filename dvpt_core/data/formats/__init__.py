"""Readers of the on-disk dataset formats users hold, keyed by ``data.format``.

Every reader returns :class:`~dvpt_core.data.records.Sample` records and only checks the layout
(folders, names, list files, volume headers); decoding pixels is left to ``pixels`` and content
checks to the manifest, so a bad image is reported with all the others instead of stopping the
first read. ``data.format: auto`` picks the first format whose layout the root matches, most
specific first. Formats whose lists name the files (DDR's ``<split>.txt``, a ``csv`` table) can
also say which image files lie in their folders unlisted (``FormatSpec.unlisted``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats import acdc, ddr, folder, isic, kvasir, synapse, table
from dvpt_core.data.formats.common import DatasetFormatError
from dvpt_core.data.formats.pixels import MaskPolicy
from dvpt_core.data.records import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FormatSpec:
    """How to recognise a format's layout and read it."""

    detect: Callable[[Path, DataConfig], bool]
    read: Callable[[Path, DataConfig], list[Sample]]
    # Image files in the folders the lists draw from that no list names, each with the list that
    # would name it; None where the format reads every file of its layout.
    unlisted: Callable[[Path, DataConfig, list[Sample]], dict[Path, str]] | None = None


# In detection order: published layouts first, the generic table and folder last.
FORMATS: dict[str, FormatSpec] = {
    "ddr": FormatSpec(ddr.detect, ddr.read, ddr.unlisted),
    "isic2016": FormatSpec(isic.detect, isic.read),
    "acdc": FormatSpec(acdc.detect, acdc.read),
    "synapse": FormatSpec(synapse.detect, synapse.read),
    "kvasir": FormatSpec(kvasir.detect, kvasir.read),
    "csv": FormatSpec(table.detect, table.read, table.unlisted),
    "folder": FormatSpec(folder.detect, folder.read),
}


def detect_format(root: Path, data: DataConfig | None = None) -> str:
    """The name of the first format whose layout ``root`` matches."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    data = data or DataConfig()
    for name, spec in FORMATS.items():
        if spec.detect(root, data):
            return name
    raise DatasetFormatError(
        f"{root}: no known dataset layout (DDR lists, Kvasir-SEG images/+masks/, ISIC 2016 folders, "
        f"ACDC training/patientNNN, Synapse train_npz/ or test_vol_h5/, {data.csv_file}, class folders); "
        "set data.format"
    )


def resolve_data_config(data: DataConfig, root: Path) -> DataConfig:
    """``data`` with ``format: auto`` replaced by the detected format and that format's defaults
    (task, class names, folds) filled in where the configuration did not set them."""
    if data.format != "auto":
        return data
    detected = detect_format(root, data)
    log.info("data.format=auto: %s looks like %s", root, detected)
    return DataConfig.model_validate({**data.model_dump(exclude_unset=True), "format": detected})


def read_dataset(data: DataConfig, root: Path) -> list[Sample]:
    """The usable samples of the dataset at ``root``, read with ``data.format``'s reader."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    data = resolve_data_config(data, root)
    samples = FORMATS[data.format].read(root, data)
    check_task(samples, data)
    return samples


def unlisted_files(data: DataConfig, root: Path, samples: list[Sample]) -> dict[Path, str]:
    """Image files beside the listed ones that the format's lists do not name (see ``FormatSpec``)."""
    spec = FORMATS[resolve_data_config(data, root).format]
    return {} if spec.unlisted is None else spec.unlisted(Path(root), data, samples)


def check_task(samples: list[Sample], data: DataConfig) -> None:
    """Classification needs labels, segmentation masks: say which key to change if they do not match."""
    key = "mask" if data.task == "segmentation" else "label"
    lacking = [s for s in samples if getattr(s, key) is None]
    if lacking:
        raise DatasetFormatError(
            f"data.task={data.task} but {len(lacking)} sample(s) of format {data.format} have no {key} "
            f"(first: {lacking[0].path}); set data.task"
        )


def mask_policy(data: DataConfig) -> MaskPolicy:
    """How this dataset's mask values become class indices."""
    lut = synapse.btcv_lut() if data.format == "synapse" and data.synapse_labels == "btcv13" else None
    return MaskPolicy(num_classes=data.num_classes, threshold=data.mask_threshold, lut=lut)


__all__ = ["FORMATS", "DatasetFormatError", "detect_format", "mask_policy", "read_dataset", "resolve_data_config",
           "unlisted_files"]
