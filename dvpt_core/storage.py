"""Disk space: refuse a write that cannot fit before starting it, and report a full disk in one line.

Memory-mapped arrays are why space is checked first. ``numpy.lib.format.open_memmap`` creates a
sparse file, and a page written into it once the disk is full raises no exception: the kernel
sends SIGBUS and the process dies without a word. So a step checks the free space against what
it will write (:func:`require_free_space`) and reserves a memory-mapped file's blocks before
writing a page (:func:`open_reserved_memmap`, ``posix_fallocate``): a disk that fills meanwhile
then fails with ENOSPC, an exception. Either way the error (:class:`StorageError`) names the path
and the space needed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Out of space: the disk, a quota or the process's file size limit, as a person would say it.
NO_SPACE_REASON = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file would exceed the process's file size limit (ulimit -f)",
}
NO_SPACE = frozenset(NO_SPACE_REASON)
# File systems where blocks cannot be reserved; writing still works, only without the guard.
NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class StorageError(OSError):
    """Not enough space for a write; the message names the path and the bytes needed."""


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def require_free_space(path: Path, needed: int, what: str) -> None:
    """Raise :class:`StorageError` unless ``needed`` bytes are free where ``path`` lies."""
    free = free_bytes(path)
    if free < needed:
        raise StorageError(errno.ENOSPC, f"not enough space for {what} in {path}: it needs "
                                         f"{human_bytes(needed)}, {human_bytes(free)} free")


@contextmanager
def disk_full_as_error(path: Path, needed: int, what: str) -> Iterator[None]:
    """Turn an out-of-space OSError raised inside the block into a :class:`StorageError` naming
    ``path`` and ``needed`` (a full disk otherwise surfaces as a bare ``[Errno 28]``)."""
    try:
        yield
    except StorageError:
        raise
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        raise StorageError(err.errno, f"cannot write {what} in {path}: {NO_SPACE_REASON[err.errno]}; it needs "
                                      f"{human_bytes(needed)}, {human_bytes(free_bytes(path))} free now") from None


def open_reserved_memmap(path: Path, dtype: np.dtype | type, shape: tuple[int, ...]) -> np.memmap:
    """A new ``.npy`` file mapped for writing whose blocks are all allocated before any page is
    touched, so running out of space is an exception here (the file removed) and never a SIGBUS later."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = Path(path).stat().st_size
    try:
        with open(path, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, size)
    except OSError as err:
        if err.errno in NO_FALLOCATE:
            log.debug("cannot reserve blocks for %s (%s); writing without the reservation", path, err)
            return array
        del array
        Path(path).unlink(missing_ok=True)
        if err.errno in NO_SPACE:
            raise StorageError(err.errno, f"not enough space for {path}: it needs {human_bytes(size)}, "
                                          f"{human_bytes(free_bytes(path))} free") from None
        raise
    return array
