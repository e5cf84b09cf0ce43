"""Reader of a CSV table naming the images, for data whose labels live in a spreadsheet.

``<root>/<data.csv_file>`` (default ``dataset.csv``) has a header row and the columns
``image`` (a path relative to the root) and, for classification, ``label`` (a class index or a
name from ``data.class_names``) or, for segmentation, ``mask`` (a path). Optional columns:
``split`` (train / valid / val / test; empty = carve it) and ``group`` (a patient id, so one
patient's images never straddle splits). The table is UTF-8 (a leading byte-order mark is
accepted); an image beside the listed ones that the table does not name is "unlisted".
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.common import SPLIT_DIRS, DatasetFormatError, read_list_text, unreferenced_images
from dvpt_core.data.records import Sample


def detect(root: Path, data: DataConfig) -> bool:
    return (root / data.csv_file).is_file()


def read(root: Path, data: DataConfig) -> list[Sample]:
    table = root / data.csv_file
    if not table.is_file():
        raise DatasetFormatError(f"{table} does not exist (data.csv_file={data.csv_file!r})")
    target = "mask" if data.task == "segmentation" else "label"
    reader = csv.DictReader(io.StringIO(read_list_text(table), newline=""))
    missing = {"image", target} - set(reader.fieldnames or [])
    if missing:
        raise DatasetFormatError(
            f"{table}: no {', '.join(sorted(missing))} column for data.task={data.task} "
            f"(columns: {', '.join(reader.fieldnames or [])})"
        )
    samples = [parse_row(row, root, f"{table}:{number}", data) for number, row in enumerate(reader, start=2)]
    if not samples:
        raise DatasetFormatError(f"{table}: no rows")
    return samples


def unlisted(root: Path, data: DataConfig, samples: list[Sample]) -> dict[Path, str]:
    """Images in the folders the table draws from (its images' and masks') that it does not name."""
    files = [p for s in samples for p in (s.path, s.mask) if p is not None]
    return dict.fromkeys(unreferenced_images({p.parent for p in files}, files), data.csv_file)


def parse_row(row: dict[str, str], root: Path, where: str, data: DataConfig) -> Sample:
    image = existing(root, row["image"], where)
    split = (row.get("split") or "").strip() or None
    if split is not None and split not in SPLIT_DIRS:
        raise DatasetFormatError(f"{where}: split {split!r} is not one of {', '.join(SPLIT_DIRS)}")
    group = (row.get("group") or "").strip() or None
    split = SPLIT_DIRS[split] if split else None
    if data.task == "segmentation":
        return Sample(path=image, label=None, split=split, mask=existing(root, row["mask"], where), group=group)
    return Sample(path=image, label=parse_label(row["label"], data.class_names, where), split=split, group=group)


def existing(root: Path, name: str, where: str) -> Path:
    path = root / name.strip()
    if not name.strip() or not path.is_file():
        raise FileNotFoundError(f"{where}: listed file {path} does not exist")
    return path


def parse_label(value: str, class_names: list[str], where: str) -> int:
    """A class index or a class name."""
    value = value.strip()
    if value in class_names:
        return class_names.index(value)
    try:
        return int(value)
    except ValueError:
        raise DatasetFormatError(f"{where}: label {value!r} is neither an integer nor one of {class_names}") from None
