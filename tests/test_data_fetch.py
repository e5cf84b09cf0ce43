"""The pipeline's first steps: the dataset resolved and fetched from a git repository's DVC remote at a
named revision, as a cluster pod does it (here the repository and the remote are local folders)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dvpt_core.steps.fetch import DataSourceError, fetch_data, resolve_data
from dvpt_core.tracking import dvc_data_hash


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A git repository whose ``data`` folder DVC tracks and pushed to a remote, at two tags
    (``v1``, ``v2``, the second with one file changed); the repository keeps no DVC cache, so a
    fetch must read the remote."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("fetch")
    repo, remote = root / "repo", root / "remote"
    (repo / "data" / "train").mkdir(parents=True)
    for index in range(3):
        (repo / "data" / "train" / f"{index}.txt").write_text(f"image {index}\n")
    _git(repo.parent, "init", "-q", str(repo))
    dvc = Repo.init(repo)
    with dvc.config.edit() as config:
        config["remote"]["store"] = {"url": str(remote)}
        config["core"]["remote"] = "store"
    tags = {}
    for tag in ("v1", "v2"):
        if tag == "v2":
            (repo / "data" / "train" / "0.txt").write_text("image 0, relabelled\n")
        dvc.add(str(repo / "data"))
        dvc.push()
        _git(repo, "add", "-A")
        _git(repo, "commit", "-qm", f"data {tag}")
        _git(repo, "tag", tag)
        tags[tag] = {"commit": _git(repo, "rev-parse", "HEAD"), "tree": _tree(repo / "data"),
                     "md5": yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]["md5"]}
    shutil.rmtree(repo / ".dvc" / "cache")
    return {"url": str(repo), "tags": tags}


def test_a_revision_resolves_to_its_commit_and_data_hash(data_repo: dict) -> None:
    for tag, expected in data_repo["tags"].items():
        assert resolve_data(data_repo["url"], "data", tag) == {"commit": expected["commit"], "md5": expected["md5"]}
    assert data_repo["tags"]["v1"]["md5"] != data_repo["tags"]["v2"]["md5"]


def test_the_fetched_dataset_is_the_revision_s_content_with_its_pointer(data_repo: dict, tmp_path: Path) -> None:
    v1 = data_repo["tags"]["v1"]
    source = fetch_data(data_repo["url"], "data", "v1", v1["md5"], tmp_path / "out")

    assert source == {"repo": data_repo["url"], "path": "data", "revision": "v1", "commit": v1["commit"],
                      "md5": v1["md5"], "root": "data"}
    assert _tree(tmp_path / "out" / "data") == v1["tree"]
    # The train step's lineage reads the same hash beside the folder, as in a checkout.
    assert dvc_data_hash(tmp_path / "out" / "data") == v1["md5"]


def test_a_revision_that_no_longer_holds_the_hash_or_does_not_exist_is_refused(data_repo: dict,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="moved since the run resolved it"):
        fetch_data(data_repo["url"], "data", "v2", data_repo["tags"]["v1"]["md5"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataSourceError, match="unknown Git revision 'v9'"):
        resolve_data(data_repo["url"], "data", "v9")
    with pytest.raises(DataSourceError, match="has no images"):
        resolve_data(data_repo["url"], "images", "v1")
    with pytest.raises(DataSourceError, match="not tracked by DVC"):
        resolve_data(data_repo["url"], ".gitignore", "v1")
