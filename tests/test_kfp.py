"""The Kubeflow pipeline: its compiled shape (data from the DVC remote, typed run parameters, the cluster's
ConfigMap and Secrets, resources, tolerations, retries, caching), its submission, and a whole local run
with kfp.local (which also shows evaluate finding the train run through the environment alone)."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from components.steps import configure
from dvpt_core.config import RUN_PARAMETERS, ConfigError, ExperimentConfig, KubeflowConfig, setting_value
from dvpt_core.data.dataset import make_loader
from dvpt_core.data.synthetic.ddr import generate_ddr
from dvpt_core.peft.adapter import load_adapter
from pipelines.dvpt_pipeline import compile_pipeline, run_arguments, run_local, submit
from tests.helpers import tiny_config
from tests.stack_helpers import assert_no_credential_leaks, assert_registered_into_the_stack

# Each task's upstream tasks: the data resolved then fetched, the run's configuration, the steps
# (evaluate and export side by side after train), and the champion's batch inference in the
# condition on the promotion decision.
UPSTREAM = {
    "configure": set(),
    "resolve-data": set(),
    "fetch-data": {"resolve-data"},
    "pretrain": set(),
    "validate": {"fetch-data"},
    "preprocess": {"fetch-data", "validate"},
    "train": {"configure", "fetch-data", "pretrain", "preprocess", "validate"},
    "evaluate": {"configure", "pretrain", "preprocess", "train"},
    "export": {"configure", "pretrain", "preprocess", "train"},
    "register": {"configure", "train", "evaluate", "export"},
    "promote": {"configure", "register"},
    "condition-1": {"configure", "fetch-data", "pretrain", "promote"},
}
# Pure functions of their inputs, keyed by content (the fetched artifact carries the data hash).
CACHED_TASKS = {"configure", "fetch-data", "pretrain", "validate", "preprocess"}
MLFLOW_EXECUTORS = {"exec-train", "exec-evaluate", "exec-register", "exec-promote", "exec-predict"}
DATA_EXECUTORS = {"exec-resolve-data", "exec-fetch-data"}
RETRIED = {"resolve-data", "fetch-data", "evaluate", "register", "promote", "predict"}
KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE"}


def _compiled(path: Path) -> tuple[dict, dict]:
    """The pipeline spec and its Kubernetes platform spec (an empty one when nothing is set)."""
    spec, *platform = yaml.safe_load_all(path.read_text())
    return spec, platform[0] if platform else {}


def _k8s(platform: dict) -> dict:
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _every_task(spec: dict) -> dict[str, dict]:
    """Root tasks and the tasks inside conditions and loops, by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _kind(key: str) -> type:
    """The Python type of the schema field at dotted ``key`` (a Literal's: its values' type)."""
    model: Any = ExperimentConfig
    *sections, last = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    annotation = model.model_fields[last].annotation
    return type(typing.get_args(annotation)[0]) if typing.get_origin(annotation) is typing.Literal else annotation


@pytest.mark.parametrize("image, env_image, expected", [
    ("registry.example.com/dvpt-mlops:1.2", None, "registry.example.com/dvpt-mlops:1.2"),
    (None, "registry.example.com/dvpt-mlops:env", "registry.example.com/dvpt-mlops:env"),
    (None, None, "dvpt-mlops:0.1.0"),
])
def test_compile_wires_the_steps_in_one_image_with_explicit_caching(tmp_path, monkeypatch, image, env_image,
                                                                     expected) -> None:
    if env_image:
        monkeypatch.setenv("DVPT_IMAGE", env_image)
    else:
        monkeypatch.delenv("DVPT_IMAGE", raising=False)
    spec, platform = _compiled(compile_pipeline(tmp_path / "pipeline.yaml", tiny_config(), image))

    tasks = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == UPSTREAM
    every = _every_task(spec)
    steps = {name: task for name, task in every.items() if not name.startswith("condition")}
    # Every task says whether KFP may cache it; the cached ones are keyed by content.
    assert all("cachingOptions" in task for task in steps.values())
    assert {name for name, task in steps.items() if task["cachingOptions"].get("enableCache")} == CACHED_TASKS
    assert tasks["condition-1"]["triggerPolicy"]["condition"].endswith("== 'promoted'")
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {expected}
    # No pip install at start: the image already holds dvpt_core and kfp.
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())
    # No volume: the data come from the DVC remote.
    assert not any("pvcMount" in e for e in _k8s(platform).values())


