"""Shared fixtures.

``mlflow_server`` is a real MLflow tracking server (SQLite backend, proxied artifact store) in a
subprocess, because the steps that register models must be tested against the HTTP API the
Kubeflow pods use, not against a local file or SQLite store. It is session-scoped (starting one
takes seconds): tests that share it use their own registered-model names. The fault tests stop
and start such servers (``LocalMlflowServer``).

``production_stack`` is the stack a team runs (``infra/local_stack.py``): ``mlflow server`` on
PostgreSQL with its artifacts in a SeaweedFS S3 bucket, all on loopback, started once per session
when a test first asks for it (the end-to-end runs of ``dvc repro`` and the local KFP run track into
it). ``seaweedfs`` is its S3 store alone, for tests that need no tracking server.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock
from xdist.scheduler import LoadScopeScheduling

from infra.local_stack import LocalStack, S3Store, free_port, http_ok, stop_process_group

STARTUP_TIMEOUT_S = 120
SHARED_SERVER = "mlflow_server"
# Modules that share a costly session fixture: the trained registry runs; the production stack.
SHARED_GROUPS = {
    "registry": {"test_serving", "test_promotion"},
    "stack": {"test_dvc_pipeline", "test_kfp", "test_dvc_remote"},
}
# Fixtures that start services; every test using one (directly or through another fixture) is slow.
SERVICE_FIXTURES = {"mlflow_server", "local_stack"}
# Rough wall time of each heavy group (seconds, one worker, whole suite), to schedule the longest
# first; the fast tier's heaviest modules follow for the same reason when it runs alone.
GROUP_WEIGHT = {"stack": 600, "test_segmentation_pipeline": 500, "test_faults": 450, "registry": 400,
                "test_compare": 330, "test_faults_data": 200, "test_distributed": 150,
                "test_validation_gate": 40, "test_methods": 25, "test_validation_rules": 18,
                "test_steps": 17, "test_segformer": 15, "test_export": 15}


class LocalMlflowServer:
    """A real ``mlflow server`` on loopback (SQLite backend, proxied artifacts under ``root``) that
    can be stopped and started again on the same port and store, for outage tests."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = Path(root), port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "LocalMlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1",
        ]
        # The server's job runner (a second process polling the database) serves nothing tests use.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with self.log_path.open("a") as log:
            self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not http_ok(f"{self.uri}/health"):
            exit_code = self.process.poll()
            if exit_code is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text()[-3000:]
                self.stop()
                pytest.fail(f"mlflow server on port {self.port} did not become healthy "
                            f"(exit code {exit_code}); log {self.log_path}:\n{tail}")
            time.sleep(0.25)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process.pid, self.process)
            self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tracking URI (``http://127.0.0.1:<port>``) of one server for the whole test run: the
    first process of the run that asks starts it (under a lock, so parallel workers share it) and
    the session's end stops it (:func:`pytest_sessionfinish`). Its log is ``server.log`` beside
    its database, and its tail is in the failure message if it dies."""
    shared = run_dir(tmp_path_factory)
    with FileLock(shared / f"{SHARED_SERVER}.lock"):
        record = shared / f"{SHARED_SERVER}.json"
        if record.is_file():
            return json.loads(record.read_text())["uri"]
        server = LocalMlflowServer(shared / SHARED_SERVER).start()
        record.write_text(json.dumps({"uri": server.uri, "pid": server.process.pid}))
        return server.uri


def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every process of this test run shares: pytest's base temporary folder, whose
    subfolders are the parallel workers' own (pytest-xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the shared server where the run ends: in the only process, or in the controller once
    every worker has finished."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    record = session.config._tmp_path_factory.getbasetemp() / f"{SHARED_SERVER}.json"
    if record.is_file():
        stop_process_group(json.loads(record.read_text())["pid"])
        record.unlink()


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs a service (an MLflow server, the local production stack) is ``slow``: the
    fast tier (``-m "not slow"``) is unit tests of the science, the slow tier the wiring.

    The heaviest groups (:func:`group_of`) come first: under pytest-xdist that order is the
    schedule (:class:`GroupScheduling`), so that neither worker is left with a long tail."""
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: -GROUP_WEIGHT.get(group_of(item.nodeid), 0))


def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection imported (torch, MLflow, transformers: millions of objects that live as
    long as the process) is taken out of the garbage collector's full passes, and those passes
    come ten times rarer: four heavy test modules ran in 94-100 s with this, 111 s without."""
    gc.freeze()
    gc.set_threshold(*gc.get_threshold()[:2], 100)


def group_of(nodeid: str) -> str:
    """The scheduling unit of a test: its module, or the group of modules sharing a session fixture."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return next((name for name, modules in SHARED_GROUPS.items() if module in modules), module)


class GroupScheduling(LoadScopeScheduling):
    """``--dist loadgroup`` for this suite (``make test`` runs two workers): a whole group runs on
    one worker, so its module fixtures are built once and a shared stack is started once, and the
    groups go out in collection order (heaviest first), not by their number of tests.

    The group comes from the node id's module (:func:`group_of`), not from ``xdist_group``
    marks: pytest 9.2's structured node ids drop the suffix through which pytest-xdist 3.8
    carries a mark's group, and it then silently spreads every test on its own
    (pytest-dev/pytest-xdist#1386), building each module fixture on both workers."""

    def __init__(self, config: pytest.Config, log=None) -> None:
        super().__init__(config, log)
        config.option.loadscopereorder = False

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown where its plugin is not loaded
def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadScopeScheduling | None:
    return GroupScheduling(config, log) if config.getvalue("dist") == "loadgroup" else None


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The services of ``infra/local_stack.py``, none started yet; all stopped at the session's end."""
    stack = LocalStack(tmp_path_factory.mktemp("local_stack"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def seaweedfs(local_stack: LocalStack) -> S3Store:
    """SeaweedFS S3 on a free 127.0.0.1 port with one bucket and one random key pair."""
    return local_stack.s3 or local_stack.start_s3()


@pytest.fixture(scope="session")
def production_stack(local_stack: LocalStack, seaweedfs: S3Store) -> LocalStack:
    """PostgreSQL and an ``mlflow server`` on it and on ``seaweedfs``: ``.tracking_uri``, ``.s3``
    (endpoint, bucket, keys) and ``.db`` (host, port, role, password)."""
    local_stack.start_database()
    local_stack.start_tracking()
    return local_stack
