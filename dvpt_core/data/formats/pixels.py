"""Decoding a sample's pixels, whatever file holds them, under one stated policy.

Images: every image becomes 3-channel uint8 RGB, because the ViT backbones are pretrained on RGB:
greyscale is replicated to the three channels, alpha is dropped, palette images are expanded.
16-bit or float greyscale files are scaled from their own min-max to 0-255.
Volume slices: CT in TransUNet's ``.npz`` / ``.h5`` files is already clipped to [-125, 275] HU and
scaled to [0, 1], so it maps linearly to 0-255. MRI in NIfTI has no fixed scale: each volume is
scaled from its 0.5th to its 99.5th intensity percentile, once for the whole volume, so the
slices of one volume stay comparable and a few hot voxels do not darken the rest.
Masks: single-channel uint8 maps of class indices. With two classes (background + one structure)
a mask holding values above 1 is thresholded at ``data.mask_threshold``: JPEG masks (Kvasir-SEG)
are lossy and never exactly 0/255, and 0/255 PNGs (ISIC) come out the same. With more classes
the values must already be class indices (palette or greyscale PNG, NIfTI, arrays): a lossy JPEG
or a colour-coded RGB mask is refused, since its values cannot be trusted as indices.
Resizing: images bilinear (antialiased), masks nearest-neighbour, so no new label values appear.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dvpt_core.data.formats.common import DatasetFormatError, check_arrays, check_same_shape
from dvpt_core.data.manifest import describe_error
from dvpt_core.data.records import Sample

# Files that hold a whole volume; a sample's ``slice_index`` selects its slice. NIfTI stores
# slices on the last axis (x, y, z); TransUNet's h5 volumes on the first (z, y, x).
NIFTI_SUFFIXES = (".nii", ".nii.gz")
H5_SUFFIX = ".h5"
NPZ_SUFFIX = ".npz"
MRI_PERCENTILES = (0.5, 99.5)
HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})
INDEX_MODES = frozenset({"P", "L", "1", "I", "I;16", "I;16B", "I;16L"})
JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})

Pair = tuple[np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class MaskPolicy:
    """How raw mask values become class indices (see the module docstring)."""

    num_classes: int
    threshold: int
    # raw value -> class index, for label sets that must be remapped (Synapse's 13 BTCV organs).
    lut: np.ndarray | None = None


def holds_slices(path: Path) -> bool:
    """Whether ``path`` is an array file (volume or slice) rather than an encoded 2D image."""
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES) or name.endswith((H5_SUFFIX, NPZ_SUFFIX))


def load_resized(samples: Sequence[Sample], size: int, policy: MaskPolicy, max_pixels: int) -> list[Pair]:
    """``size`` x ``size`` (RGB image, label map or None) of samples that share one file.

    A volume file is decoded once for all its slices; a 2D image uses JPEG draft mode, which lets
    libjpeg decode at a reduced scale (still at least ``size``) and cuts the time several-fold.
    """
    if holds_slices(samples[0].path):
        return [resize_pair(image, mask, size) for image, mask in read_array_slices(samples, policy)]
    (sample,) = samples
    image, (width, height) = decode_image(sample.path.read_bytes(), size, max_pixels, sample.path)
    if sample.mask is None:
        return [(image, None)]
    mask = read_mask(sample.mask, policy)
    if mask.shape != (height, width):
        raise DatasetFormatError(
            f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.path} is {width}x{height}"
        )
    return [(image, resize_mask(mask, size))]


def decode_image(data: bytes, size: int, max_pixels: int, source: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB ``size`` x ``size`` uint8 array of encoded image bytes (aspect ratio not kept), and the
    original (width, height). The pixel count is checked before decoding (decompression bombs)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"{width}x{height} pixels exceeds data.max_pixels={max_pixels}")
            image.draft("RGB", (size, size))
            rgb = to_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8), (width, height)
    except Exception as err:  # noqa: BLE001  (Pillow raises many types; name the file whatever it was)
        raise ValueError(f"{source}: cannot preprocess image ({err}); run the validate step first") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB policy: greyscale replicated, alpha dropped, high-bit greyscale min-max scaled."""
    if image.mode in HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        return Image.fromarray(scale_to_uint8(values, float(values.min()), float(values.max()))).convert("RGB")
    return image.convert("RGB")


def read_mask(path: Path, policy: MaskPolicy) -> np.ndarray:
    """The label map (H x W uint8 class indices) of a 2D mask file."""
    lossy = path.suffix.lower() in JPEG_SUFFIXES
    if lossy and policy.num_classes > 2:
        raise DatasetFormatError(
            f"{path}: a JPEG mask is lossy, so it can only be thresholded into a binary mask, but "
            f"data.class_names has {policy.num_classes} classes; save multi-class masks as PNG"
        )
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in INDEX_MODES:
                values = np.asarray(image).astype(np.int64)
            elif policy.num_classes == 2:
                values = np.asarray(image.convert("L")).astype(np.int64)
            else:
                values = None
    # Pillow: UnidentifiedImageError (an OSError) for what it cannot identify, OSError for a
    # truncated or corrupt file; neither names the file by itself.
    except OSError as err:
        raise DatasetFormatError(f"{path}: unreadable mask ({describe_error(err)}); run the validate step") from None
    if values is None:
        raise DatasetFormatError(
            f"{path}: a {mode} mask cannot hold {policy.num_classes} class indices; "
            "save it as a single-channel or palette PNG whose values are the class indices"
        )
    return to_label_map(values, policy, path)


