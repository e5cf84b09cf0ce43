"""What the pipelines' pods get from the cluster: the MLflow address and credentials, the S3
credentials, compute resources, GPU tolerations and retries.

Nothing here is a pipeline parameter, so nothing secret or cluster-specific is compiled into a
package or shown in the KFP UI. The names are fixed; ``infra/`` creates them (in every namespace
that runs the pipelines):

- ConfigMap ``dvpt-mlflow``, key ``MLFLOW_TRACKING_URI``: the tracking server. Required: a pod
  without it would log to a SQLite file of its own, and the next pod would not find the run.
- Secret ``dvpt-mlflow-credentials``, keys ``MLFLOW_TRACKING_USERNAME`` and
  ``MLFLOW_TRACKING_PASSWORD`` (MLflow's client reads them). Optional: a server without
  authentication needs none.
- Secret ``dvpt-s3-credentials``, keys ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
  ``MLFLOW_S3_ENDPOINT_URL``: for MLflow's artifact store and the DVC remote (which reads the
  endpoint as ``AWS_ENDPOINT_URL``, the name boto reads). Optional as well.

The same variables reach a Training Operator job's pods through :func:`env_vars`.
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from dvpt_core.config import KubeflowConfig

TRACKING_CONFIG_MAP = "dvpt-mlflow"
TRACKING_KEYS = ("MLFLOW_TRACKING_URI",)
MLFLOW_SECRET = "dvpt-mlflow-credentials"
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
S3_SECRET = "dvpt-s3-credentials"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")
# The S3 endpoint under the name DVC's S3 client (boto) reads.
S3_ENDPOINT_FOR_DVC = {"MLFLOW_S3_ENDPOINT_URL": "AWS_ENDPOINT_URL"}


def use_tracking(*tasks: dsl.PipelineTask) -> None:
    """The tasks that talk to MLflow: its address, its credentials and the artifact store's."""
    for task in tasks:
        kubernetes.use_config_map_as_env(task, TRACKING_CONFIG_MAP, {key: key for key in TRACKING_KEYS})
        kubernetes.use_secret_as_env(task, MLFLOW_SECRET, {key: key for key in MLFLOW_SECRET_KEYS}, optional=True)
        kubernetes.use_secret_as_env(task, S3_SECRET, {key: key for key in S3_SECRET_KEYS}, optional=True)


def use_data_remote(*tasks: dsl.PipelineTask) -> None:
    """The tasks that read the DVC remote: the S3 key pair and endpoint."""
    keys = {key: key for key in S3_SECRET_KEYS if key not in S3_ENDPOINT_FOR_DVC} | S3_ENDPOINT_FOR_DVC
    for task in tasks:
        kubernetes.use_secret_as_env(task, S3_SECRET, keys, optional=True)


def env_vars() -> list[dict]:
    """:func:`use_tracking`'s variables as a container's ``env`` (for manifests the pipeline submits)."""
    sources = [(TRACKING_CONFIG_MAP, TRACKING_KEYS, "configMapKeyRef", False),
               (MLFLOW_SECRET, MLFLOW_SECRET_KEYS, "secretKeyRef", True),
               (S3_SECRET, S3_SECRET_KEYS, "secretKeyRef", True)]
    return [{"name": key, "valueFrom": {ref: {"name": name, "key": key, "optional": optional}}}
            for name, keys, ref, optional in sources for key in keys]


def request_compute(task: dsl.PipelineTask, settings: KubeflowConfig) -> None:
    """``settings``' CPU, memory and accelerators (request = limit) on ``task``, tolerating the
    accelerator's taint."""
    if settings.cpu:
        task.set_cpu_request(settings.cpu).set_cpu_limit(settings.cpu)
    if settings.memory:
        task.set_memory_request(settings.memory).set_memory_limit(settings.memory)
    if settings.gpus:
        task.set_accelerator_type(settings.accelerator_type).set_accelerator_limit(settings.gpus)
        kubernetes.add_toleration(task, **gpu_toleration(settings))


def resources(settings: KubeflowConfig) -> dict:
    """:func:`request_compute`'s requests and limits as a container's ``resources``."""
    amounts = {name: value for name, value in (("cpu", settings.cpu), ("memory", settings.memory)) if value}
    limits = {**amounts, **({settings.accelerator_type: str(settings.gpus)} if settings.gpus else {})}
    return {key: value for key, value in (("requests", amounts), ("limits", limits)) if value}


def gpu_toleration(settings: KubeflowConfig) -> dict:
    """Nodes with accelerators are commonly tainted with the resource's name (e.g. GKE's and the
    NVIDIA GPU operator's ``nvidia.com/gpu``): tolerate that taint, whatever its value."""
    return {"key": settings.accelerator_type, "operator": "Exists", "effect": "NoSchedule"}


def retry(settings: KubeflowConfig, *tasks: dsl.PipelineTask) -> None:
    """Retries with exponential back-off, for tasks whose failures are often transient (network,
    a server restarting) and that are safe to run again."""
    for task in tasks:
        task.set_retry(num_retries=settings.retries, backoff_duration=settings.backoff,
                       backoff_factor=settings.backoff_factor, backoff_max_duration=settings.backoff_max)
