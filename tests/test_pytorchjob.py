"""Training as a Kubeflow Training Operator PyTorchJob: the job compiled into the pipeline, validated
offline against the PyTorchJob CRD's types (the Kubeflow Training SDK's models) and the Kubernetes
pod schema (kubernetes-validate, strict), its torchrun command read by torchrun's and dvpt's own
argument parsers, and the inputs the launcher stages for it."""

from __future__ import annotations

import json
import types
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubeflow.training import ApiClient
from torch.distributed.run import get_args_parser

from dvpt_core.cli import build_parser
from dvpt_core.config import ConfigError, KubeflowConfig, load_config
from dvpt_core.steps.pretrain import BACKBONE_FILE
from dvpt_core.tracking import dvc_data_hash
from pipelines.cluster import MLFLOW_SECRET_KEYS, S3_SECRET_KEYS, TRACKING_KEYS
from pipelines.dvpt_pipeline import compile_pipeline
from pipelines.pytorchjob import CLAIM_PLACEHOLDER, instantiate, render_train_job, stage_inputs
from tests.helpers import tiny_config

KUBERNETES = "1.30"
# What the operator sets in every replica's environment, which Kubernetes substitutes for $(NAME).
OPERATOR_ENV = {"RANK": "1", "MASTER_ADDR": "dvpt-train-master-0", "MASTER_PORT": "23456"}
SETTINGS = KubeflowConfig(train_launcher="pytorchjob", nodes=3, processes_per_node=4, gpus=4, cpu="32",
                          memory="128Gi", shared_storage="50Gi", storage_class="nfs")


def validate_job(job: dict) -> None:
    """The PyTorchJob as the API server would take it: every field one the CRD's types know (a
    round trip through the SDK's generated models drops any other, as the server would prune it),
    and every pod template valid (and free of unknown fields) for Kubernetes."""
    api = ApiClient()
    parsed = api.deserialize(types.SimpleNamespace(data=json.dumps(job)), "KubeflowOrgV1PyTorchJob")
    assert api.sanitize_for_serialization(parsed) == job
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        assert replica["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "replica"},
                                      "template": replica["template"]}, KUBERNETES, strict=True)


def expand(command: list[str]) -> list[str]:
    for name, value in OPERATOR_ENV.items():
        command = [part.replace(f"$({name})", value) for part in command]
    return command


