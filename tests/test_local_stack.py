"""infra/local_stack.py on its own (seconds): stopping leaves nothing running, and a missing
PostgreSQL says what to install. The stack itself is exercised by the end-to-end runs that track
into it (``production_stack`` in tests/test_dvc_pipeline.py and tests/test_kfp.py)."""

from __future__ import annotations

import os
import subprocess
import time

import psutil
import pytest

from infra import local_stack
from infra.local_stack import LocalStack, StackError, service_processes, stop_process_group


def _spawn(script: str, children: int) -> subprocess.Popen:
    """``sh -c script`` as a service leader, once ``children`` of its processes run ``sleep``.

    Counting forks is not enough: a forked child is still ``sh`` until it execs, and ``setsid``
    moves to its own session only before that exec."""
    process = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while _sleeping(process) < children and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def _sleeping(process: subprocess.Popen) -> int:
    count = 0
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            count += child.name() == "sleep"
        except psutil.NoSuchProcess:
            pass
    return count


def test_stop_ends_the_group_and_the_children_that_left_it() -> None:
    # One child in a session of its own, as every PostgreSQL backend is: SIGTERM to the group misses it.
    process = _spawn("setsid sleep 60 & sleep 60 & wait", children=2)
    children = psutil.Process(process.pid).children(recursive=True)
    assert sorted(os.getpgid(c.pid) == process.pid for c in children) == [False, True]
    assert {c.pid for c in children} <= {p.pid for p in service_processes(process.pid)}

    stop_process_group(process.pid, process, timeout=5)

    assert process.returncode is not None
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_stop_kills_what_ignores_sigterm() -> None:
    process = _spawn("trap '' TERM; sleep 60 & wait; sleep 60", children=1)

    stop_process_group(process.pid, process, timeout=0.5)

    assert process.returncode == -9
    assert service_processes(process.pid) == []


def test_a_missing_postgresql_names_the_package_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(local_stack, "POSTGRES_GLOB", str(tmp_path / "postgresql/*/bin/postgres"))
    with pytest.raises(StackError, match="apt-get install postgresql"):
        LocalStack(tmp_path).start_database()
