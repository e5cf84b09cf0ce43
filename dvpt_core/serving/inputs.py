"""Images as clients send them, turned into the model's input exactly as training saw it.

A served model takes what a client has: encoded image files (bytes, or base64 text in JSON) or
decoded ``uint8`` arrays (H x W greyscale or H x W x 3 RGB). Decoding and resizing are the
preprocess step's own functions (``dvpt_core.data.formats.pixels``: RGB policy, bilinear resize
to the adapter's size, the pixel-count guard) and normalisation is the evaluation transform with
the mean and std recorded in the adapter, so clients never re-implement (and drift from) the
training preprocessing.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.pixels import decode_image, resize_pair
from dvpt_core.data.transforms import apply, build_transform

MAX_PIXELS = DataConfig().max_pixels
DATA_URL_MARK = ";base64,"


class InputError(ValueError):
    """An input that is not an image the model can read; the message names which one."""


def to_rgb_array(value: Any, size: int, name: str = "image") -> tuple[np.ndarray, tuple[int, int]]:
    """``size`` x ``size`` x 3 uint8 RGB from encoded bytes, base64 text (a ``data:`` URL too) or
    a uint8 H x W [x 3] array (nested lists from JSON included), and the input's own (height,
    width), at which a segmentation model answers."""
    if isinstance(value, str):
        value = _from_base64(value, name)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            pixels, (width, height) = decode_image(bytes(value), size, MAX_PIXELS, Path(name))
        except ValueError as err:
            raise InputError(f"{name}: not a readable image ({err.__cause__ or err})") from None
        return pixels, (height, width)
    array = np.asarray(value)
    if array.dtype != np.uint8:
        if array.dtype.kind not in "iu" or array.size == 0 or array.min() < 0 or array.max() > 255:
            raise InputError(f"{name}: an array image must hold uint8 values 0-255, got dtype {array.dtype}")
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InputError(f"{name}: an array image must be H x W or H x W x 3, got shape {array.shape}")
    if array.size > MAX_PIXELS * 3:
        raise InputError(f"{name}: {array.shape} exceeds {MAX_PIXELS} pixels")
    return resize_pair(array, None, size)[0], (array.shape[0], array.shape[1])


def _from_base64(text: str, name: str) -> bytes:
    if DATA_URL_MARK in text[:100]:
        text = text.split(DATA_URL_MARK, 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: text input must be base64-encoded image bytes") from None


class Normaliser:
    """uint8 RGB arrays -> the float32 (N, 3, S, S) batch the adapter was trained on."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.transform = build_transform(size, mean, std, None)

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        # np.array copies: torch wants writable memory, and a decoded image may be read-only.
        return torch.stack([apply(self.transform, torch.from_numpy(np.array(im)).permute(2, 0, 1))[0]
                            for im in images])
