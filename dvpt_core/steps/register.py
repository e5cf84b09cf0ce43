"""Register step: the trained LoggedModel as a new MLflow model version, the ONNX graph beside it,
and the configured alias (``challenger``) on the new version.

Registration is atomic and idempotent. Everything that can be checked is checked before a version
exists (the alias name, the adapter and ONNX files, a finished and synced train run); the version
is created with its lineage tags and description in the same call, so no version is ever READY
without them; a failure after creation (the alias move) deletes the version again (or, when even
that fails, tags it ``dvpt.registration=failed``); and registering the same train run twice returns
the version the first call made. ``registered.json`` is written last. The version's model card
(``dvpt_core.registry.model_card``) then replaces its description.

Promotion to ``champion`` is the quality gate of ``dvpt promote`` (``dvpt_core.registry.promotion``):
an alias move, MLflow stages being deprecated.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import mlflow
import onnx
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from dvpt_core.config import ExperimentConfig
from dvpt_core.models.backbone import RANDOM_WEIGHTS_WARNING, STAND_IN_WARNING
from dvpt_core.peft.adapter import adapter_task, check_against_adapter, verify_adapter
from dvpt_core.registry.model_card import publish_model_card
from dvpt_core.registry.versions import get_version
from dvpt_core.secrets import mask_uri
from dvpt_core.serving.logged_model import onnx_signature
from dvpt_core.tracking import connect, dvc_experiment, read_run_file, resume_run

log = logging.getLogger(__name__)
# MLflow's alias rules: letters, digits, '_' and '-', not "latest" and not a version ("v3").
ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
RUN_TAG = "dvpt.run_id"
ONNX_MODEL_NAME = "onnx_model"


class RegistrationError(RuntimeError):
    """The adapter cannot be registered as configured; no version was left behind."""


def register(cfg: ExperimentConfig, train_dir: Path, export_dir: Path, out_dir: Path) -> dict:
    """A version of ``tracking.registered_model`` pointing at the LoggedModel the train step
    logged (the served model is the trained one), aliased ``tracking.alias``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    experiment = dvc_experiment()
    if experiment and not cfg.tracking.register_experiments:
        return _skip(out_dir, f"DVC experiment {experiment}: registering from experiments is off "
                              "(tracking.register_experiments=true turns it on)")
    adapter_dir, onnx_path = Path(train_dir) / "adapter", Path(export_dir) / "model.onnx"
    meta = verify_adapter(adapter_dir)
    check_against_adapter(cfg, meta, adapter_dir)
    run = read_run_file(train_dir)
    _precheck(cfg.tracking.alias, run, onnx_path, train_dir)
    connect(cfg)
    name, client = cfg.tracking.registered_model, MlflowClient()
    version = _existing(client, name, run["run_id"])
    if version is None:
        onnx_uri = _log_onnx(cfg, run, onnx_path, adapter_dir)
        version = _create(client, name, run, _tags(meta, run, onnx_uri), _description(meta, run))
    else:
        log.info("run %s is already %s version %s: not registering it again", run["run_id"], name, version.version)
    try:
        client.set_registered_model_alias(name, cfg.tracking.alias, version.version)
    except (mlflow.MlflowException, OSError) as err:
        _undo(client, version)
        raise RegistrationError(f"could not set alias {cfg.tracking.alias!r} on {name} version {version.version} "
                                f"({err}); the version was removed, nothing is registered") from None
    publish_model_card(client, get_version(client, name, version.version), cfg.promotion)
    result = {
        "registered": True, "registered_model": name, "version": str(version.version), "alias": cfg.tracking.alias,
        "model_uri": f"models:/{name}@{cfg.tracking.alias}", "run_id": run["run_id"],
        "pyfunc_uri": run["model_uri"], "onnx_uri": version.tags.get("onnx_model_uri", ""),
        "tracking_uri": mask_uri(cfg.tracking.resolved_uri()),
    }
    tmp = out_dir / f".registered.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out_dir / "registered.json")
    log.info("registered %s version %s as @%s", name, version.version, cfg.tracking.alias)
    return result


