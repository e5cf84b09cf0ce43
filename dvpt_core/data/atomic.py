"""Write a whole directory or file, or nothing: readers (DVC, the next step) never see a half-written one."""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


def is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextmanager
def atomic_directory(target: Path, *, replace: bool) -> Iterator[Path]:
    """Yield a fresh directory beside ``target`` that becomes ``target`` when the block succeeds.

    The temporary directory sits in the same parent so the final step is a rename on one file
    system. On an exception it is removed and ``target`` is left as it was. A non-empty ``target``
    is only replaced when ``replace`` is true.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if is_non_empty_dir(target) and not replace:
        raise FileExistsError(f"{target} is not empty; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the directory gets the umask's permissions, not 0700.
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_into_place(tmp, target)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` that replaces ``target`` when the block succeeds.

    The temporary name keeps ``target``'s name as its end, so writers that choose the format from
    the suffix (nibabel's ``.nii.gz``, matplotlib's ``.png``) still do. On an exception the partial
    file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:12]}-{target.name}"
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Move ``target`` aside, rename ``tmp`` onto it, then delete the old copy."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)
    log.debug("wrote %s", target)