def test_typed_run_parameters_default_to_the_compiled_configuration_with_the_schema_s_types(tmp_path) -> None:
    cfg = tiny_config("model.method=lora", "train.lr=0.003", "data.label_ratio=0.5", "train.seed=4")
    settings = KubeflowConfig(data_repo="https://git.example.com/team/ddr.git", data_revision="v3")
    spec, _ = _compiled(compile_pipeline(tmp_path / "pipeline.yaml", cfg, "reg/dvpt:1", settings))

    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(parameters) == {"data_repo", "data_path", "data_revision", "config_json", *RUN_PARAMETERS}
    for name, key in RUN_PARAMETERS.items():
        assert parameters[name]["parameterType"] == KFP_TYPES[_kind(key)], name
        assert parameters[name]["defaultValue"] == setting_value(cfg, key), name
    assert {name: parameters[name]["defaultValue"] for name in ("data_repo", "data_path", "data_revision")} == {
        "data_repo": "https://git.example.com/team/ddr.git", "data_path": "data", "data_revision": "v3"}
    assert json.loads(parameters["config_json"]["defaultValue"]) == json.loads(cfg.to_json())
    # Without a compiled repository, a submission must name one.
    spec, _ = _compiled(compile_pipeline(tmp_path / "bare.yaml", cfg, "reg/dvpt:1"))
    assert "defaultValue" not in spec["root"]["inputDefinitions"]["parameters"]["data_repo"]

    # The configure task applies a run's values over the configuration, through the schema.
    run = ExperimentConfig.from_json(configure(cfg.to_json(), method="full", epochs=3, learning_rate=0.01,
                                               label_ratio=0.25, seed=9))
    assert (run.model.method, run.train.epochs, run.train.lr, run.data.label_ratio, run.train.seed) == (
        "full", 3, 0.01, 0.25, 9)
    assert run.model_copy(update={"model": cfg.model, "train": cfg.train, "data": cfg.data}) == cfg
    assert ExperimentConfig.from_json(configure(cfg.to_json(), **run_arguments(cfg))) == cfg
    with pytest.raises(ConfigError, match="data.label_ratio"):
        configure(cfg.to_json(), **{**run_arguments(cfg), "label_ratio": 1.5})


def test_pods_take_the_tracking_uri_and_credentials_from_the_cluster_not_the_parameters(tmp_path) -> None:
    cfg = tiny_config("tracking.tracking_uri=http://alice:s3cret@mlflow.mlflow.svc.cluster.local:5000")
    path = compile_pipeline(tmp_path / "pipeline.yaml", cfg, "reg/dvpt:1")
    assert "s3cret" not in path.read_text() and "mlflow.mlflow.svc" not in path.read_text()
    spec, platform = _compiled(path)

    assert json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])[
        "tracking"]["tracking_uri"] is None
    # evaluate reads only the run's configuration (the configure task's output, made from
    # config_json and the typed parameters, none of which holds a tracking URI) and its artifacts.
    evaluate = spec["root"]["dag"]["tasks"]["evaluate"]["inputs"]
    assert evaluate["parameters"] == {"config_json": {"taskOutputParameter": {
        "outputParameterKey": "Output", "producerTask": "configure"}}}
    assert set(spec["components"]["comp-configure"]["inputDefinitions"]["parameters"]) == {
        "config_json", *RUN_PARAMETERS}

    executors = _k8s(platform)
    assert set(executors) == MLFLOW_EXECUTORS | DATA_EXECUTORS
    for name in MLFLOW_EXECUTORS:
        (config_map,) = executors[name]["configMapAsEnv"]
        assert (config_map["configMapName"], config_map["keyToEnv"], config_map["optional"]) == (
            "dvpt-mlflow", [{"configMapKey": "MLFLOW_TRACKING_URI", "envVar": "MLFLOW_TRACKING_URI"}], False)
        secrets = {s["secretName"]: {k["secretKey"]: k["envVar"] for k in s["keyToEnv"]}
                   for s in executors[name]["secretAsEnv"]}
        assert secrets == {
            "dvpt-mlflow-credentials": {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                        "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"},
            "dvpt-s3-credentials": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
                                    "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"}}, name
    for name in DATA_EXECUTORS:  # DVC's S3 client reads the endpoint as AWS_ENDPOINT_URL
        (secret,) = executors[name]["secretAsEnv"]
        assert secret["secretName"] == "dvpt-s3-credentials"
        assert {k["secretKey"]: k["envVar"] for k in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "MLFLOW_S3_ENDPOINT_URL": "AWS_ENDPOINT_URL"}


