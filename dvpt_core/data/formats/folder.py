"""Reader of a plain image folder, for users whose data follows no published layout.

Classification: ``<class name>/<image>`` folders, named as ``data.class_names`` (whose order
gives the label indices), as torchvision's ``ImageFolder`` expects. Segmentation
(``data.task: segmentation``): ``images/<id>.<ext>`` with ``masks/<id>.<ext>`` (mask values are
class indices, or a binary mask thresholded; see ``pixels``). Either may sit under
``train/``, ``valid/`` (or ``val/``) and ``test/`` folders, which then fix the splits; splits
without a folder are carved by ``dvpt_core.data.splits``.
"""

from __future__ import annotations

from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.common import SPLIT_DIRS, DatasetFormatError, image_files, pair_by_stem, require_dir
from dvpt_core.data.records import Sample


def detect(root: Path, data: DataConfig) -> bool:
    return any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())


def read(root: Path, data: DataConfig) -> list[Sample]:
    split_dirs = sorted((SPLIT_DIRS[p.name], p) for p in root.iterdir() if p.is_dir() and p.name in SPLIT_DIRS)
    parts: list[tuple[str | None, Path]] = list(split_dirs) or [(None, root)]
    samples = []
    for split, base in parts:
        if data.task == "segmentation":
            samples += read_segmentation(base, split)
        else:
            samples += read_classes(base, split, data.class_names)
    return samples


def read_segmentation(base: Path, split: str | None) -> list[Sample]:
    images = require_dir(base / "images", "image folder (data.task=segmentation)")
    masks = require_dir(base / "masks", "mask folder (data.task=segmentation)")
    return [Sample(path=image, label=None, split=split, mask=mask) for image, mask in pair_by_stem(images, masks)]


def read_classes(base: Path, split: str | None, class_names: list[str]) -> list[Sample]:
    folders = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in class_names]
    if unknown:
        hint = " (images/ and masks/ look like segmentation: set data.task=segmentation)" \
            if {"images", "masks"} <= set(folders) else ""
        raise DatasetFormatError(f"{base}: folder(s) {unknown} are not in data.class_names {class_names}{hint}")
    samples = [
        Sample(path=path, label=index, split=split)
        for index, name in enumerate(class_names) if (base / name).is_dir()
        for path in image_files(base / name)
    ]
    if not samples:
        raise DatasetFormatError(f"{base}: no images in class folders named as data.class_names {class_names}")
    return samples
