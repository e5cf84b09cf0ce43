"""The dataset manifest: one row per sample with the facts validation judges it by.

Every file is opened defensively, because the data come from outside: paths that leave the
dataset root (``..`` in a list file, a symlink pointing elsewhere) are never opened at all, empty
files are not handed to a decoder, the pixel (or voxel) count is checked from the header before
anything is decoded (decompression bombs), and the whole image, mask or volume is then decoded to
catch truncated or corrupt files. Problems become columns of the row rather than exceptions, so
validation can report every bad file at once. The manifest records facts; what is acceptable
(modes, class indices, binary masks, split rules) is decided by the validate step's suite.

Columns, per sample (a slice of a volume is a sample; its file facts are the volume's):

- what the reader said: ``path`` (relative to the root, as listed), ``split`` (as the dataset
  names it, empty where it does not), ``label``, ``mask``, ``group``, ``volume``, ``slice_index``;
- ``kind``: ``image`` (an encoded 2D file), ``volume`` (NIfTI or ``.h5``, 3D expected) or
  ``slice`` (a TransUNet ``.npz`` holding one 2D slice);
- the image file: ``inside_root``, ``bytes``, ``sha256``, ``width``/``height``/``pixels`` (of one
  slice for arrays), ``voxels`` (arrays: the whole array), ``shape`` (``WxH`` for images, the
  array shape for arrays),
  ``mode`` (Pillow's, images only), ``dtype`` and ``ndim`` (arrays only), ``decoded`` (null when
  an earlier problem meant it was not tried), ``readable`` (all of that passed) and ``error``;
- the mask file, with the same facts prefixed ``mask_`` (for ``.npz``/``.h5`` the ``label`` array
  of the same file, whose ``mask_sha256`` is then empty: ``sha256`` covers it), plus its values: ``mask_values`` (the distinct values, up to
  :data:`MAX_LISTED_VALUES`), ``mask_distinct``, ``mask_min``, ``mask_max``, ``mask_lossy`` (a
  JPEG, whose values are never exact), ``mask_ambiguous`` (the share of pixels within
  :data:`AMBIGUITY` of the binarisation threshold) and ``mask_integral`` (no fractional labels).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from dvpt_core.data.parallel import map_ordered
from dvpt_core.data.records import Sample

log = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("path", "split", "label", "mask", "group", "volume", "slice_index", "kind")
FILE_FACTS = ("inside_root", "bytes", "sha256", "width", "height", "pixels", "voxels", "shape", "mode", "dtype", "ndim",
              "decoded", "readable", "error")
MASK_FACTS = ("values", "distinct", "min", "max", "lossy", "ambiguous", "integral")
COLUMNS = (
    *SAMPLE_COLUMNS,
    *FILE_FACTS,
    *(f"mask_{name}" for name in (*FILE_FACTS, *MASK_FACTS)),
)
INT_COLUMNS = ("label", "slice_index", "bytes", "width", "height", "pixels", "voxels", "ndim",
               "mask_bytes", "mask_width", "mask_height", "mask_pixels", "mask_voxels", "mask_ndim",
               "mask_distinct", "mask_min", "mask_max")
BOOL_COLUMNS = ("inside_root", "decoded", "mask_inside_root", "mask_decoded", "mask_readable",
                "mask_lossy", "mask_integral")
MAX_LISTED_VALUES = 16
# A lossy (JPEG) binary mask pixel this close to the threshold is neither clearly in nor out.
AMBIGUITY = 64
LOSSY_SUFFIXES = frozenset({".jpg", ".jpeg"})
NIFTI_SUFFIXES = (".nii", ".nii.gz")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".h5")
SLICE_SUFFIXES = (".npz",)
# Arrays: the total voxel count may reach this many slices of ``max_pixels`` each (a real CT is
# a few hundred slices of 512 x 512; a header claiming far more is a decompression bomb).
MAX_SLICES_AT_LIMIT = 64


def build_manifest(
    root: Path, samples: Sequence[Sample], max_pixels: int, *, mask_threshold: int,
    link_roots: Sequence[Path] = (),
) -> pd.DataFrame:
    """One row per sample, in sample order; never raises for a bad file (see the columns).

    Each distinct (file, mask) pair is inspected once, so a volume serves all its slices.
    ``link_roots``: directories outside ``root`` that files may still resolve into (a DVC cache
    checked out with ``cache.type: symlink``).
    """
    root = Path(root)
    allowed = (root.resolve(), *(Path(p).resolve() for p in link_roots))
    pairs = list(dict.fromkeys((s.path, s.mask) for s in samples))
    facts = dict(zip(pairs, map_ordered(
        lambda pair: inspect_pair(root, allowed, pair[0], pair[1], max_pixels, mask_threshold), pairs,
        desc="manifest",
    )))
    rows = [{**sample_columns(root, s), **facts[s.path, s.mask]} for s in samples]
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for column in INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    for column in BOOL_COLUMNS:
        frame[column] = frame[column].astype("boolean")
    frame["readable"] = frame["readable"].astype(bool)
    frame["mask_ambiguous"] = frame["mask_ambiguous"].astype("Float64")
    bad = int((~frame["readable"]).sum())
    log.info("manifest of %s: %d samples from %d files, %d unreadable", root, len(frame), len(pairs), bad)
    return frame


def read_manifest(path: Path, root: Path) -> tuple[list[Sample], list[str], list[str | None]]:
    """The samples a written manifest (``manifest.csv``) lists, under ``root``, in its order, with
    the image and mask sha256 it recorded: what a later step reads instead of listing the dataset
    again. ``split`` is the split the dataset names (``named_split``; the planner assigns the rest).
    """
    # Every column as text, nothing guessed: a patient id "007" or "NA" must stay as written.
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"path", "named_split", "label", "mask", "group", "volume", "slice_index", "sha256",
               "mask_sha256"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: not a validation manifest (no {', '.join(sorted(missing))} column)")
    root = Path(root)

    def optional(value: str) -> str | None:
        return value or None

    samples = [
        Sample(path=root / row["path"], label=int(row["label"]) if row["label"] else None,
               split=optional(row["named_split"]), mask=root / row["mask"] if row["mask"] else None,
               group=optional(row["group"]), volume=optional(row["volume"]),
               slice_index=int(row["slice_index"]) if row["slice_index"] else None)
        for row in frame.to_dict("records")
    ]
    return samples, frame["sha256"].tolist(), [optional(v) for v in frame["mask_sha256"]]


def sample_columns(root: Path, sample: Sample) -> dict[str, Any]:
    return {
        "path": relative_path(root, sample.path),
        "split": sample.split,
        "label": sample.label,
        "mask": None if sample.mask is None else relative_path(root, sample.mask),
        "group": sample.group,
        "volume": sample.volume,
        "slice_index": sample.slice_index,
        "kind": file_kind(sample.path),
    }


def file_kind(path: Path) -> str:
    name = Path(path).name.lower()
    if name.endswith(VOLUME_SUFFIXES):
        return "volume"
    if name.endswith(SLICE_SUFFIXES):
        return "slice"
    return "image"


def relative_path(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` as the list file spelled it (``..`` kept, links not followed)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(os.path.relpath(path, root)).as_posix()


def escapes_root(allowed: Sequence[Path], path: Path) -> str:
    """Why ``path`` lies outside the dataset root once ``..`` and symlinks are resolved ("" if not).

    ``allowed``: the resolved dataset root, then any other directories links may point into.
    """
    target = Path(path).resolve()
    if any(target.is_relative_to(base) for base in allowed):
        return ""
    how = "a symlink to" if _has_symlink(Path(path)) else "resolves to"
    return f"path escapes the dataset root ({how} {target})"


def _has_symlink(path: Path) -> bool:
    return any(p.is_symlink() for p in (path, *path.parents))


def inspect_pair(
    root: Path, allowed: Sequence[Path], path: Path, mask: Path | None, max_pixels: int, threshold: int
) -> dict[str, Any]:
    """The file facts of one image (or array file) and its mask, as manifest columns."""
    kind = file_kind(path)
    image, data = read_file(allowed, path)
    if data is not None:
        image.update(inspect_image(data, max_pixels) if kind == "image" else inspect_array_file(path, kind, max_pixels))
    row = _finish(image)
    if mask is not None:
        facts = inspect_mask(allowed, Path(path), Path(mask), row, max_pixels, threshold)
        row.update({f"mask_{key}": value for key, value in facts.items()})
    return row


def inspect_mask(
    allowed: Sequence[Path], path: Path, mask: Path, image: dict[str, Any], max_pixels: int, threshold: int
) -> dict[str, Any]:
    """The facts of a mask: its own file, or for TransUNet's arrays the ``label`` array beside the image."""
    if mask == path and file_kind(path) != "image":
        facts = {"inside_root": image["inside_root"], "bytes": image.get("bytes")}
        if image["inside_root"] and image.get("bytes"):
            facts.update(inspect_array_file(path, file_kind(path), max_pixels, array="label", threshold=threshold))
        else:
            facts["error"] = image["error"]
        return _finish(facts)
    facts, data = read_file(allowed, mask)
    if data is not None:
        kind = file_kind(mask)
        facts.update(inspect_mask_image(data, max_pixels, threshold, mask) if kind == "image"
                     else inspect_array_file(mask, kind, max_pixels, array="label", threshold=threshold))
    return _finish(facts)


