"""Register step: the adapter as an MLflow model version (a pyfunc), the ONNX graph beside it,
and the configured alias (``challenger``) on the new version.

Promotion is an alias move (``dvpt promote``): MLflow stages are deprecated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import dvpt_core
from dvpt_core.config import ExperimentConfig
from dvpt_core.peft.adapter import read_adapter_config
from dvpt_core.serving import pyfunc_model
from dvpt_core.tracking import connect, read_run_file, resume_run

log = logging.getLogger(__name__)
SERVING_REQUIREMENTS = [f"dvpt-mlops=={dvpt_core.__version__}"]


def register(cfg: ExperimentConfig, train_dir: Path, export_dir: Path, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir = Path(train_dir) / "adapter"
    meta = read_adapter_config(adapter_dir)
    run = read_run_file(train_dir)
    size = meta["image_size"]
    example = np.zeros((1, 3, size, size), dtype=np.float32)
    signature = infer_signature(example, np.zeros((1, len(meta["class_names"])), dtype=np.float32))
    name = cfg.tracking.registered_model
    with resume_run(cfg, run["run_id"]):
        info = mlflow.pyfunc.log_model(
            name="adapter_model",
            python_model=pyfunc_model.__file__,
            artifacts={pyfunc_model.ADAPTER_ARTIFACT: str(adapter_dir)},
            signature=signature,
            input_example=example,
            pip_requirements=SERVING_REQUIREMENTS,
            registered_model_name=name,
        )
        onnx_info = mlflow.onnx.log_model(
            onnx.load(str(Path(export_dir) / "model.onnx")), name="onnx_model", signature=signature,
            pip_requirements=["onnxruntime"],
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_registered_model_alias(name, cfg.tracking.alias, version)
    tags = {
        "backbone": meta["backbone"], "backbone_fingerprint": meta["backbone_fingerprint"],
        "random_weights": str(meta["random_weights"]).lower(), "method": meta["method"],
        "data_dvc_md5": run.get("data_dvc_md5", "untracked"), "git_commit": run.get("git_commit", "unknown"),
        "onnx_model_uri": onnx_info.model_uri,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    result = {
        "registered_model": name, "version": version, "alias": cfg.tracking.alias,
        "model_uri": f"models:/{name}@{cfg.tracking.alias}", "run_id": run["run_id"],
        "pyfunc_uri": info.model_uri, "onnx_uri": onnx_info.model_uri, "tracking_uri": cfg.tracking.resolved_uri(),
    }
    (out_dir / "registered.json").write_text(json.dumps(result, indent=2))
    log.info("registered %s version %s as @%s", name, version, cfg.tracking.alias)
    return result


def promote(cfg: ExperimentConfig, version: str, alias: str = "champion") -> dict:
    """Point ``alias`` (default ``champion``) at ``version`` of the configured registered model."""
    connect(cfg)
    client = MlflowClient()
    name = cfg.tracking.registered_model
    client.get_model_version(name, version)
    client.set_registered_model_alias(name, alias, version)
    log.info("%s version %s is now @%s", name, version, alias)
    return {"registered_model": name, "version": version, "alias": alias}
