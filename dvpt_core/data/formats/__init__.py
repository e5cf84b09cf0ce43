"""Readers of the on-disk dataset formats users hold, keyed by ``data.format``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dvpt_core.config import DataConfig
from dvpt_core.data.formats.ddr import read_ddr
from dvpt_core.data.records import Sample

READERS: dict[str, Callable[[Path], list[Sample]]] = {"ddr": read_ddr}


def read_dataset(data: DataConfig, root: Path) -> list[Sample]:
    """The gradable samples of the dataset at ``root``, read with ``data.format``'s reader."""
    try:
        reader = READERS[data.format]
    except KeyError:
        raise ValueError(f"data.format={data.format!r} has no reader; known: {', '.join(READERS)}") from None
    return reader(Path(root))
