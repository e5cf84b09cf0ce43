"""The Kubeflow pipeline: its compiled shape, its submission, and a whole local run with kfp.local."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dvpt_core.data.dataset import make_loader
from dvpt_core.data.synthetic.ddr import generate_ddr
from dvpt_core.peft.adapter import load_adapter
from pipelines.dvpt_pipeline import compile_pipeline, run_local, submit
from tests.helpers import tiny_config
from tests.stack_helpers import assert_no_credential_leaks, assert_registered_into_the_stack

ROOT = Path(__file__).resolve().parents[1]
# Each task's upstream tasks: the steps, evaluate and export side by side after train, and the
# champion's batch inference in the condition on the promotion decision.
UPSTREAM = {
    "pretrain": set(),
    "validate": set(),
    "preprocess": {"validate"},
    "train": {"pretrain", "preprocess", "validate"},
    "evaluate": {"pretrain", "preprocess", "train"},
    "export": {"pretrain", "preprocess", "train"},
    "register": {"train", "evaluate", "export"},
    "promote": {"register"},
    "condition-1": {"pretrain", "promote"},
}


def _compiled(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("image, env_image, expected", [
    ("registry.example.com/dvpt-mlops:1.2", None, "registry.example.com/dvpt-mlops:1.2"),
    (None, "registry.example.com/dvpt-mlops:env", "registry.example.com/dvpt-mlops:env"),
    (None, None, "dvpt-mlops:0.1.0"),
])
def test_compile_wires_seven_steps_in_one_image(tmp_path, monkeypatch, image, env_image, expected) -> None:
    if env_image:
        monkeypatch.setenv("DVPT_IMAGE", env_image)
    else:
        monkeypatch.delenv("DVPT_IMAGE", raising=False)
    cfg = tiny_config("tracking.tracking_uri=http://mlflow.mlflow.svc.cluster.local:5000")
    spec = _compiled(compile_pipeline(tmp_path / "pipeline.yaml", cfg, image))

    tasks = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == UPSTREAM
    # Only the stand-in backbone, a function of the configuration alone, is reused from KFP's cache.
    assert {name for name, task in tasks.items()
            if task.get("cachingOptions", {}).get("enableCache")} == {"pretrain"}
    assert tasks["condition-1"]["triggerPolicy"]["condition"].endswith("== 'promoted'")
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {expected}
    # No pip install at start: the image already holds dvpt_core and kfp.
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())

    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {"data_dir", "config_json"}
    assert "defaultValue" not in parameters["data_dir"]
    assert json.loads(parameters["config_json"]["defaultValue"]) == json.loads(cfg.to_json())


def test_compile_mounts_the_data_volume_where_data_is_read(tmp_path) -> None:
    path = compile_pipeline(tmp_path / "pipeline.yaml", tiny_config(), "reg/dvpt:1", data_pvc="ddr-data")
    _, platform = yaml.safe_load_all(path.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-validate", "exec-preprocess", "exec-train", "exec-predict"}
    assert {(m["constant"], m["mountPath"]) for e in executors.values() for m in e["pvcMount"]} == {
        ("ddr-data", "/mnt/data")}


def test_batch_inference_pipeline_compiles_to_pretrain_then_predict(tmp_path) -> None:
    from pipelines.predict_pipeline import compile_predict

    path = compile_predict(tmp_path / "predict.yaml", tiny_config(), "reg/dvpt:1", data_pvc="ddr-data")
    spec, platform = yaml.safe_load_all(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == {
        "pretrain": set(), "predict": {"pretrain"}}
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"data_dir", "config_json", "model_uri"}
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == {"exec-predict"}


def test_mlflow_manifest_accepts_the_in_cluster_host_on_one_worker() -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    docs = yaml.safe_load_all((ROOT / "infra/k8s/mlflow.yaml").read_text())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in command if arg.startswith("--"))
    assert flags["workers"] == "1"
    allowed = flags["allowed-hosts"].split(",")
    for host in ("mlflow.mlflow.svc.cluster.local:5000", "mlflow:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example.com")


def test_submit_compiles_and_sends_the_run(tmp_path, monkeypatch) -> None:
    calls = {}

    class FakeClient:
        def __init__(self, **kwargs):
            calls["client"] = kwargs

        def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
            calls["package"] = _compiled(Path(pipeline_file))
            calls["run"] = kwargs
            return type("Run", (), {"run_id": "run-123"})()

    monkeypatch.setattr("kfp.Client", FakeClient)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
    result = submit(tiny_config(), host="https://kf.example.com/pipeline", data_dir="/mnt/data/ddr",
                    experiment="dvpt-tests", namespace="team-a", run_name="tiny", image="reg/dvpt:9")

    assert result["run_id"] == "run-123"
    assert result["url"] == "https://kf.example.com/pipeline/#/runs/details/run-123"
    assert calls["client"] == {"host": "https://kf.example.com/pipeline", "existing_token": "secret-token",
                               "namespace": "team-a"}
    assert calls["run"] == {"arguments": {"data_dir": "/mnt/data/ddr"}, "run_name": "tiny",
                            "experiment_name": "dvpt-tests", "namespace": "team-a"}
    executors = calls["package"]["deploymentSpec"]["executors"].values()
    assert {e["container"]["image"] for e in executors} == {"reg/dvpt:9"}


def test_cli_compile_prints_the_package(tmp_path, capsys) -> None:
    from dvpt_core.cli import main

    out = tmp_path / "p.yaml"
    assert main(["kfp", "compile", "--out", str(out), "--image", "reg/dvpt:cli", "--set", "model.prompts=3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"package": str(out), "image": "reg/dvpt:cli", "data_pvc": None,
                                                   "tracking_secret": None}
    config = json.loads(_compiled(out)["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert config["model"]["prompts"] == 3


@pytest.mark.slow
def test_local_run_registers_a_challenger_that_predicts_like_the_adapter(tmp_path, production_stack, monkeypatch,
                                                                       capfd) -> None:
    """The whole local run tracking into the production stack (MLflow on PostgreSQL, artifacts in
    SeaweedFS), its steps holding the S3 credentials as the cluster's pods do (from a Secret)."""
    mlflow_server = production_stack.tracking_uri
    for key, value in production_stack.s3.environment().items():
        monkeypatch.setenv(key, value)
    name = "kfp-tiny"
    cfg = tiny_config(f"tracking.tracking_uri={mlflow_server}", f"tracking.registered_model={name}",
                      "tracking.experiment=kfp-tests")
    data = tmp_path / "data"
    generate_ddr(data, cfg.synthetic, cfg.data.class_names)

    result = run_local(cfg, data, tmp_path / "kfp")

    assert result["alias"] == "challenger"
    assert result["random_weights"] == "true"  # as the train step records it (an MLflow tag value)
    mlflow.set_tracking_uri(mlflow_server)
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "challenger")
    assert version.version == result["version"]
    assert {"kappa", "accuracy"} <= set(result["test_metrics"])

    run_dir = Path(result["run_dir"])
    assert "data:image/png;base64," in (run_dir / "evaluate/report").read_text()
    assert "dataset_manifest" in (run_dir / "validate/data_docs").read_text()
    # RANDOM WEIGHTS: the gate rejects the version, so the champion's batch inference never runs.
    assert result["promotion"]["decision"] == "rejected" and "RANDOM WEIGHTS" in result["promotion"]["reason"]
    assert not (run_dir / "predict").exists()
    model = load_adapter(run_dir / "train/model/adapter")
    info = model.info
    images, _ = next(iter(make_loader(run_dir / "preprocess/cache/test", info.mean, info.std, False, cfg)))
    with torch.no_grad():
        expected = torch.softmax(model(images), dim=1).numpy()
    # The served model takes the cached uint8 images (already at its size) and normalises them itself.
    raw = np.load(run_dir / "preprocess/cache/test/images.npy")[: len(images)]
    served = mlflow.pyfunc.load_model(f"models:/{name}@challenger").predict(pd.DataFrame({"image": list(raw)}))
    probabilities = np.array([[row[c] for c in cfg.data.class_names] for row in served["probabilities"]])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5, rtol=0)

    assert_registered_into_the_stack(production_stack, name, "challenger", run_dir / "train/model/adapter",
                                     run_dir / "export/onnx_model/model.onnx")
    printed = capfd.readouterr()
    assert "register" in printed.out + printed.err  # the tasks' logs were captured
    assert_no_credential_leaks(production_stack, [printed.out, printed.err], [tmp_path / "kfp"])


def test_local_run_stops_at_validation_on_a_corrupt_image(tmp_path) -> None:
    cfg = tiny_config("tracking.tracking_uri=sqlite:///unused.db")
    data = tmp_path / "data"
    generate_ddr(data, cfg.synthetic, cfg.data.class_names)
    first = (data / "train.txt").read_text().split()[0]
    (data / "train" / first).write_bytes(b"not a jpeg")

    with pytest.raises(RuntimeError, match="validate"):
        run_local(cfg, data, tmp_path / "kfp")
    (run_dir,) = (tmp_path / "kfp").glob("dvpt-pipeline-*")
    # Nothing downstream of validation ran (pretrain does not depend on it and may run first).
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} - {"pretrain"} == {"validate"}
