"""The dataset manifest: one row per sample with what validation needs to judge it.

Every image is opened defensively, because the data come from outside: the pixel count is checked
from the header before anything is decoded (decompression bombs), the whole image is then decoded
to catch truncated or corrupt files, and paths that leave the dataset root (``..`` in a list file,
a symlink pointing elsewhere) are never opened at all. Problems become the row's ``error`` text
rather than exceptions, so validation can report every bad file at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from dvpt_core.data.parallel import map_ordered
from dvpt_core.data.records import Sample

log = logging.getLogger(__name__)

COLUMNS = ("path", "split", "label", "width", "height", "pixels", "mode", "bytes", "sha256", "readable", "error")
# Columns that stay empty when a file cannot be read: pandas' nullable integer type keeps them ints.
NULLABLE_INTS = ("width", "height", "pixels", "bytes")


def build_manifest(root: Path, samples: list[Sample], max_pixels: int) -> pd.DataFrame:
    """One row per sample, in sample order; never raises for a bad image (see ``error``)."""
    root = Path(root)
    resolved_root = root.resolve()
    rows = map_ordered(lambda s: inspect_sample(root, resolved_root, s, max_pixels), samples, desc="manifest")
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in NULLABLE_INTS:
        frame[column] = frame[column].astype("Int64")
    frame["label"] = frame["label"].astype("int64")
    frame["readable"] = frame["readable"].astype(bool)
    bad = int((~frame["readable"]).sum())
    log.info("manifest of %s: %d images, %d unreadable", root, len(frame), bad)
    return frame


def inspect_sample(root: Path, resolved_root: Path, sample: Sample, max_pixels: int) -> dict[str, Any]:
    """The manifest row of one sample."""
    row: dict[str, Any] = {
        "path": relative_path(root, sample.path),
        "split": sample.split,
        "label": sample.label,
        "width": None, "height": None, "pixels": None, "mode": None,
        "bytes": None, "sha256": None, "readable": False, "error": "",
    }
    escape = escapes_root(resolved_root, sample.path)
    if escape:
        row["error"] = escape
        return row
    try:
        data = sample.path.read_bytes()
    except OSError as err:
        row["error"] = f"cannot read file ({err.strerror or err})"
        return row
    row["bytes"] = len(data)
    row["sha256"] = hashlib.sha256(data).hexdigest()
    row.update(inspect_image(data, max_pixels))
    return row


def relative_path(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` as the list file spelled it (``..`` kept, links not followed)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def escapes_root(resolved_root: Path, path: Path) -> str:
    """Why ``path`` lies outside the dataset root once ``..`` and symlinks are resolved ("" if not)."""
    target = path.resolve()
    if target.is_relative_to(resolved_root):
        return ""
    how = "a symlink to" if _has_symlink(path) else "resolves to"
    return f"path escapes the dataset root ({how} {target})"


def _has_symlink(path: Path) -> bool:
    return any(p.is_symlink() for p in (path, *path.parents))


def inspect_image(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Size, mode and readability of encoded image bytes, checking the pixel limit before decoding."""
    info: dict[str, Any] = {"readable": False}
    try:
        # Pillow's own limits (Image.MAX_IMAGE_PIXELS) still apply on top of ``max_pixels``: above
        # them it warns, and at twice them ``open`` raises, which is recorded like any other error.
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            info.update(width=width, height=height, pixels=width * height, mode=image.mode)
            if width * height > max_pixels:
                info["error"] = f"{width}x{height} = {width * height} pixels exceeds data.max_pixels={max_pixels}"
                return info
            image.verify()
            # verify() leaves the image unusable: reopen to decode every pixel.
            with Image.open(io.BytesIO(data)) as image:
                image.load()
    # Pillow's decoders raise many exception types on hostile input (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError...); any of them means "unreadable".
    except Exception as err:  # noqa: BLE001
        info["error"] = describe_error(err)
        return info
    info["readable"] = True
    return info


def describe_error(err: Exception) -> str:
    """The error's text without the in-memory buffer repr Pillow appends to some messages."""
    if isinstance(err, UnidentifiedImageError):
        return "cannot identify image file"
    return str(err) or type(err).__name__
