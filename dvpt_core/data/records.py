"""The record every format reader returns, so the manifest and preprocessing need not know formats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The split names of DDR's protocol, in the order every step reports them.
SPLITS: tuple[str, ...] = ("train", "valid", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image as its list file names it (the path is not checked for escapes here)."""

    path: Path
    label: int
    split: str
