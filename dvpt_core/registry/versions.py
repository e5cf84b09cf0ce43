"""What the registry knows about a model version: lineage tags, weights flags, test scores and
the per-sample records of its evaluation (read from the run that trained it)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dvpt_core.metrics.per_sample import ARTIFACT_DIR, RecordsError, SampleRecords, read_records, records_file


class RegistryError(ValueError):
    """A registered model, version or alias that does not exist or lacks what a command needs."""


@dataclass(frozen=True)
class VersionInfo:
    """One model version as the promotion gate, the model card and the registry table read it."""

    name: str
    version: str
    run_id: str
    source: str
    created_ms: int
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def of(cls, version: ModelVersion) -> "VersionInfo":
        return cls(name=version.name, version=str(version.version), run_id=version.run_id or "",
                   source=version.source or "", created_ms=int(version.creation_timestamp or 0),
                   aliases=tuple(version.aliases or ()), tags=dict(version.tags or {}),
                   description=version.description or "")

    @property
    def label(self) -> str:
        return f"{self.name} version {self.version}"

    @property
    def random_weights(self) -> bool:
        return self.tags.get("random_weights") == "true"

    @property
    def stand_in(self) -> bool:
        return self.tags.get("stand_in_weights") == "true"

    @property
    def weights_label(self) -> str:
        return "RANDOM WEIGHTS" if self.random_weights else "STAND-IN WEIGHTS" if self.stand_in else ""

    @property
    def data_hash(self) -> str:
        return self.tags.get("data_dvc_md5", "untracked")


def get_version(client: MlflowClient, name: str, version: str) -> VersionInfo:
    try:
        return VersionInfo.of(client.get_model_version(name, str(version)))
    except MlflowException as err:
        raise RegistryError(f"registered model {name!r} has no version {version}: {err.message}") from None


def version_by_alias(client: MlflowClient, name: str, alias: str) -> VersionInfo | None:
    """The version ``alias`` points at, or None when the alias is not set."""
    try:
        return VersionInfo.of(client.get_model_version_by_alias(name, alias))
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def all_versions(client: MlflowClient, name: str) -> list[VersionInfo]:
    """Every version of ``name``, newest first, with its aliases (a version search leaves them out:
    they come from the registered model)."""
    try:
        aliases = client.get_registered_model(name).aliases or {}
    except MlflowException as err:
        raise RegistryError(f"no registered model {name!r}: {err.message}") from None
    found = [VersionInfo.of(v) for v in client.search_model_versions(f"name = '{name}'")]
    found = [replace(v, aliases=tuple(a for a, target in sorted(aliases.items()) if str(target) == v.version))
             for v in found]
    return sorted(found, key=lambda v: int(v.version), reverse=True)


def load_records(info: VersionInfo, split: str = "test") -> SampleRecords:
    """The per-sample records the evaluate step logged to the version's run."""
    path = f"{ARTIFACT_DIR}/{records_file(split)}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=info.run_id, artifact_path=path, dst_path=tmp)
        except (MlflowException, OSError) as err:
            raise RecordsError(
                f"{info.label} has no per-sample {split} records ({path} in run {info.run_id}): run the evaluate "
                f"step for it again ({err})"
            ) from None
        return read_records(Path(local))


def run_metrics(client: MlflowClient, info: VersionInfo) -> dict[str, float]:
    """The latest value of every metric of the version's run (test scores, trainable parameters)."""
    if not info.run_id:
        return {}
    return dict(client.get_run(info.run_id).data.metrics)
