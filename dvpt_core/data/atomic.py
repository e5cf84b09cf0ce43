"""Write a whole directory or nothing: readers (DVC, the next step) never see a half-written one.

A temporary directory's name records its owner (``.<target>.tmp-<token>-<pid>@<host>``), so one
left behind by a process that died (``kill -9``, a full disk, a node lost) is recognised and
removed the next time anything writes the same target, while one of a process still running,
here or on another machine sharing the folder, is left alone.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# ``tmp``: being written; ``old``: the previous version, moved aside during the final swap.
_OWNED = re.compile(r"\.(?P<target>.+)\.(?P<kind>tmp|old)-[0-9a-f]+-(?P<pid>\d+)@(?P<host>[^/]+)")
# Names this module gave before it recorded owners: never removed automatically.
_UNOWNED = re.compile(r"\.(?P<target>.+)\.(?:tmp|old)-[0-9a-f]{12}")


def is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def owned_name(target: Path, kind: str) -> Path:
    """A fresh sibling of ``target`` for this process: ``.<name>.<kind>-<token>-<pid>@<host>``."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}-{os.getpid()}@{socket.gethostname()}"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` whose owner process is dead; returns them.

    Only this machine's processes can be checked: a directory from another host, one of a live
    process, and one without a recorded owner are kept (the last with a warning naming it). A
    writer that died between moving ``target`` aside and renaming its new version into place
    left no ``target``: the version moved aside is put back instead of removed.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for path in sorted(target.parent.iterdir()):
        owned = _OWNED.fullmatch(path.name)
        if owned and owned["target"] == target.name and path.is_dir():
            if owned["host"] == host and not pid_alive(int(owned["pid"])) and int(owned["pid"]) != os.getpid():
                if owned["kind"] == "old" and not target.exists():
                    path.rename(target)
                    log.warning("restored %s from %s, moved aside by process %s that died", target, path,
                                owned["pid"])
                    continue
                shutil.rmtree(path, ignore_errors=True)
                log.info("removed %s, left behind by process %s that no longer runs", path, owned["pid"])
                removed.append(path)
        elif (legacy := _UNOWNED.fullmatch(path.name)) and legacy["target"] == target.name and path.is_dir():
            log.warning("%s is a temporary folder of an earlier version that records no owner: "
                        "remove it yourself if no step is writing %s", path, target)
    return removed


@contextmanager
def atomic_directory(target: Path, *, replace: bool) -> Iterator[Path]:
    """Yield a fresh directory beside ``target`` that becomes ``target`` when the block succeeds.

    The temporary directory sits in the same parent so the final step is a rename on one file
    system. On an exception it is removed and ``target`` is left as it was. A non-empty ``target``
    is only replaced when ``replace`` is true. Temporaries of dead writers of ``target`` are
    removed first (:func:`remove_stale_temporaries`).
    """
    target = Path(target)
    remove_stale_temporaries(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if is_non_empty_dir(target) and not replace:
        raise FileExistsError(f"{target} is not empty; refusing to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp) so the directory gets the umask's permissions, not 0700.
    tmp = owned_name(target, "tmp")
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
        old = owned_name(target, "old")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)
    log.debug("wrote %s", target)
