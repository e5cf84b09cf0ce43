"""Where a served adapter comes from: a registry URI (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``) or a local adapter folder.

An alias is resolved to its version first and the files are downloaded for that version, so an
alias that moves during the download cannot mix two versions; the version is what a server
reports and what a swap compares.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from dvpt_core.peft.adapter import CONFIG_FILE, read_adapter_config
from dvpt_core.registry.versions import RegistryError, get_version, version_by_alias
from dvpt_core.serving.logged_model import ADAPTER_ARTIFACT

MODEL_URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
ONNX_TAG = "onnx_model_uri"
# A local adapter folder may hold its exported graph (backbone + adapter) under this name.
LOCAL_ONNX = "model.onnx"


@dataclass(frozen=True)
class ModelSource:
    """A resolved adapter: its files here, and which registered version they are (if any)."""

    uri: str
    adapter_dir: Path
    name: str = ""
    version: str = "local"
    alias: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def meta(self) -> dict:
        return read_adapter_config(self.adapter_dir)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of a ``models:/`` URI; ``ValueError`` naming the URI otherwise."""
    match = MODEL_URI.match(uri)
    if not match:
        raise ValueError(f"model {uri!r} is neither models:/NAME@ALIAS, models:/NAME/VERSION nor an adapter folder")
    return match["name"], match["alias"], match["version"]


def current_version(uri: str) -> str | None:
    """The version a ``models:/`` URI points at now (None: the alias is unset)."""
    name, alias, version = parse_model_uri(uri)
    if version is not None:
        return version
    info = version_by_alias(MlflowClient(), name, alias)
    return info.version if info else None


def resolve(uri: str, cache_dir: Path) -> ModelSource:
    """Download (once per version, into ``cache_dir``) the adapter that ``uri`` names now."""
    if Path(uri).is_dir() and (Path(uri) / CONFIG_FILE).is_file():
        return ModelSource(uri=uri, adapter_dir=Path(uri), name=Path(uri).name)
    name, alias, version = parse_model_uri(uri)
    client = MlflowClient()
    if alias is not None:
        found = version_by_alias(client, name, alias)
        if found is None:
            raise RegistryError(f"{uri}: {name} has no @{alias}")
        version = found.version
    info = get_version(client, name, version)
    target = Path(cache_dir) / name / info.version
    adapter_dir = target / "artifacts" / ADAPTER_ARTIFACT
    if not (adapter_dir / CONFIG_FILE).is_file():
        mlflow.artifacts.download_artifacts(f"models:/{name}/{info.version}", dst_path=str(target))
    return ModelSource(uri=uri, adapter_dir=adapter_dir, name=name, version=info.version, alias=alias,
                       tags=info.tags)


def onnx_file(source: ModelSource, cache_dir: Path) -> Path:
    """The exported graph (backbone + adapter) registered beside the version, or ``model.onnx``
    in a local adapter folder."""
    if source.version == "local":
        path = source.adapter_dir / LOCAL_ONNX
        if not path.is_file():
            raise FileNotFoundError(f"{source.uri}: no {LOCAL_ONNX} in the adapter folder (dvpt export writes one)")
        return path
    if ONNX_TAG not in source.tags:
        raise RegistryError(f"{source.uri}: version {source.version} has no {ONNX_TAG} tag (no ONNX graph)")
    target = Path(cache_dir) / source.name / source.version / "onnx"
    if not any(target.glob("*.onnx")):
        mlflow.artifacts.download_artifacts(source.tags[ONNX_TAG], dst_path=str(target))
    (path,) = target.glob("*.onnx")
    return path
