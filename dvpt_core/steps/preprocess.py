"""Preprocess step: decode every image once into fixed-size uint8 arrays the trainer memory-maps.

Decoding full-size fundus JPEGs dominates an epoch on real DDR; doing it once here makes every
epoch (and every hyper-parameter trial) read plain arrays instead. Per split the step writes
``<split>/images.npy`` (uint8, N x S x S x 3, ``np.load(..., mmap_mode="r")``-able) and
``<split>/labels.npy`` (int64), plus ``meta.json``. Everything is written into a temporary
directory beside ``out_dir`` and renamed into place at the end, so a crash never leaves a
half-written cache for DVC or the next step to pick up.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.atomic import atomic_directory, is_non_empty_dir
from dvpt_core.data.cache_layout import IMAGES_FILE, LABELS_FILE, META_FILE
from dvpt_core.data.formats import read_dataset
from dvpt_core.data.manifest import relative_path
from dvpt_core.data.parallel import map_ordered
from dvpt_core.data.records import SPLITS, Sample

log = logging.getLogger(__name__)


def preprocess(cfg: ExperimentConfig, data_root: Path, out_dir: Path) -> dict:
    """Build the array cache of the dataset at ``data_root`` in ``out_dir``; returns ``meta.json``'s content.

    ``out_dir`` is replaced only when it is empty or a previous cache (it holds ``meta.json``),
    so a mistyped path cannot wipe unrelated files.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    _check_replaceable(out_dir)
    samples = read_dataset(cfg.data, data_root)
    size = cfg.model.image_size
    _check_labels(samples, cfg.data.num_classes)
    by_split = {split: [s for s in samples if s.split == split] for split in SPLITS}
    with atomic_directory(out_dir, replace=True) as tmp:
        ordered, digests = [], []
        for split, split_samples in by_split.items():
            if not split_samples:
                raise ValueError(f"{data_root}: split {split} has no gradable images")
            digests += write_split(tmp / split, split_samples, size, cfg.data.max_pixels)
            ordered += split_samples
        meta = {
            "image_size": size,
            "class_names": list(cfg.data.class_names),
            "counts": {split: _counts(items, cfg.data.num_classes) for split, items in by_split.items()},
            "source": str(data_root),
            "inputs_sha256": inputs_hash(data_root, ordered, digests),
            "layout": {"images": "uint8 NHWC RGB", "labels": "int64"},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("preprocessed %s into %s at %d px: %s", data_root, out_dir, size,
             ", ".join(f"{s}: {len(v)}" for s, v in by_split.items()))
    return meta


def _check_replaceable(out_dir: Path) -> None:
    if is_non_empty_dir(out_dir) and not (out_dir / META_FILE).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and holds no {META_FILE}: it is not a preprocessing cache, refusing to replace it"
        )


def write_split(split_dir: Path, samples: list[Sample], size: int, max_pixels: int) -> list[str]:
    """Writes one split's arrays; returns each image file's sha256, in sample order."""
    split_dir.mkdir(parents=True)
    split = samples[0].split
    # Written through a memory map, so a split larger than RAM (real DDR at 224 px: ~1 GB) is fine.
    images = np.lib.format.open_memmap(
        split_dir / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(len(samples), size, size, 3)
    )
    load = _loader_into(images, samples, size, max_pixels)
    digests = map_ordered(load, range(len(samples)), desc=f"preprocess {split}")
    images.flush()
    del images
    np.save(split_dir / LABELS_FILE, np.asarray([s.label for s in samples], dtype=np.int64))
    return digests


def _loader_into(
    images: np.ndarray, samples: list[Sample], size: int, max_pixels: int
) -> Callable[[int], str]:
    def load(index: int) -> str:
        data = samples[index].path.read_bytes()
        images[index] = decode_resized(data, size, max_pixels, samples[index].path)
        return hashlib.sha256(data).hexdigest()

    return load


def decode_resized(data: bytes, size: int, max_pixels: int, source: Path) -> np.ndarray:
    """RGB ``size`` x ``size`` uint8 array of encoded image bytes (aspect ratio not kept).

    JPEG draft mode first lets libjpeg decode at a reduced scale (still at least ``size``), which
    cuts decoding time of full-size fundus photographs several-fold; the bilinear resize that
    follows is antialiased (Pillow widens the filter when downscaling).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"{width}x{height} pixels exceeds data.max_pixels={max_pixels}")
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Exception as err:  # noqa: BLE001  (Pillow raises many types; name the file whatever it was)
        raise ValueError(f"{source}: cannot preprocess image ({err}); run the validate step first") from err


def inputs_hash(root: Path, samples: list[Sample], digests: list[str]) -> str:
    """One sha256 over every sample's split, path, label and content hash (``digests``), in order."""
    hasher = hashlib.sha256()
    for sample, digest in zip(samples, digests, strict=True):
        hasher.update(f"{sample.split}\t{relative_path(root, sample.path)}\t{sample.label}\t{digest}\n".encode())
    return hasher.hexdigest()


def _check_labels(samples: list[Sample], num_classes: int) -> None:
    """A label out of range would surface much later as an obscure loss error; stop here."""
    bad = [f"{s.path}: label {s.label} not in 0-{num_classes - 1}" for s in samples if not 0 <= s.label < num_classes]
    if bad:
        raise ValueError("labels out of range (run the validate step for a full report):\n" + "\n".join(bad))


def _counts(samples: list[Sample], num_classes: int) -> dict:
    per_class = np.bincount([s.label for s in samples], minlength=num_classes)
    return {"total": len(samples), "per_class": [int(n) for n in per_class]}
