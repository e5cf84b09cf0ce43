"""SIGTERM as an exception, so a step stopped by DVC, ``timeout`` or Kubernetes unwinds like on
Ctrl-C (its MLflow run closed, its last checkpoint kept). Kept free of heavy imports: the CLI
imports it to report an interruption in one line."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(BaseException):
    """Raised by SIGTERM inside :func:`terminate_as_exception`; a BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` swallows it."""


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` in the main thread (the previous
    handler is restored after). Outside the main thread signals cannot be handled: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def termination_ignored() -> Iterator[None]:
    """Within the block SIGTERM is ignored: a run that is already ending (closing its MLflow run
    after an error or a first signal) is not cut short by another one, e.g. torchrun stopping
    the other processes once one has failed. Outside the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