def to_label_map(values: np.ndarray, policy: MaskPolicy, source: Path) -> np.ndarray:
    """Raw integer mask values -> uint8 class indices, under the policy of the module docstring."""
    if values.size and values.min() < 0:
        raise DatasetFormatError(f"{source}: negative mask value {values.min()}")
    if policy.lut is not None:
        if values.max(initial=0) >= len(policy.lut):
            raise DatasetFormatError(f"{source}: mask value {values.max()} has no class (known: 0-{len(policy.lut) - 1})")
        values = policy.lut[values]
    top = int(values.max(initial=0))
    if policy.num_classes == 2 and top > 1:
        return (values >= policy.threshold).astype(np.uint8)
    if top >= policy.num_classes:
        found = np.unique(values)
        raise DatasetFormatError(
            f"{source}: mask values {found[:12].tolist()} are not class indices 0-{policy.num_classes - 1} "
            f"(data.class_names has {policy.num_classes} classes)"
        )
    return values.astype(np.uint8)


def read_array_slices(samples: Sequence[Sample], policy: MaskPolicy) -> list[Pair]:
    """Full-size (greyscale uint8 H x W, label map) of samples stored in one array file."""
    path = samples[0].path
    name = path.name.lower()
    if name.endswith(NPZ_SUFFIX):
        images, labels = _npz_arrays(path)
        return [(unit_to_uint8(images, path), to_label_map(_integral(labels, path), policy, path))]
    if name.endswith(H5_SUFFIX):
        images, labels = read_h5(path)
        scaled = unit_to_uint8(images, path)
    else:
        images, labels = read_nifti_pair(path, samples[0].mask)
        scaled, labels = np.moveaxis(mri_to_uint8(images), -1, 0), np.moveaxis(labels, -1, 0)
    label_maps = to_label_map(_integral(labels, path), policy, samples[0].mask or path)
    return [(scaled[s.slice_index], label_maps[s.slice_index]) for s in samples]


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    check_arrays(arrays, 2, path)
    return arrays["image"], arrays["label"]


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """TransUNet's test volume: ``image`` and ``label`` datasets, slices on the first axis."""
    import h5py

    with h5py.File(path, "r") as handle:
        check_arrays(handle, 3, path)
        return handle["image"][()], handle["label"][()]


def read_nifti_pair(image_path: Path, mask_path: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI volume and its label volume as arrays (x, y, z)."""
    import nibabel

    if mask_path is None:
        raise DatasetFormatError(f"{image_path}: a volume sample needs its label volume")
    image = nibabel.load(image_path).get_fdata(dtype=np.float32)
    label = np.asanyarray(nibabel.load(mask_path).dataobj)
    check_same_shape((image.shape, label.shape), 3, mask_path)
    return image, label


def _integral(values: np.ndarray, source: Path) -> np.ndarray:
    """Label arrays are often stored as floats; they must still hold whole numbers."""
    rounded = np.rint(values).astype(np.int64)
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(rounded, values):
        raise DatasetFormatError(f"{source}: label values are not whole numbers")
    return rounded


def unit_to_uint8(values: np.ndarray, source: Path) -> np.ndarray:
    """CT already scaled to [0, 1] (TransUNet's preprocessing) -> 0-255."""
    low, high = float(values.min(initial=0)), float(values.max(initial=0))
    if low < -1e-3 or high > 1 + 1e-3:
        raise DatasetFormatError(
            f"{source}: image values span [{low:.4g}, {high:.4g}], not [0, 1]; Synapse files are expected "
            "as TransUNet preprocessed them (HU clipped to [-125, 275], scaled to [0, 1])"
        )
    return scale_to_uint8(values, 0.0, 1.0)


def mri_to_uint8(volume: np.ndarray) -> np.ndarray:
    """One MRI volume -> 0-255 from its 0.5th to 99.5th percentile."""
    low, high = np.percentile(volume, MRI_PERCENTILES)
    return scale_to_uint8(volume, float(low), float(high))


def scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to 0-255, clipped; a constant input becomes 0."""
    span = high - low
    if span <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float32) - np.float32(low)) * np.float32(255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def resize_pair(image: np.ndarray, mask: np.ndarray | None, size: int) -> Pair:
    """A greyscale slice -> RGB ``size`` x ``size`` (bilinear), its mask nearest-neighbour."""
    rgb = Image.fromarray(image).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8), None if mask is None else resize_mask(mask, size)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return resize_label_map(mask, (size, size))


def encode_png(array: np.ndarray) -> bytes:
    """A uint8 array (a label map, an image) as PNG bytes: lossless, so class indices survive."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def resize_label_map(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 label map resized nearest-neighbour to ``shape`` (rows, columns): no new label values.

    Preprocessing shrinks masks with it and evaluation grows predictions back with it, so both
    directions sample the same pixel centres."""
    rows, columns = shape
    return np.asarray(Image.fromarray(mask).resize((columns, rows), Image.Resampling.NEAREST), dtype=np.uint8)
