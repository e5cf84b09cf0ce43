"""Fetch step: the dataset from a git repository's DVC remote at a named revision.

Where the pipeline runs in a cluster, nobody fills a volume by hand: the data come from the same
place ``dvc pull`` takes them, the DVC remote (S3) the repository's ``.dvc/config`` names, at a git
revision the run names. Two functions, because caching needs them apart:

- :func:`resolve_data` asks the repository what the revision holds: its commit and the DVC hash of
  the dataset folder. Cheap (a shallow look at git), never cached.
- :func:`fetch_data` downloads that content, checking it is the hash asked for. Its inputs are the
  repository, folder, revision name and hash, so a cache keyed on them is keyed on the content.

Both go through DVC's own file system (``dvc.api.DVCFileSystem``), which clones the repository and
reads the remote with the credentials of the environment (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3 service other than AWS). The folder lands
at ``<out>/<name>`` beside a copy of its ``.dvc`` pointer (``<out>/<name>.dvc``), the layout of a
checkout, so the train step's lineage (``tracking.dvc_data_hash``) records the same hash.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from dvpt_core.data.atomic import atomic_directory

log = logging.getLogger(__name__)
SOURCE_FILE = "source.json"


class DataSourceError(ValueError):
    """The repository, revision or folder named does not hold DVC-tracked data as asked."""


def resolve_data(repo: str, path: str, revision: str) -> dict[str, str]:
    """The commit ``revision`` of ``repo`` names and the DVC hash (md5) of ``path`` there."""
    with _repository(repo, revision) as fs:
        return _resolve(fs, repo, path, revision)


def fetch_data(repo: str, path: str, revision: str, md5: str, out_dir: Path) -> dict[str, str]:
    """Download ``path`` of ``repo`` at ``revision`` into ``out_dir`` (see the module docstring);
    refuses when the revision no longer holds ``md5`` (a branch moved since it was resolved).

    Returns the source (repository, folder, revision, commit, hash, and ``root``: the folder's
    name in ``out_dir``), also written to ``source.json``.
    """
    name = PurePosixPath(path).name
    with _repository(repo, revision) as fs:
        source = {"repo": repo, "path": path, "revision": revision, **_resolve(fs, repo, path, revision),
                  "root": name}
        if source["md5"] != md5:
            raise DataSourceError(f"{path} in {repo}@{revision} is now {source['md5']}, not {md5}: the revision "
                                  "moved since the run resolved it; run again, or name a tag or commit")
        with atomic_directory(Path(out_dir), replace=True) as tmp:
            fs.get(path, str(tmp / name), recursive=True)
            (tmp / f"{name}.dvc").write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": name}]}))
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    log.info("fetched %s of %s at %s (commit %s, md5 %s) into %s", path, repo, revision, source["commit"][:12], md5,
             out_dir)
    return source


def _resolve(fs: Any, repo: str, path: str, revision: str) -> dict[str, str]:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise DataSourceError(f"{repo}@{revision} has no {path}") from None
    if not info.get("md5"):
        raise DataSourceError(f"{path} in {repo}@{revision} is not tracked by DVC (no .dvc file or stage output "
                              f"names it): `dvc add {path}` and commit the pointer")
    return {"commit": fs.repo.get_rev(), "md5": info["md5"]}


@contextlib.contextmanager
def _repository(repo: str, revision: str) -> Iterator[Any]:
    """DVC's file system over ``repo`` at ``revision``; git errors name the repository and revision."""
    from dvc.api import DVCFileSystem
    from dvc.scm import SCMError

    try:
        with contextlib.closing(DVCFileSystem(repo, rev=revision)) as fs:
            yield fs
    except SCMError as err:
        raise DataSourceError(f"{repo}@{revision}: {err} (is the URL a git repository the pods can reach, and "
                              "the revision a branch, tag or commit of it?)") from None
