"""Sync step: push a train step's local results to its MLflow run, as far as they are not there yet.

The train step works locally first: checkpoints, history, adapter and ``run.json`` are on disk
before MLflow is asked for anything beyond opening the run, and per-epoch metrics go to MLflow only
while the server answers. What MLflow has not received yet is recorded in ``sync.json`` beside
them; this step sends it (parameters, dataset inputs, the validation report, every epoch's
metrics, the logged model, the artifacts) and closes the run as FINISHED. Each part is marked done
as soon as it is sent, so the step can be repeated after any failure: ``dvpt sync`` after the
server comes back completes a run that training could not.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.cache_layout import SPLITS_FILE
from dvpt_core.secrets import mask_uri
from dvpt_core.serving.logged_model import log_adapter_model
from dvpt_core.tracking import (
    TrackingUnavailable, bound_requests, flatten, log_dataset_inputs, read_run_file, server_is_up, write_run_file,
)

log = logging.getLogger(__name__)
SYNC_FILE = "sync.json"
# MLflow's limit on parameters per log_batch call.
MAX_PARAMS_PER_BATCH = 100
HISTORY_FILE = "history.csv"
# What the validate step writes that the run keeps (dvpt_core.steps.validate).
VALIDATION_ARTIFACTS = ("validation.json", "data_docs")


def read_sync_state(train_dir: Path) -> dict[str, Any]:
    path = Path(train_dir) / SYNC_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_sync_state(train_dir: Path, state: dict[str, Any]) -> None:
    path = Path(train_dir) / SYNC_FILE
    tmp = path.with_name(f".{SYNC_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def log_run_inputs(cfg: ExperimentConfig, train_dir: Path, state: dict[str, Any]) -> None:
    """Parameters, dataset inputs and the data gate's report, each once (marked in ``state``)."""
    client = mlflow.MlflowClient()
    run_id = state["run_id"]
    if not state.get("params"):
        values = flatten("", cfg.model_dump(mode="json"))
        values["tracking.tracking_uri"] = mask_uri(values["tracking.tracking_uri"] or "")
        params = [Param(k, str(v)) for k, v in values.items()]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[start:start + MAX_PARAMS_PER_BATCH])
        _done(train_dir, state, "params")
    if not state.get("inputs"):
        log_dataset_inputs(run_id, Path(state["cache_dir"]) / SPLITS_FILE,
                           Path(state["data_root"]) if state.get("data_root") else None,
                           state["data_dvc_md5"], state["git_commit"])
        _done(train_dir, state, "inputs")
    if not state.get("validation"):
        _log_validation(client, run_id, state.get("validation_dir"))
        _done(train_dir, state, "validation")


def log_epoch(train_dir: Path, state: dict[str, Any], row: dict[str, float]) -> None:
    """One epoch's metrics (step = epoch) and the record that they were sent."""
    timestamp = int(time.time() * 1000)
    metrics = [Metric(k, float(v), timestamp, int(row["epoch"])) for k, v in row.items() if k != "epoch"]
    mlflow.MlflowClient().log_batch(state["run_id"], metrics=metrics)
    state["epochs_logged"] = int(row["epoch"])
    write_sync_state(train_dir, state)


def sync(cfg: ExperimentConfig, train_dir: Path, wait_s: float | None = None) -> dict[str, Any]:
    """Send whatever ``train_dir``'s run still lacks, waiting up to ``wait_s`` (default
    ``tracking.sync_wait_s``) for the server; returns the updated ``run.json`` content."""
    train_dir = Path(train_dir)
    state = read_sync_state(train_dir)
    if not state:
        raise FileNotFoundError(f"{train_dir / SYNC_FILE} does not exist: {train_dir} is not a train step folder")
    summary = read_run_file(train_dir)
    if state.get("finished"):
        return summary
    uri = cfg.tracking.resolved_uri()
    bound_requests(cfg)
    _wait_for(uri, cfg.tracking.sync_wait_s if wait_s is None else wait_s, cfg.tracking.request_timeout_s, train_dir)
    mlflow.set_tracking_uri(uri)
    try:
        _send(cfg, train_dir, state, summary)
    except (mlflow.MlflowException, OSError) as err:
        raise TrackingUnavailable(_later(uri, train_dir, f"MLflow failed while syncing: {err}")) from None
    summary.update(model_id=state["model_id"], model_uri=state["model_uri"], synced=True)
    write_run_file(train_dir, summary)
    log.info("run %s is complete in MLflow at %s", state["run_id"], mask_uri(uri))
    return summary


def _send(cfg: ExperimentConfig, train_dir: Path, state: dict[str, Any], summary: dict[str, Any]) -> None:
    """Inside the run as MLflow's active run (the model APIs need one); leaving it normally marks
    the run FINISHED, an error marks it FAILED (and a later sync re-opens it)."""
    log_run_inputs(cfg, train_dir, state)
    history = _read_history(train_dir / HISTORY_FILE)
    for row in history[state.get("epochs_logged", 0):]:
        log_epoch(train_dir, state, row)
    with mlflow.start_run(run_id=state["run_id"]):
        if not state.get("model_id"):
            logged = log_adapter_model(train_dir / "adapter")
            state.update(model_id=logged.model_id, model_uri=logged.model_uri)
            write_sync_state(train_dir, state)
        if not state.get("artifacts"):
            best = f"best_val_{summary['selection_metric']}"
            mlflow.log_metrics({best: summary[best], "best_epoch": summary["best_epoch"],
                                "adapter_bytes": summary["adapter_bytes"], "params_trainable": summary["trainable"],
                                "params_total": summary["total"]}, model_id=state["model_id"])
            mlflow.log_artifact(str(train_dir / HISTORY_FILE))
            splits = Path(state["cache_dir"]) / SPLITS_FILE
            if splits.is_file():
                mlflow.log_artifact(str(splits), artifact_path="data")
            _done(train_dir, state, "artifacts")
    _done(train_dir, state, "finished")


def _wait_for(uri: str, wait_s: float, timeout: float, train_dir: Path) -> None:
    deadline = time.monotonic() + wait_s
    while not server_is_up(uri, timeout):
        if time.monotonic() >= deadline:
            raise TrackingUnavailable(_later(uri, train_dir, f"the MLflow server did not answer for {wait_s:g} s"))
        log.warning("MLflow at %s does not answer; retrying for up to %.0f s", mask_uri(uri), wait_s)
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))


def _later(uri: str, train_dir: Path, reason: str) -> str:
    return (f"training finished and is saved in {train_dir} (adapter, history, run.json), but {reason} "
            f"({mask_uri(uri)}); once it is back, run: dvpt sync --params params.yaml --train {train_dir}")


def _done(train_dir: Path, state: dict[str, Any], part: str) -> None:
    state[part] = True
    write_sync_state(train_dir, state)


def _log_validation(client: mlflow.MlflowClient, run_id: str, validation_dir: str | None) -> None:
    """The data gate's verdict and its Data Docs, beside the model trained on that data."""
    if not validation_dir:
        return
    for name in VALIDATION_ARTIFACTS:
        path = Path(validation_dir) / name
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path=f"validation/{name}")
        elif path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="validation")


def _read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
