"""Reader of Kvasir-SEG as downloaded: ``images/<id>.jpg`` with ``masks/<id>.jpg`` (1,000 polyps).

The masks are JPEGs, so their edges carry compression noise: ``pixels.read_mask`` thresholds them
at ``data.mask_threshold``. Kvasir-SEG has no official split (its ``kavsir_bboxes.json`` is not
needed here): every sample is left to ``dvpt_core.data.splits``, which by default (the paper's
protocol) makes 5 folds.
"""

from __future__ import annotations

from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.common import pair_by_stem, require_dir
from dvpt_core.data.records import Sample


def detect(root: Path, data: DataConfig) -> bool:
    masks = root / "masks"
    return (root / "images").is_dir() and masks.is_dir() and any(masks.glob("*.jpg"))


def read(root: Path, data: DataConfig) -> list[Sample]:
    """Every image with its mask, sorted by id."""
    images = require_dir(root / "images", "Kvasir-SEG images")
    masks = require_dir(root / "masks", "Kvasir-SEG masks")
    return [Sample(path=image, label=None, split=None, mask=mask) for image, mask in pair_by_stem(images, masks)]
