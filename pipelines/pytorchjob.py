"""The train step as a Kubeflow Training Operator PyTorchJob: ``torchrun`` over ``nodes`` pods of
``processes_per_node`` processes each, every process running ``dvpt train`` (DistributedDataParallel).

At compile time :func:`render_train_job` writes the job's manifest into the pipeline (so it is
validated offline and reviewed in the package); at run time the launcher task
(``components.steps.train_pytorchjob``) calls :func:`run_train_job`, which

1. copies the train step's inputs (configuration, preprocessed cache, validation report, stand-in
   backbone, the data's DVC pointer) onto a ReadWriteMany volume the pipeline created for this
   run, mounted at :data:`SHARED_MOUNT` in the launcher and in every job pod;
2. names the job, points it at that volume and makes the launcher's pod its owner (deleting the
   run's pods deletes the job, and frees its accelerators);
3. submits it and waits for ``Succeeded`` (the Kubeflow Training SDK's ``TrainingClient``), with
   the master's log in the error when it fails;
4. copies the train step's folder from the volume into the launcher's output artifact.

The job's output folder is on the volume, so a pod the operator restarts (``OnFailure``), or a
retried launcher, resumes from the last epoch's checkpoint.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from dvpt_core.config import ExperimentConfig, KubeflowConfig
from dvpt_core.checkpoint import CHECKPOINT_FILE
from dvpt_core.steps.pretrain import use_stand_in
from dvpt_core.tracking import read_run_file
from pipelines.cluster import env_vars, gpu_toleration, resources

log = logging.getLogger(__name__)
GROUP, VERSION, KIND, PLURAL = "kubeflow.org", "v1", "PyTorchJob", "pytorchjobs"
# The operator finds the rendezvous port by these names (its defaults, given explicitly).
CONTAINER, PORT_NAME, PORT = "pytorch", "pytorchjob-port", 23456
SHARED_MOUNT = "/mnt/shared"
SHARED_VOLUME, SHM_VOLUME = "shared", "dshm"
# Filled at run time (:func:`instantiate`): the volume the pipeline created for the run.
CLAIM_PLACEHOLDER = "SHARED-CLAIM"
# Inside the shared volume: what the job reads, and the train step folder it writes.
CONFIG_FILE, CACHE_DIR, VALIDATION_DIR, BACKBONE_DIR, DATA_DIR, TRAIN_DIR = (
    "config.json", "cache", "validation", "backbone", "data", "train")
# Finished jobs are kept this long for their status and logs (the operator then deletes them).
KEEP_FINISHED_S = 24 * 3600
POLL_S = 30
# The launcher's pod, from the downward API (the pipeline sets these on the launcher task).
POD_ENV = {"POD_NAME": "metadata.name", "POD_UID": "metadata.uid", "POD_NAMESPACE": "metadata.namespace"}


def torchrun_command(settings: KubeflowConfig) -> list[str]:
    """``torchrun`` of ``dvpt train`` on the volume's inputs. The node's rank and the master's
    address and port are the ones the operator gives each pod (``RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``), which Kubernetes substitutes for ``$(NAME)``."""
    shared = Path(SHARED_MOUNT)
    return [
        "torchrun", f"--nnodes={settings.nodes}", f"--nproc-per-node={settings.processes_per_node}",
        "--node-rank=$(RANK)", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)",
        "-m", "dvpt_core.cli", "train", "--params", str(shared / CONFIG_FILE), "--cache", str(shared / CACHE_DIR),
        "--validation", str(shared / VALIDATION_DIR), "--data", str(shared / DATA_DIR),
        "--out", str(shared / TRAIN_DIR),
    ]


def render_train_job(settings: KubeflowConfig, image: str) -> dict[str, Any]:
    """The PyTorchJob manifest (``kubeflow.org/v1``): one Master and ``nodes - 1`` Workers, each a
    pod of the project image with ``settings``' resources, the MLflow and S3 variables from the
    cluster (``pipelines.cluster``) and the shared volume (claim :data:`CLAIM_PLACEHOLDER`)."""
    container = {
        "name": CONTAINER, "image": image, "command": torchrun_command(settings), "env": env_vars(),
        "ports": [{"name": PORT_NAME, "containerPort": PORT}],
        "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": SHARED_MOUNT}],
    }
    if resources(settings):
        container["resources"] = resources(settings)
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": CLAIM_PLACEHOLDER}}],
    }
    if settings.gpus:
        pod_spec["tolerations"] = [gpu_toleration(settings)]
        # NCCL exchanges through shared memory; a container's default /dev/shm (64 MiB) is too small.
        pod_spec["volumes"].append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}})
        container["volumeMounts"].append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    replica = {"restartPolicy": "OnFailure", "template": {"spec": pod_spec}}
    replicas = {"Master": {"replicas": 1, **replica}}
    if settings.nodes > 1:
        replicas["Worker"] = {"replicas": settings.nodes - 1, **copy.deepcopy(replica)}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": "dvpt-train", "labels": {"app.kubernetes.io/part-of": "dvpt-mlops"}},
        "spec": {
            "pytorchReplicaSpecs": replicas,
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": settings.retries,
                          "activeDeadlineSeconds": settings.job_timeout_s,
                          "ttlSecondsAfterFinished": KEEP_FINISHED_S},
        },
    }


def instantiate(job: dict[str, Any], name: str, namespace: str, claim: str, owner: dict[str, str]) -> dict[str, Any]:
    """A copy of a rendered job named ``name`` in ``namespace``, on volume ``claim``, owned by
    the pod ``owner`` (``POD_NAME``, ``POD_UID``)."""
    job = copy.deepcopy(job)
    job["metadata"].update(name=name, namespace=namespace, ownerReferences=[
        {"apiVersion": "v1", "kind": "Pod", "name": owner["POD_NAME"], "uid": owner["POD_UID"]}])
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        for volume in replica["template"]["spec"]["volumes"]:
            if volume["name"] == SHARED_VOLUME:
                volume["persistentVolumeClaim"]["claimName"] = claim
    return job


def stage_inputs(cfg: ExperimentConfig, data_root: Path, cache: Path, backbone: Path, validation: Path,
                 shared: Path) -> None:
    """The train step's inputs where :func:`torchrun_command` reads them (copies: the job's pods
    cannot see the launcher's artifacts). Of the data only the DVC pointer travels, for lineage."""
    for source, name in ((cache, CACHE_DIR), (validation, VALIDATION_DIR), (backbone, BACKBONE_DIR)):
        if source.is_dir():
            shutil.copytree(source, shared / name, dirs_exist_ok=True)
    pointer = data_root.parent / f"{data_root.name}.dvc"
    if pointer.is_file():
        shutil.copyfile(pointer, shared / f"{DATA_DIR}.dvc")
    staged = use_stand_in(cfg, shared / BACKBONE_DIR)
    (shared / CONFIG_FILE).write_text(staged.to_json())


