"""MLflow set-up and lineage shared by the train, evaluate and register steps."""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
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


def run_name(cfg: ExperimentConfig) -> str:
    """``<method>-<backbone>-<UTC time>-<4 hex>``: readable, and unique even when every run is
    seeded alike (the suffix comes from the OS, not from the seeded generators)."""
    backbone = cfg.model.backbone.split("/")[-1].split(".")[0]
    return f"{cfg.model.method}-{backbone}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def dvc_experiment() -> str:
    """The DVC experiment this process runs in (``dvc exp run`` sets it), or ""."""
    return os.environ.get("DVC_EXP_NAME", "")


# MLflow's contexts for the three splits of a dataset input.
SPLIT_CONTEXTS = {"train": "training", "valid": "validation", "test": "testing"}


def log_dataset_inputs(splits_csv: Path, data_root: Path | None, digest: str, commit: str) -> None:
    """Each split as an MLflow dataset input of the active run: its rows of ``splits.csv`` (paths,
    labels, content hashes) as the dataset, the DVC hash of the data as its digest, and the data
    path at the git revision as its source."""
    if not Path(splits_csv).is_file():
        return
    # Strings throughout: the file is a record of paths and labels, not model input.
    table = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    where = str(Path(data_root).resolve()) if data_root else str(Path(splits_csv).resolve().parent)
    name = Path(where).name
    for split, context in SPLIT_CONTEXTS.items():
        rows = table[table["split"] == split].reset_index(drop=True)
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that the path is ambiguous.
            warnings.filterwarnings("ignore", message="The specified dataset source", category=UserWarning)
            dataset = mlflow.data.from_pandas(rows, source=f"{where}@{commit}", name=f"{name}:{split}",
                                              digest=digest)
        mlflow.log_input(dataset, context=context)