def test_train_requests_the_compiled_resources_and_tolerates_the_accelerator_taint(tmp_path, capsys) -> None:
    from dvpt_core.cli import main

    out = tmp_path / "gpu.yaml"
    assert main(["kfp", "compile", "--out", str(out), "--image", "reg/dvpt:1", "--gpus", "2",
                 "--accelerator-type", "nvidia.com/gpu", "--cpu", "8", "--memory", "32Gi"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["gpus"] == 2
    spec, platform = _compiled(out)
    executors = spec["deploymentSpec"]["executors"]
    resources = executors["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "2"
    assert {k: resources[k] for k in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest",
                                      "resourceMemoryLimit")} == {
        "resourceCpuRequest": "8", "resourceCpuLimit": "8", "resourceMemoryRequest": "32Gi",
        "resourceMemoryLimit": "32Gi"}
    assert [name for name, e in executors.items() if "resources" in e["container"]] == ["exec-train"]
    tolerations = {name: e["tolerations"] for name, e in _k8s(platform).items() if "tolerations" in e}
    assert tolerations == {"exec-train": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}

    spec, platform = _compiled(compile_pipeline(tmp_path / "cpu.yaml", tiny_config(), "reg/dvpt:1"))
    assert "resources" not in spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert not any("tolerations" in e for e in _k8s(platform).values())
    assert main(["kfp", "compile", "--out", str(out), "--memory", "lots"]) == 2
    assert "--memory" in capsys.readouterr().err


def test_transient_steps_retry_with_exponential_backoff(tmp_path) -> None:
    settings = KubeflowConfig(retries=5, backoff="1m", backoff_factor=3, backoff_max="1h")
    spec, _ = _compiled(compile_pipeline(tmp_path / "pipeline.yaml", tiny_config(), "reg/dvpt:1", settings))
    policies = {name: task["retryPolicy"] for name, task in _every_task(spec).items() if "retryPolicy" in task}
    assert set(policies) == RETRIED
    assert all(policy == {"maxRetryCount": 5, "backoffDuration": "60s", "backoffFactor": 3.0,
                          "backoffMaxDuration": "3600s"} for policy in policies.values())


def test_batch_inference_pipeline_compiles_to_pretrain_then_predict(tmp_path) -> None:
    from pipelines.predict_pipeline import compile_predict

    spec, platform = _compiled(compile_predict(tmp_path / "predict.yaml", tiny_config(), "reg/dvpt:1",
                                               data_pvc="new-images"))
    tasks = spec["root"]["dag"]["tasks"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()} == {
        "pretrain": set(), "predict": {"pretrain"}}
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"data_dir", "config_json", "model_uri"}
    (executor,) = _k8s(platform).values()
    assert executor["pvcMount"][0]["mountPath"] == "/mnt/data"
    assert executor["configMapAsEnv"][0]["configMapName"] == "dvpt-mlflow"


class FakeClient:
    """Stands in for the KFP API server (not the code under test): records what it is sent."""

    calls: dict = {}

    def __init__(self, **kwargs):
        FakeClient.calls = {"client": kwargs}

    def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
        FakeClient.calls["package"] = _compiled(Path(pipeline_file))[0]
        FakeClient.calls["run"] = kwargs
        return type("Run", (), {"run_id": "run-123"})()


def test_submit_compiles_and_sends_the_run_with_its_arguments(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("kfp.Client", FakeClient)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
    arguments = {"data_repo": "https://git.example.com/ddr.git", "data_revision": "v2", "epochs": 3}
    result = submit(tiny_config(), host="https://kf.example.com/pipeline", arguments=arguments,
                    experiment="dvpt-tests", namespace="team-a", run_name="tiny", image="reg/dvpt:9")

    assert result["run_id"] == "run-123"
    assert result["url"] == "https://kf.example.com/pipeline/#/runs/details/run-123"
    calls = FakeClient.calls
    assert calls["client"] == {"host": "https://kf.example.com/pipeline", "existing_token": "secret-token",
                               "namespace": "team-a"}
    assert calls["run"] == {"arguments": arguments, "run_name": "tiny", "experiment_name": "dvpt-tests",
                            "namespace": "team-a"}
    executors = calls["package"]["deploymentSpec"]["executors"].values()
    assert {e["container"]["image"] for e in executors} == {"reg/dvpt:9"}


def test_cli_submit_sends_run_parameters_and_refuses_compile_settings_with_a_package(tmp_path, monkeypatch,
                                                                                     capsys) -> None:
    from dvpt_core.cli import main

    monkeypatch.setattr("kfp.Client", FakeClient)
    package = compile_pipeline(tmp_path / "pipeline.yaml", tiny_config(), "reg/dvpt:1")
    submit_args = ["kfp", "submit", "--package", str(package), "--host", "https://kf.example.com/pipeline"]
    assert main([*submit_args, "--method", "lora", "--epochs", "3", "--learning-rate", "0.02",
                 "--data-repo", "https://git.example.com/ddr.git", "--data-revision", "v2"]) == 0
    assert FakeClient.calls["run"]["arguments"] == {
        "method": "lora", "epochs": 3, "learning_rate": 0.02, "data_repo": "https://git.example.com/ddr.git",
        "data_revision": "v2"}
    capsys.readouterr()
    assert main([*submit_args, "--gpus", "1"]) == 2
    assert "--gpus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses what is not a model.method
        main([*submit_args, "--method", "nope"])


def test_cli_compile_prints_the_package(tmp_path, capsys) -> None:
    from dvpt_core.cli import main

    out = tmp_path / "p.yaml"
    assert main(["kfp", "compile", "--out", str(out), "--image", "reg/dvpt:cli", "--set", "model.prompts=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["package"], printed["image"]) == (str(out), "reg/dvpt:cli")
    assert printed["settings"] == KubeflowConfig().model_dump()
    config = json.loads(_compiled(out)[0]["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
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
    # The tasks' configuration held no tracking URI (as in a compiled package), yet evaluate logged
    # to the train run: the address reached every task through MLFLOW_TRACKING_URI alone.
    run = mlflow.MlflowClient().get_run(result["run_id"])
    assert run.data.params["tracking.tracking_uri"] == ""
    assert {"test_kappa", "test_accuracy"} <= set(run.data.metrics)

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

@pytest.mark.slow
def test_local_run_stops_at_validation_on_a_corrupt_image(tmp_path) -> None:
    cfg = tiny_config("tracking.tracking_uri=sqlite:///unused.db")
    data = tmp_path / "data"
    generate_ddr(data, cfg.synthetic, cfg.data.class_names)
    first = (data / "train.txt").read_text().split()[0]
    (data / "train" / first).write_bytes(b"not a jpeg")

    with pytest.raises(RuntimeError, match="validate"):
        run_local(cfg, data, tmp_path / "kfp")
    (run_dir,) = (tmp_path / "kfp").glob("dvpt-pipeline-*")
    # Nothing downstream of validation ran (the configuration and pretrain do not depend on it and
    # may run first).
    assert {p.name for p in run_dir.iterdir() if p.is_dir()} - {"configure", "pretrain"} == {"validate"}