def run_train_job(job: dict[str, Any], claim: str, cfg: ExperimentConfig, data_root: Path, cache: Path,
                  backbone: Path, validation: Path, out_dir: Path, shared: Path = Path(SHARED_MOUNT)) -> dict[str, Any]:
    """Steps 1-4 of the module docstring (``shared``: where the launcher mounts the volume);
    returns the train step's ``run.json``."""
    from kubeflow.training import TrainingClient

    stage_inputs(cfg, data_root, cache, backbone, validation, shared)
    owner = {key: os.environ[key] for key in POD_ENV}
    name = f"dvpt-train-{uuid.uuid4().hex[:10]}"
    manifest = instantiate(job, name, owner["POD_NAMESPACE"], claim, owner)
    client = TrainingClient(namespace=owner["POD_NAMESPACE"], job_kind=KIND)
    client.custom_api.create_namespaced_custom_object(GROUP, VERSION, owner["POD_NAMESPACE"], PLURAL, manifest)
    log.info("submitted %s %s/%s (%d node(s))", KIND, owner["POD_NAMESPACE"], name,
             sum(r["replicas"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()))
    try:
        client.wait_for_job_conditions(name, owner["POD_NAMESPACE"], job_kind=KIND,
                                       wait_timeout=job["spec"]["runPolicy"]["activeDeadlineSeconds"] + POLL_S,
                                       polling_interval=POLL_S)
    except (RuntimeError, TimeoutError) as err:
        logs, _ = client.get_job_logs(name, owner["POD_NAMESPACE"], job_kind=KIND)
        tail = "\n".join(text[-4000:] for text in logs.values())
        raise RuntimeError(f"{KIND} {name} did not succeed ({err}); its master's log ends:\n{tail}") from None
    shutil.copytree(shared / TRAIN_DIR, out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CHECKPOINT_FILE))
    return read_run_file(out_dir)
