"""Ordered thread-pool map with a progress bar.

Image decoding and encoding in Pillow and numpy's array work release the GIL, so threads give a
near-linear speed-up on real datasets (DDR: ~12,500 full-size fundus JPEGs) without the pickling
and start-up cost of processes. Results keep the input order, so outputs stay deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")

MAX_WORKERS = 8


def map_ordered(fn: Callable[[T], R], items: Sequence[T], desc: str) -> list[R]:
    """``[fn(x) for x in items]`` on a thread pool, with a tqdm bar; the first exception propagates."""
    workers = max(1, min(MAX_WORKERS, os.cpu_count() or 1, len(items)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="img", leave=False, disable=None))
