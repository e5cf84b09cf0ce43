"""A pytest fork server: third-party libraries imported once, one forked pytest per mutant.

Cosmic Ray runs its test command in a fresh process for every mutant. Importing torch, timm,
MLflow and Great Expectations takes 5-15 s on the project's 2-core machines, longer than most
mutants' tests, so ``serve`` imports them once and ``client`` (the test command Cosmic Ray runs)
asks the server to fork and run ``pytest.main`` in the child. The server never imports
``dvpt_core`` or the tests: every child imports them from disk, mutated file included, exactly as
a fresh interpreter would. A client killed by Cosmic Ray's timeout closes its socket, and the
server then kills the child's whole process group.

    python mutation/forkserver.py serve SOCKET
    python mutation/forkserver.py client SOCKET -- PYTEST_ARGS...
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

# Imported before forking. Only third-party packages: never dvpt_core, tests or anything that
# imports them, or the children would run the unmutated module.
PRELOAD = (
    "numpy", "pandas", "PIL.Image", "yaml", "pydantic", "torch", "torchvision", "timm", "safetensors.torch",
    "torchmetrics", "sklearn.metrics", "matplotlib.pyplot", "mlflow", "onnx", "onnxruntime",
    "great_expectations", "great_expectations.expectations", "nibabel", "h5py", "pytest",
)
POLL_S = 0.1


def serve(path: Path) -> None:
    """Accept one request at a time until killed; each gets a forked ``pytest.main``."""
    sys.dont_write_bytecode = True  # a mutated file must never be shadowed by a cached .pyc
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional package: the child imports (or misses) it itself
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    print(f"forkserver ready on {path}", flush=True)
    while True:
        connection, _ = server.accept()
        with connection:
            _handle(connection)


def _handle(connection: socket.socket) -> None:
    request = json.loads(_read_line(connection))
    with tempfile.TemporaryFile() as output:
        pid = os.fork()
        if pid == 0:
            _child(request, output)
        code = _wait(pid, connection)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if code is not None:
        connection.sendall(json.dumps({"code": code, "output": text}).encode() + b"\n")


def _child(request: dict, output) -> None:
    """Runs in the fork: its own process group (so a timeout kills everything it starts)."""
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.chdir(request["cwd"])
    sys.path.insert(0, request["cwd"])
    os.dup2(output.fileno(), 1)
    os.dup2(output.fileno(), 2)
    code = 3
    try:
        import pytest

        code = int(pytest.main(request["args"]))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, connection: socket.socket) -> int | None:
    """The child's exit code, or None after killing it because the client went away."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        readable, _, _ = select.select([connection], [], [], POLL_S)
        if readable and not connection.recv(1, socket.MSG_PEEK):
            _kill_group(pid)
            os.waitpid(pid, 0)
            return None


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_line(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("client closed the connection before sending a request")
        data += chunk
    return data


def client(path: Path, args: list[str]) -> int:
    """Run ``pytest args`` in the server from this directory; print its output, return its code."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(str(path))
        connection.sendall(json.dumps({"cwd": os.getcwd(), "args": args}).encode() + b"\n")
        reply = json.loads(_read_line(connection))
    sys.stdout.write(reply["output"])
    return reply["code"]


def wait_ready(path: Path, process, timeout_s: float) -> None:
    """Block until the server listens on ``path``; raise if it died or took too long."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the pytest fork server did not start (exit code {process.poll()})")
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        serve(Path(argv[1]))
        return 0
    if len(argv) >= 3 and argv[0] == "client" and argv[2] == "--":
        return client(Path(argv[1]), argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
