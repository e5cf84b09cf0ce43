"""`dvc repro` runs every step on a tiny dataset and registers a servable adapter, tracking into the
production stack (MLflow on PostgreSQL, artifacts in a SeaweedFS bucket: ``production_stack``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dvpt_core.data.dataset import CachedSplit
from dvpt_core.peft.adapter import load_adapter
from tests.helpers import TINY, params_tree
from tests.stack_helpers import assert_no_credential_leaks, assert_registered_into_the_stack

ROOT = Path(__file__).resolve().parents[1]


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)


def dvc_params(items: list[str]) -> dict:
    """params.yaml for the overrides ``items``, with every section dvc.yaml's stages track present
    (DVC needs them; an empty one means the schema's defaults)."""
    params = params_tree(items)
    for section in ("data", "pretrain", "export", "promotion"):
        params.setdefault(section, {})
    params["model"].setdefault("backbone_kwargs", {})
    return params


def dvc_project(root: Path, params: dict) -> Path:
    """A git + DVC project at ``root`` with this checkout's dvc.yaml and dvpt_core, and ``params``."""
    root.mkdir()
    shutil.copy(ROOT / "dvc.yaml", root)
    shutil.copy(ROOT / ".gitignore", root)
    shutil.copytree(ROOT / "dvpt_core", root / "dvpt_core", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _git(root, "init", "-q")
    assert _dvc(root, "init", "-q").returncode == 0
    subprocess.run([sys.executable, "-m", "dvpt_core.cli", "generate-data", "--params", "params.yaml",
                    "--out", "data"], cwd=root, check=True, capture_output=True)
    assert _dvc(root, "add", "data").returncode == 0
    return root


def _git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args], cwd=project,
                   check=True, capture_output=True)


def _find(tree: object, key: str) -> list:
    """Every value stored under ``key`` anywhere in a JSON tree."""
    if isinstance(tree, dict):
        return [v for k, v in tree.items() if k == key] + [x for v in tree.values() for x in _find(v, key)]
    if isinstance(tree, list):
        return [x for v in tree for x in _find(v, key)]
    return []


@pytest.mark.slow
def test_dvc_repro_registers_a_challenger_and_experiments_keep_their_metrics(tmp_path, production_stack,
                                                                            monkeypatch) -> None:
    mlflow_server = production_stack.tracking_uri
    # The steps hold S3 credentials as a user with a DVC S3 remote does; none may reach MLflow.
    for key, value in production_stack.s3.environment().items():
        monkeypatch.setenv(key, value)
    params = dvc_params([*TINY, f"tracking.tracking_uri={mlflow_server}", "tracking.registered_model=dvc-tiny"])
    project = dvc_project(tmp_path / "project", params)
    repro = _dvc(project, "repro")
    assert repro.returncode == 0, repro.stdout + repro.stderr
    for stage in ("pretrain", "validate", "preprocess", "train", "evaluate", "export", "register", "promote"):
        assert f"Running stage '{stage}'" in repro.stdout

    registered = json.loads((project / "outputs/registry/registered.json").read_text())
    assert registered["alias"] == "challenger"
    metrics = json.loads((project / "outputs/evaluation/metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["random_weights"] is True
    assert (project / "outputs/export/model.onnx").stat().st_size > 0
    assert json.loads((project / "outputs/export/export.json").read_text())["max_abs_diff"] <= 1e-4

    mlflow.set_tracking_uri(mlflow_server)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("dvc-tiny", "challenger")
    assert version.version == registered["version"]
    assert version.tags["random_weights"] == "true"
    data_md5 = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"]
    assert version.tags["data_dvc_md5"] == data_md5
    run = client.get_run(version.run_id)
    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == {data_md5}
    decision = json.loads((project / "outputs/promotion/decision.json").read_text())
    assert decision["decision"] == "rejected" and "RANDOM WEIGHTS" in decision["reason"]
    pyfunc = mlflow.pyfunc.load_model("models:/dvc-tiny@challenger")
    model = load_adapter(project / "outputs/train/adapter")
    split = CachedSplit(project / "outputs/cache/test", model.info.mean, model.info.std)
    batch = torch.stack([split[i][0] for i in range(4)])
    with torch.no_grad():
        expected = torch.softmax(model(batch), dim=1).numpy()
    # The served model takes the cached uint8 images (already at its size) and normalises them itself.
    raw = list(split.images[:4])
    served = pyfunc.predict(pd.DataFrame({"image": raw}))
    names = json.loads((project / "outputs/train/adapter/adapter.json").read_text())["class_names"]
    probabilities = np.array([[row[c] for c in names] for row in served["probabilities"]])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0)
    # Before the experiment below replaces outputs/ with its own (unregistered) results.
    assert_registered_into_the_stack(production_stack, "dvc-tiny", "challenger", project / "outputs/train/adapter",
                                     project / "outputs/export/model.onnx")

    again = _dvc(project, "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout

    # An experiment re-runs only what train.epochs feeds, keeps its metrics and leaves the registry alone.
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "baseline")
    exp = _dvc(project, "exp", "run", "-S", "train.epochs=2")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    ran = {stage for stage in ("pretrain", "validate", "preprocess", "train", "evaluate", "export", "register",
                               "promote") if f"Running stage '{stage}'" in exp.stdout}
    assert ran == {"train", "evaluate", "export", "register", "promote"}
    shown = _dvc(project, "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    kappas = _find(json.loads(shown.stdout), "kappa")
    assert len(kappas) >= 2 and all(isinstance(k, float) for k in kappas)
    assert [v.version for v in client.search_model_versions("name='dvc-tiny'")] == [registered["version"]]
    plots = _dvc(project, "plots", "show", "--json")
    assert plots.returncode == 0 and not json.loads(plots.stdout).get("errors"), plots.stdout[:2000]
    assert {"Loss", "outputs/train/history.csv", "outputs/evaluation/figures/confusion_matrix.png"} <= set(
        json.loads(plots.stdout)["data"])

    assert_no_credential_leaks(production_stack, [p.stdout + p.stderr for p in (repro, again, exp)],
                               [project / "outputs"])