def _precheck(alias: str, run: dict[str, Any], onnx_path: Path, train_dir: Path) -> None:
    if not ALIAS.match(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise RegistrationError(f"tracking.alias {alias!r} is not a valid MLflow alias (letters, digits, '_' "
                                "and '-'; not 'latest' nor a version such as 'v3')")
    if not onnx_path.is_file():
        raise RegistrationError(f"{onnx_path} does not exist: run the export step first")
    if not run.get("synced") or not run.get("model_uri"):
        raise RegistrationError(f"the train run in {train_dir} has not reached MLflow yet: "
                                f"run dvpt sync --train {train_dir} first")


def _existing(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The READY version this train run already became, if any."""
    try:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except mlflow.MlflowException:
        return None
    ready = [v for v in versions if v.status == "READY" and v.tags.get("dvpt.registration") != "failed"]
    return max(ready, key=lambda v: int(v.version)) if ready else None


def _log_onnx(cfg: ExperimentConfig, run: dict[str, Any], onnx_path: Path, adapter_dir: Path) -> str:
    """The ONNX graph as a second LoggedModel of the train run (reused when a failed attempt
    already logged it)."""
    found = mlflow.search_logged_models(experiment_ids=[run["experiment_id"]], output_format="list",
                                        filter_string=f"source_run_id = '{run['run_id']}' AND name = '{ONNX_MODEL_NAME}'")
    if found:
        return f"models:/{found[0].model_id}"
    signature = onnx_signature(adapter_dir)
    with resume_run(cfg, run["run_id"]):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name=ONNX_MODEL_NAME, signature=signature,
                                     pip_requirements=["onnxruntime"])
    return info.model_uri


def _create(client: MlflowClient, name: str, run: dict[str, Any], tags: dict[str, str],
            description: str) -> ModelVersion:
    try:
        client.create_registered_model(name)
    except mlflow.MlflowException as err:
        if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
            raise
    return client.create_model_version(name, source=run["model_uri"], run_id=run["run_id"], tags=tags,
                                       description=description, model_id=run["model_id"])


def _undo(client: MlflowClient, version: ModelVersion) -> None:
    try:
        client.delete_model_version(version.name, version.version)
    except (mlflow.MlflowException, OSError):
        try:
            client.set_model_version_tag(version.name, version.version, "dvpt.registration", "failed")
        except (mlflow.MlflowException, OSError):
            log.error("%s version %s could be neither removed nor marked failed", version.name, version.version)


def _tags(meta: dict[str, Any], run: dict[str, Any], onnx_uri: str) -> dict[str, str]:
    return {
        RUN_TAG: run["run_id"], "backbone": meta["backbone"], "backbone_fingerprint": meta["backbone_fingerprint"],
        "random_weights": str(meta["random_weights"]).lower(),
        "stand_in_weights": str(meta.get("stand_in", False)).lower(), "method": meta["method"],
        "task": adapter_task(meta),
        "data_dvc_md5": run.get("data_dvc_md5", "untracked"), "git_commit": run.get("git_commit", "unknown"),
        "dvc_experiment": run.get("dvc_experiment", ""), "onnx_model_uri": onnx_uri,
    }


def _description(meta: dict[str, Any], run: dict[str, Any]) -> str:
    lines = [f"{meta['method']} adapter over {meta['backbone']} (weights fingerprint "
             f"{meta['backbone_fingerprint'][:12]}), {adapter_task(meta)} of {len(meta['class_names'])} classes, "
             "trained in run "
             f"{run['run_id']} on data {run.get('data_dvc_md5', 'untracked')} at commit {run.get('git_commit')}."]
    if meta["random_weights"]:
        lines.append(RANDOM_WEIGHTS_WARNING.format(name=meta["backbone"], seed=meta["model"].get("init_seed", 0)))
    elif meta.get("stand_in"):
        lines.append(STAND_IN_WARNING.format(name=meta["backbone"], file=meta["model"].get("weights_file")))
    return "\n\n".join(lines)


def _skip(out_dir: Path, reason: str) -> dict:
    result = {"registered": False, "reason": reason}
    (out_dir / "registered.json").write_text(json.dumps(result, indent=2))
    log.info("not registering: %s", reason)
    return result

