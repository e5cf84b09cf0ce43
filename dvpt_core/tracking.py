"""MLflow set-up and lineage shared by the train, evaluate and register steps."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml

from dvpt_core.config import ExperimentConfig

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


def connect(cfg: ExperimentConfig) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI used."""
    uri = cfg.tracking.resolved_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


def resume_run(cfg: ExperimentConfig, run_id: str) -> mlflow.ActiveRun:
    """Re-open the train step's run in the experiment that run belongs to (not whatever
    experiment the configuration or environment names), so later steps always add to it."""
    mlflow.set_tracking_uri(cfg.tracking.resolved_uri())
    experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow.start_run(run_id=run_id)


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: value}


def dvc_data_hash(data_root: Path) -> str:
    """The md5 DVC recorded for ``data_root`` in ``<data_root>.dvc``, or 'untracked'."""
    pointer = Path(f"{Path(data_root).resolve()}.dvc")
    if not pointer.is_file():
        return "untracked"
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "untracked"))


def git_commit(cwd: Path | None = None) -> str:
    """The checkout's commit (``-dirty`` if tracked files changed); in a container built from
    ``infra/Dockerfile``, the commit it was built from (``$DVPT_GIT_COMMIT``)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DVPT_GIT_COMMIT", "unknown")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("-dirty" if dirty else "")


def write_run_file(out_dir: Path, payload: dict[str, Any]) -> Path:
    path = Path(out_dir) / RUN_FILE
    path.write_text(json.dumps(payload, indent=2))
    return path


def read_run_file(train_dir: Path) -> dict[str, Any]:
    path = Path(train_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the train step first")
    return json.loads(path.read_text())
