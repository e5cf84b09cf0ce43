"""Register step: the adapter as an MLflow model version (a pyfunc), the ONNX graph beside it,
and the configured alias (``challenger``) on the new version.

Promotion to ``champion`` is the quality gate of ``dvpt promote`` (``dvpt_core.registry.promotion``):
an alias move, MLflow stages being deprecated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import onnx
from mlflow.tracking import MlflowClient

from dvpt_core.config import ExperimentConfig
from dvpt_core.peft.adapter import read_adapter_config
from dvpt_core.serving.logged_model import onnx_signature
from dvpt_core.registry.model_card import publish_model_card
from dvpt_core.registry.versions import get_version
from dvpt_core.tracking import dvc_experiment, read_run_file, resume_run

log = logging.getLogger(__name__)


def register(cfg: ExperimentConfig, train_dir: Path, export_dir: Path, out_dir: Path) -> dict:
    """A new version of ``tracking.registered_model`` pointing at the LoggedModel the train step
    logged (the served model is the trained one), with the ONNX graph logged beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiment = dvc_experiment()
    if experiment and not cfg.tracking.register_experiments:
        return _skip(out_dir, f"DVC experiment {experiment}: registering from experiments is off "
                              "(tracking.register_experiments=true turns it on)")
    adapter_dir = Path(train_dir) / "adapter"
    meta = read_adapter_config(adapter_dir)
    run = read_run_file(train_dir)
    signature = onnx_signature(adapter_dir)
    name = cfg.tracking.registered_model
    with resume_run(cfg, run["run_id"]):
        onnx_info = mlflow.onnx.log_model(
            onnx.load(str(Path(export_dir) / "model.onnx")), name="onnx_model", signature=signature,
            pip_requirements=["onnxruntime"],
        )
    tags = {
        "backbone": meta["backbone"], "backbone_fingerprint": meta["backbone_fingerprint"],
        "random_weights": str(meta["random_weights"]).lower(),
        "stand_in_weights": str(meta.get("stand_in", False)).lower(), "method": meta["method"],
        "data_dvc_md5": run.get("data_dvc_md5", "untracked"), "git_commit": run.get("git_commit", "unknown"),
        "dvc_experiment": run.get("dvc_experiment", ""), "onnx_model_uri": onnx_info.model_uri,
    }
    version = str(mlflow.register_model(run["model_uri"], name, tags=tags).version)
    client = MlflowClient()
    client.set_registered_model_alias(name, cfg.tracking.alias, version)
    publish_model_card(client, get_version(client, name, version), cfg.promotion)
    result = {
        "registered": True, "registered_model": name, "version": version, "alias": cfg.tracking.alias,
        "model_uri": f"models:/{name}@{cfg.tracking.alias}", "run_id": run["run_id"],
        "pyfunc_uri": run["model_uri"], "onnx_uri": onnx_info.model_uri, "tracking_uri": cfg.tracking.resolved_uri(),
    }
    (out_dir / "registered.json").write_text(json.dumps(result, indent=2))
    log.info("registered %s version %s as @%s", name, version, cfg.tracking.alias)
    return result


def _skip(out_dir: Path, reason: str) -> dict:
    result = {"registered": False, "reason": reason}
    (out_dir / "registered.json").write_text(json.dumps(result, indent=2))
    log.info("not registering: %s", reason)
    return result

