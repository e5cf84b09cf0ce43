"""Reader of DDR's grading layout: ``{train,valid,test}/*.jpg`` with ``<split>.txt`` beside them.

Each list line is ``filename label``. Label 5 marks an ungradable image, which DDR's evaluation
protocol excludes (leaving 6,320 / 2,503 / 3,759 images). Lists are UTF-8 (a leading byte-order
mark is accepted); an image in a split folder that its list does not name is "unlisted". The reader only parses the lists and
checks that listed files exist: decoding and content checks belong to the manifest, so a bad
image is reported with all the others instead of stopping the first read.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.common import DatasetFormatError, read_list_text, unreferenced_images
from dvpt_core.data.records import SPLITS, Sample

log = logging.getLogger(__name__)

UNGRADABLE = 5


def detect(root: Path, data: DataConfig) -> bool:
    return (root / "train.txt").is_file() and (root / "train").is_dir()


def read(root: Path, data: DataConfig) -> list[Sample]:
    """The registry's entry point (DDR needs no settings)."""
    return read_ddr(root)


def read_ddr(root: Path) -> list[Sample]:
    """All gradable samples of a DDR-layout folder, split by split, in list-file order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DDR dataset root {root} is not a directory")
    samples: list[Sample] = []
    for split in SPLITS:
        samples.extend(read_split(root, split))
    return samples


def read_split(root: Path, split: str) -> list[Sample]:
    list_file = Path(root) / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"DDR list file {list_file} does not exist (expected {split}.txt beside {split}/)")
    samples, ungradable = [], 0
    for number, name, label in list_entries(list_file):
        if label == UNGRADABLE:
            ungradable += 1
            continue
        path = Path(root) / split / name
        if not path.is_file():
            raise FileNotFoundError(f"{list_file}:{number}: listed image {path} does not exist")
        samples.append(Sample(path=path, label=label, split=split))
    log.info("%s: %d gradable images, %d ungradable (label %d) excluded",
             list_file, len(samples), ungradable, UNGRADABLE)
    return samples


def list_entries(list_file: Path) -> list[tuple[int, str, int]]:
    """``(line number, file name, label)`` of every non-blank line of a list file."""
    lines = read_list_text(list_file).splitlines()
    return [(number, *parse_line(line, list_file, number)) for number, line in enumerate(lines, start=1)
            if line.strip()]


def unlisted(root: Path, data: DataConfig, samples: list[Sample]) -> dict[Path, str]:
    """Images in ``<split>/`` that ``<split>.txt`` does not name (ungradable ones count as named)."""
    found = {}
    for split in SPLITS:
        listed = [Path(root) / split / name for _, name, _ in list_entries(Path(root) / f"{split}.txt")]
        found.update(dict.fromkeys(unreferenced_images([Path(root) / split], listed), f"{split}.txt"))
    return found


def parse_line(line: str, list_file: Path, number: int) -> tuple[str, int]:
    """``filename label``; the file name may itself contain spaces, the label is the last field."""
    fields = line.strip().rsplit(maxsplit=1)
    if len(fields) != 2:
        raise DatasetFormatError(f"{list_file}:{number}: expected 'filename label', got {line!r}")
    name, label = fields
    try:
        return name, int(label)
    except ValueError:
        raise DatasetFormatError(f"{list_file}:{number}: label {label!r} is not an integer") from None
