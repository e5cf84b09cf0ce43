"""What several format readers share: the error type, image suffixes, reading list files, pairing
images with masks."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Image files the 2D readers pick up (lower-case suffixes; matching ignores case).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
# Split folder names users give, mapped to the split names every step uses.
SPLIT_DIRS = {"train": "train", "valid": "valid", "val": "valid", "test": "test"}
BOM = "\ufeff"


class DatasetFormatError(ValueError):
    """Files that do not follow the dataset's on-disk format; the message names the file."""


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetFormatError(f"{what}: {path} is not a directory")
    return path


def read_list_text(path: Path) -> str:
    """A list file's text: UTF-8, a leading byte-order mark (Windows editors write one) dropped.

    Anything else is refused naming the file and line: bytes that are not UTF-8 (a list saved in
    a legacy code page), and a byte-order mark inside the text (lists concatenated with their
    marks), which would otherwise become an invisible first character of a file name.
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetFormatError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            "save the list as UTF-8"
        ) from None
    if BOM in text:
        line = text[:text.index(BOM)].count("\n") + 1
        raise DatasetFormatError(f"{path}:{line}: a byte-order mark (U+FEFF) inside the text, e.g. from "
                                 "concatenated lists; remove it")
    return text


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def unreferenced_images(folders: Iterable[Path], referenced: Iterable[Path]) -> list[Path]:
    """The image files directly inside ``folders`` that are not among ``referenced``, by normalised path."""
    known = {os.path.normpath(p) for p in referenced}
    return [p for folder in sorted(set(folders)) if folder.is_dir()
            for p in image_files(folder) if os.path.normpath(p) not in known]


def matching_files(folder: Path, pattern: re.Pattern[str]) -> list[tuple[Path, re.Match[str]]]:
    """Files in ``folder`` whose whole name matches ``pattern``, sorted by name, with the match."""
    found = ((path, pattern.fullmatch(path.name)) for path in sorted(folder.iterdir()) if path.is_file())
    return [(path, match) for path, match in found if match is not None]


def pair_by_stem(images_dir: Path, masks_dir: Path) -> list[tuple[Path, Path]]:
    """``(image, mask)`` for every image in ``images_dir``, matched to the mask with the same stem.

    An image without its mask is an error naming it (a silently dropped image would shrink the
    dataset unnoticed); a mask without an image is ignored.
    """
    masks = {p.stem: p for p in image_files(masks_dir)}
    pairs, missing = [], []
    for image in image_files(images_dir):
        if image.stem in masks:
            pairs.append((image, masks[image.stem]))
        else:
            missing.append(image.name)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetFormatError(f"{masks_dir}: no mask for image(s) {shown} of {images_dir}")
    if not pairs:
        raise DatasetFormatError(f"{images_dir}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return pairs


def check_arrays(arrays: Mapping[str, Any], ndim: int, source: Path) -> None:
    """An array file (TransUNet's ``.npz``, ``.h5``) must hold ``image`` and ``label`` of one ``ndim``-D shape.

    ``arrays`` maps names to anything with a ``shape`` (numpy arrays, h5py datasets)."""
    missing = {"image", "label"} - set(arrays.keys())
    if missing:
        raise DatasetFormatError(f"{source}: no {', '.join(sorted(missing))} array (has {', '.join(arrays.keys())})")
    check_same_shape((arrays["image"].shape, arrays["label"].shape), ndim, source)


def check_same_shape(shapes: tuple[tuple[int, ...], tuple[int, ...]], ndim: int, source: Path) -> None:
    if len(shapes[0]) != ndim or shapes[0] != shapes[1]:
        raise DatasetFormatError(
            f"{source}: expected {ndim}-D image and label of one shape, got {shapes[0]} and {shapes[1]}"
        )