def _finish(facts: dict[str, Any]) -> dict[str, Any]:
    """``readable`` is True only when nothing went wrong; ``error`` holds the first problem."""
    facts["error"] = facts.get("error") or ""
    facts["readable"] = not facts["error"]
    return facts


def read_file(allowed: Sequence[Path], path: Path) -> tuple[dict[str, Any], bytes | None]:
    """Root, size and hash facts, and the bytes to decode (None when a problem already rules it out)."""
    facts: dict[str, Any] = {"inside_root": False}
    escape = escapes_root(allowed, path)
    if escape:
        facts["error"] = escape
        return facts, None
    facts["inside_root"] = True
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        facts["error"] = f"cannot read file ({err.strerror or err})"
        return facts, None
    facts["bytes"] = len(data)
    facts["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        facts["error"] = "empty file (0 bytes)"
        return facts, None
    return facts, data


def inspect_image(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Size, mode and decodability of encoded image bytes, checking the pixel limit before decoding."""
    info: dict[str, Any] = {}
    try:
        # Pillow's own limits (Image.MAX_IMAGE_PIXELS) still apply on top of ``max_pixels``: above
        # them it warns, and at twice them ``open`` raises, which is recorded like any other error.
        with Image.open(io.BytesIO(data)) as image:
            _header(info, image.size, image.mode)
            if info["pixels"] > max_pixels:
                info["error"] = over_limit(info, max_pixels)
                return info
            image.verify()
        # verify() leaves the image unusable: reopen to decode every pixel.
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    # Pillow's decoders raise many exception types on hostile input (OSError, SyntaxError,
    # ValueError, struct.error, DecompressionBombError...); any of them means "unreadable".
    except Exception as err:  # noqa: BLE001
        info.update(decoded=False, error=f"unreadable image ({describe_error(err)})")
        return info
    info["decoded"] = True
    return info


def inspect_mask_image(data: bytes, max_pixels: int, threshold: int, path: Path) -> dict[str, Any]:
    """:func:`inspect_image`, plus the mask's values (greyscale for colour modes, indices otherwise)."""
    info = inspect_image(data, max_pixels)
    info["lossy"] = path.suffix.lower() in LOSSY_SUFFIXES
    if not info.get("decoded"):
        return info
    try:
        with Image.open(io.BytesIO(data)) as image:
            plain = image.mode in ("1", "L", "P") or image.mode.startswith("I")
            values = np.asarray(image if plain else image.convert("L")).astype(np.int64)
    except Exception as err:  # noqa: BLE001
        info.update(decoded=False, error=f"unreadable image ({describe_error(err)})")
        return info
    info.update(mask_values(values, threshold), integral=True)
    return info


def inspect_array_file(
    path: Path, kind: str, max_pixels: int, array: str = "image", threshold: int | None = None
) -> dict[str, Any]:
    """Shape, dtype and decodability of one array of a NIfTI, ``.h5`` or ``.npz`` file.

    NIfTI holds one array per file (a label volume is its own ``_gt`` file); TransUNet's files hold
    ``image`` and ``label``. The voxel count is read from the header before any data."""
    info: dict[str, Any] = {}
    try:
        values = _load_array(Path(path), array, max_pixels, info)
    except Exception as err:  # noqa: BLE001  (nibabel, h5py, zipfile and zlib raise many types)
        if not info.get("error"):
            info.update(decoded=False, error=f"unreadable {kind} ({describe_error(err)})")
        return info
    if values is None:  # over the limit: ``error`` is set, nothing was decoded
        return info
    info["decoded"] = True
    if threshold is not None:
        info["lossy"] = False
        rounded = np.rint(values)
        info.update(mask_values(rounded.astype(np.int64), threshold), integral=bool(np.array_equal(rounded, values)))
    return info


def _load_array(path: Path, array: str, max_pixels: int, info: dict[str, Any]) -> np.ndarray | None:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        import nibabel

        proxy = nibabel.load(path)
        # NIfTI: (x, y, z), slices on the last axis.
        if not _array_header(info, tuple(proxy.shape), str(proxy.get_data_dtype()), max_pixels, plane=(0, 1)):
            return None
        return np.asanyarray(proxy.dataobj)
    if name.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as handle:
            if array not in handle:
                raise KeyError(f"no {array!r} array (has {', '.join(handle.keys())})")
            dataset = handle[array]
            # TransUNet's volumes: (z, y, x), slices on the first axis.
            if not _array_header(info, tuple(dataset.shape), str(dataset.dtype), max_pixels, plane=(-1, -2)):
                return None
            return dataset[()]
    with np.load(path, allow_pickle=False) as npz:
        if array not in npz.files:
            raise KeyError(f"no {array!r} array (has {', '.join(npz.files)})")
        values = npz[array]
    # An .npz is decompressed to read its header; the limit still keeps oversized slices out.
    return values if _array_header(info, values.shape, str(values.dtype), max_pixels, plane=(1, 0)) else None


def _array_header(
    info: dict[str, Any], shape: tuple[int, ...], dtype: str, max_pixels: int, plane: tuple[int, int]
) -> bool:
    """Records shape facts; False (with ``error`` set) when the array is empty or exceeds the limits.

    ``pixels`` is the size of one slice (the ``plane`` axes: width, height), held to
    ``max_pixels`` like a 2D image; ``voxels`` counts the whole array, held to
    ``max_pixels * MAX_SLICES_AT_LIMIT`` so a header claiming absurd depth is refused too.
    """
    info.update(shape="x".join(str(n) for n in shape), ndim=len(shape), dtype=dtype,
                voxels=int(np.prod(shape, dtype=np.int64)))
    if len(shape) >= 2:
        info.update(width=int(shape[plane[0]]), height=int(shape[plane[1]]))
        info["pixels"] = info["width"] * info["height"]
    else:
        info["pixels"] = info["voxels"]
    if info["voxels"] == 0:
        info["error"] = f"{info['shape']}: an empty array (0 voxels; not decoded)"
    elif info["pixels"] > max_pixels:
        info["error"] = over_limit(info, max_pixels)
    elif info["voxels"] > max_pixels * MAX_SLICES_AT_LIMIT:
        info["error"] = (f"{info['shape']} = {info['voxels']} voxels exceeds data.max_pixels x "
                         f"{MAX_SLICES_AT_LIMIT} = {max_pixels * MAX_SLICES_AT_LIMIT} (not decoded)")
    return not info.get("error")


def _header(info: dict[str, Any], size: tuple[int, int], mode: str) -> None:
    width, height = size
    info.update(width=width, height=height, pixels=width * height, mode=mode, shape=f"{width}x{height}")


def over_limit(info: dict[str, Any], max_pixels: int) -> str:
    size = f"{info['width']}x{info['height']}"
    what = size if info["shape"] == size else f"{info['shape']}: a {size} slice"
    return f"{what} = {info['pixels']} pixels exceeds data.max_pixels={max_pixels} (not decoded)"


def mask_values(values: np.ndarray, threshold: int) -> dict[str, Any]:
    """The distinct values of a label map and how many pixels sit near the binarisation threshold."""
    distinct = np.unique(values)
    shown = ",".join(str(int(v)) for v in distinct[:MAX_LISTED_VALUES])
    near = np.abs(values - threshold) < AMBIGUITY
    return {
        "values": shown + (",..." if len(distinct) > MAX_LISTED_VALUES else ""),
        "distinct": len(distinct),
        "min": int(distinct[0]) if len(distinct) else None,
        "max": int(distinct[-1]) if len(distinct) else None,
        "ambiguous": float(near.mean()) if values.size else 0.0,
    }


def describe_error(err: Exception) -> str:
    """The error's text without the in-memory buffer repr Pillow appends to some messages."""
    if isinstance(err, UnidentifiedImageError):
        return "cannot identify image file"
    return str(err) or type(err).__name__