def test_the_compiled_pipeline_launches_a_valid_pytorchjob_running_dvpt_train_under_torchrun(tmp_path) -> None:
    spec, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", tiny_config(), "reg/dvpt:3",
                                                         SETTINGS).read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks["train-pytorchjob"]["dependentTasks"]) >= {"createpvc", "preprocess", "pretrain", "validate"}
    assert tasks["deletepvc"]["dependentTasks"] == ["createpvc", "train-pytorchjob"]
    assert "train" not in tasks and "retryPolicy" in tasks["train-pytorchjob"]
    volume = {name: value["runtimeValue"]["constant"]
              for name, value in tasks["createpvc"]["inputs"]["parameters"].items()}
    assert volume == {"access_modes": ["ReadWriteMany"], "size": "50Gi", "storage_class_name": "nfs",
                      "pvc_name_suffix": "-dvpt-train"}
    launcher = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-pytorchjob"]
    assert launcher["pvcMount"][0]["mountPath"] == "/mnt/shared"
    assert launcher["pvcMount"][0]["taskOutputParameter"]["producerTask"] == "createpvc"
    assert {e["name"]: e["fieldPath"] for e in launcher["fieldPathAsEnv"]} == {
        "POD_NAME": "metadata.name", "POD_UID": "metadata.uid", "POD_NAMESPACE": "metadata.namespace"}

    job = json.loads(tasks["train-pytorchjob"]["inputs"]["parameters"]["job_json"]["runtimeValue"]["constant"])
    validate_job(job)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert {kind: r["replicas"] for kind, r in replicas.items()} == {"Master": 1, "Worker": 2}
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == SETTINGS.job_timeout_s
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "reg/dvpt:3"
        assert container["resources"] == {"requests": {"cpu": "32", "memory": "128Gi"},
                                          "limits": {"cpu": "32", "memory": "128Gi", "nvidia.com/gpu": "4"}}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert [e["name"] for e in container["env"]] == [*TRACKING_KEYS, *MLFLOW_SECRET_KEYS, *S3_SECRET_KEYS]
        assert container["env"][0]["valueFrom"]["configMapKeyRef"] == {
            "name": "dvpt-mlflow", "key": "MLFLOW_TRACKING_URI", "optional": False}
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == [CLAIM_PLACEHOLDER]

        command = expand(container["command"])
        assert command[0] == "torchrun"
        launch = get_args_parser().parse_args(command[1:])
        assert (launch.nnodes, launch.nproc_per_node, launch.node_rank, launch.master_addr, launch.master_port) == (
            "3", "4", 1, "dvpt-train-master-0", 23456)
        assert launch.module and launch.training_script == "dvpt_core.cli"
        train = build_parser().parse_args(launch.training_script_args)
        assert (train.command, train.params, train.cache, train.validation, train.data, train.out) == (
            "train", Path("/mnt/shared/config.json"), Path("/mnt/shared/cache"), Path("/mnt/shared/validation"),
            Path("/mnt/shared/data"), Path("/mnt/shared/train"))

    live = instantiate(job, "dvpt-train-0123456789", "team-a", "run-42-dvpt-train",
                       {"POD_NAME": "dvpt-pipeline-abc-launcher", "POD_UID": "8d1c-uid"})
    validate_job(live)
    assert (live["metadata"]["name"], live["metadata"]["namespace"]) == ("dvpt-train-0123456789", "team-a")
    assert live["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "dvpt-pipeline-abc-launcher", "uid": "8d1c-uid"}]
    for replica in live["spec"]["pytorchReplicaSpecs"].values():
        assert "run-42-dvpt-train" in json.dumps(replica["template"]["spec"]["volumes"])
    assert CLAIM_PLACEHOLDER in json.dumps(job), "the compiled job is left as it was"


def test_a_one_node_cpu_job_is_a_master_alone_with_no_accelerator_settings() -> None:
    job = render_train_job(KubeflowConfig(train_launcher="pytorchjob"), "reg/dvpt:3")
    validate_job(job)
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "tolerations" not in pod and "resources" not in pod["containers"][0]
    assert "--nproc-per-node=1" in pod["containers"][0]["command"]


def test_a_job_cannot_start_more_processes_per_node_than_it_has_gpus() -> None:
    with pytest.raises(ValueError, match="processes_per_node=4 exceeds gpus=2"):
        KubeflowConfig(train_launcher="pytorchjob", gpus=2, processes_per_node=4)


def test_the_launcher_stages_what_dvpt_train_reads_on_the_shared_volume(tmp_path) -> None:
    cfg = tiny_config("model.weights=stand-in", "model.weights_file=/elsewhere/backbone.safetensors")
    cache, validation, backbone = tmp_path / "cache", tmp_path / "validation", tmp_path / "backbone"
    for folder, name in ((cache / "train", "images.npy"), (validation, "validation.json"), (backbone, BACKBONE_FILE)):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(name.encode())
    data_root = tmp_path / "fetched" / "data"
    data_root.mkdir(parents=True)
    (tmp_path / "fetched" / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    shared = tmp_path / "shared"
    shared.mkdir()

    stage_inputs(cfg, data_root, cache, backbone, validation, shared)

    staged = load_config(shared / "config.json")  # as `dvpt train --params` reads it
    assert staged.model.weights_file == shared / "backbone" / BACKBONE_FILE
    assert staged.model_copy(update={"model": cfg.model}) == cfg
    assert (shared / "cache" / "train" / "images.npy").read_bytes() == b"images.npy"
    assert (shared / "validation" / "validation.json").is_file()
    assert dvc_data_hash(shared / "data") == "0123abcd.dir"


def test_cluster_settings_name_the_flag_at_fault(capsys) -> None:
    from dvpt_core.cli import main

    assert main(["kfp", "compile", "--train-launcher", "pytorchjob", "--gpus", "1", "--processes-per-node", "2"]) == 2
    assert "processes_per_node=2 exceeds gpus=1" in capsys.readouterr().err
    assert main(["kfp", "compile", "--backoff", "soon"]) == 2
    assert "--backoff" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        from pipelines.cli import kubeflow_from_args

        kubeflow_from_args(types.SimpleNamespace(cpu="two"))


class FakeTrainingClient:
    """Stands in for the cluster (the Kubernetes API and the Training Operator), not for the
    launcher under test: a created job "runs" by writing what ``dvpt train`` writes on the volume,
    or fails with a log."""

    created: list = []
    succeed = True

    def __init__(self, namespace: str, job_kind: str) -> None:
        assert job_kind == "PyTorchJob"
        self.custom_api = self

    def create_namespaced_custom_object(self, group, version, namespace, plural, body) -> None:
        FakeTrainingClient.created.append((group, version, namespace, plural, body))
        (out := self.shared / "train").mkdir(parents=True, exist_ok=True)
        staged = (self.shared / "config.json").is_file()
        (out / "run.json").write_text(json.dumps({"run_id": "r1", "staged_config": staged}))
        (out / "checkpoint.pt").write_bytes(b"resumable state")
        (out / "adapter").mkdir(exist_ok=True)

    def wait_for_job_conditions(self, name, namespace, job_kind, wait_timeout, polling_interval) -> None:
        if not FakeTrainingClient.succeed:
            raise RuntimeError(f"PyTorchJob {namespace}/{name} is Failed")

    def get_job_logs(self, name, namespace, job_kind):
        return {f"{name}-master-0": "NCCL error: unhandled system error"}, {}


def test_the_launcher_submits_the_job_as_its_pod_s_child_and_returns_the_train_step_folder(tmp_path,
                                                                                          monkeypatch) -> None:
    from pipelines.pytorchjob import run_train_job

    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setattr(FakeTrainingClient, "shared", shared, raising=False)
    monkeypatch.setattr(FakeTrainingClient, "created", [])
    monkeypatch.setattr("kubeflow.training.TrainingClient", FakeTrainingClient)
    for name, value in {"POD_NAME": "launcher-pod", "POD_UID": "uid-7", "POD_NAMESPACE": "team-a"}.items():
        monkeypatch.setenv(name, value)
    job = render_train_job(SETTINGS, "reg/dvpt:3")
    inputs = dict(cfg=tiny_config(), data_root=tmp_path / "data", cache=tmp_path / "cache",
                  backbone=tmp_path / "backbone", validation=tmp_path / "validation")

    summary = run_train_job(job, "run-42-dvpt-train", out_dir=tmp_path / "model", shared=shared, **inputs)

    ((group, version, namespace, plural, body),) = FakeTrainingClient.created
    assert (group, version, namespace, plural) == ("kubeflow.org", "v1", "team-a", "pytorchjobs")
    validate_job(body)
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-7" and "run-42-dvpt-train" in json.dumps(body)
    assert summary == {"run_id": "r1", "staged_config": True}
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"run.json", "adapter"}  # no checkpoint

    monkeypatch.setattr(FakeTrainingClient, "succeed", False)
    with pytest.raises(RuntimeError, match="(?s)did not succeed.*NCCL error"):
        run_train_job(job, "run-42-dvpt-train", out_dir=tmp_path / "again", shared=shared, **inputs)
