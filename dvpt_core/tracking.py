"""MLflow set-up and lineage shared by the train, evaluate and register steps."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import subprocess
import urllib.error
import urllib.request
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from dvpt_core.config import ExperimentConfig
from dvpt_core.secrets import mask_uri

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; the message names it (credentials masked)."""


def bound_requests(cfg: ExperimentConfig) -> None:
    """Bound every MLflow HTTP call of this process (unless the user set MLflow's own variables):
    MLflow's defaults retry 7 times with exponential back-off, minutes before an error."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(math.ceil(cfg.tracking.request_timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.tracking.request_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def server_is_up(uri: str, timeout: float) -> bool:
    """An HTTP(S) tracking server answers ``/health``; any other store (a database URI, a local
    path) is always up as far as this check can tell."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def check_server(cfg: ExperimentConfig) -> str:
    """The resolved tracking URI, after checking (within ``tracking.request_timeout_s``) that its
    server answers; raises :class:`TrackingUnavailable` with a one-line reason otherwise."""
    uri = cfg.tracking.resolved_uri()
    if not server_is_up(uri, cfg.tracking.request_timeout_s):
        raise TrackingUnavailable(
            f"the MLflow tracking server at {mask_uri(uri)} does not answer within "
            f"{cfg.tracking.request_timeout_s:g} s: start it, or point tracking.tracking_uri / "
            "$MLFLOW_TRACKING_URI at one that runs"
        )
    return uri


def connect(cfg: ExperimentConfig) -> str:
    """Point MLflow at the configured store and experiment (checked, with bounded requests);
    returns the tracking URI used."""
    bound_requests(cfg)
    uri = check_server(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    return uri


def resume_run(cfg: ExperimentConfig, run_id: str) -> mlflow.ActiveRun:
    """Re-open the train step's run in the experiment that run belongs to (not whatever
    experiment the configuration or environment names), so later steps always add to it."""
    bound_requests(cfg)
    mlflow.set_tracking_uri(check_server(cfg))
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
    """Atomically: a reader never sees half a ``run.json``."""
    path = Path(out_dir) / RUN_FILE
    tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
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


def log_dataset_inputs(run_id: str, splits_csv: Path, data_root: Path | None, digest: str, commit: str) -> None:
    """Each split as an MLflow dataset input of the run: its rows of ``splits.csv`` (paths,
    labels, content hashes) as the dataset, the DVC hash of the data as its digest, and the data
    path at the git revision as its source."""
    if not Path(splits_csv).is_file():
        return
    # Strings throughout: the file is a record of paths and labels, not model input.
    table = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    where = str(Path(data_root).resolve()) if data_root else str(Path(splits_csv).resolve().parent)
    name = Path(where).name
    inputs = []
    for split, context in SPLIT_CONTEXTS.items():
        rows = table[table["split"] == split].reset_index(drop=True)
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that the path is ambiguous.
            warnings.filterwarnings("ignore", message="The specified dataset source", category=UserWarning)
            dataset = mlflow.data.from_pandas(rows, source=f"{where}@{commit}", name=f"{name}:{split}",
                                              digest=digest)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    mlflow.MlflowClient().log_inputs(run_id, datasets=inputs)
