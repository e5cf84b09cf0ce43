"""The DVPT Kubeflow pipeline: validate -> preprocess -> train -> (evaluate, export) -> register -> promote.

Every task runs a component from :mod:`components`, i.e. the same ``dvpt_core.steps`` function
``dvc repro`` runs; the pipeline only wires artifacts between them. It takes two parameters:
``data_dir``, a dataset folder the pods can see (a mounted volume, or a folder ``dvc pull`` filled),
and ``config_json``, the whole :class:`~dvpt_core.config.ExperimentConfig`, defaulting at compile
time to the configuration the user compiled with.

Caching is off for every task but ``pretrain``: KFP would key a cache hit on the ``data_dir``
string, not on the files under it, and a cached train or register task would skip its MLflow run
or model version. The stand-in backbone depends on the configuration alone, so it is cached.

No credentials are compiled in: a tracking URI's user info and secret query parameters are
dropped from the ``config_json`` default (with a warning), and the tasks that talk to MLflow
take them from a Kubernetes secret instead (``tracking_secret``: its keys
``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD`` or ``MLFLOW_TRACKING_TOKEN`` become
those environment variables, which MLflow's client reads).
The promote task is the quality gate (``dvpt_core.steps.promote``); when it promotes, a batch
inference task runs the new champion over ``data_dir`` (``dsl.If`` on the decision), a smoke
test of the served model on real files.

No ``from __future__ import annotations``: ``dsl.pipeline`` reads the pipeline function's
annotations as real types.
"""

import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import kfp
from kfp import compiler, dsl, kubernetes, local
from kfp.dsl.graph_component import GraphComponent

from components import build_components
from dvpt_core.config import ExperimentConfig
from dvpt_core.secrets import MLFLOW_CREDENTIAL_ENV, has_credentials, mask_uri, strip_credentials
from dvpt_core.registry.promotion import DECISION_FILE

log = logging.getLogger(__name__)
PIPELINE_NAME = "dvpt-pipeline"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
DATA_MOUNT = "/mnt/data"


def build_pipeline(image: str | None = None, data_pvc: str | None = None,
                   tracking_secret: str | None = None) -> GraphComponent:
    """The pipeline with every component in ``image`` (default ``$DVPT_IMAGE`` or the local tag).

    ``data_pvc`` names a PersistentVolumeClaim mounted at ``/mnt/data`` in the tasks that read
    ``data_dir`` (which then lies under ``/mnt/data``); ``tracking_secret`` a Kubernetes secret
    holding the MLflow credentials (see the module docstring). The pipeline's outputs: the trained
    adapter, the registration record and the test metrics.
    """
    step = build_components(image)
    outputs = NamedTuple(
        "Outputs", [("model", dsl.Model), ("registration", dsl.Artifact), ("test_metrics", dsl.Metrics),
                    ("decision", dsl.Artifact)]
    )

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def dvpt_pipeline(data_dir: str, config_json: str) -> outputs:
        pretrained = step.pretrain(config_json=config_json)
        backbone = pretrained.outputs["backbone"]
        validated = step.validate(config_json=config_json, data_dir=data_dir)
        cached = step.preprocess(config_json=config_json, data_dir=data_dir,
                                 validation=validated.outputs["validation"])
        cache = cached.outputs["cache"]
        trained = step.train(config_json=config_json, data_dir=data_dir, cache=cache, backbone=backbone,
                             validation=validated.outputs["validation"])
        model = trained.outputs["model"]
        evaluated = step.evaluate(config_json=config_json, cache=cache, backbone=backbone, model=model)
        exported = step.export(config_json=config_json, cache=cache, backbone=backbone, model=model)
        # After evaluate too: a model whose evaluation failed is never registered.
        registered = step.register(
            config_json=config_json, model=model, onnx_model=exported.outputs["onnx_model"]
        ).after(evaluated)
        promoted = step.promote(config_json=config_json, registration=registered.outputs["registration"])
        with dsl.If(promoted.outputs["Output"] == "promoted", name="promoted"):
            champion = step.predict(config_json=config_json, data_dir=data_dir, backbone=backbone)
        for task in (validated, cached, trained, evaluated, exported, registered, promoted, champion):
            task.set_caching_options(enable_caching=False)
        # The stand-in is a pure function of the configuration: reuse it across runs.
        pretrained.set_caching_options(enable_caching=True)
        if data_pvc:
            for task in (validated, cached, trained, champion):
                kubernetes.mount_pvc(task, pvc_name=data_pvc, mount_path=DATA_MOUNT)
        use_tracking_secret(tracking_secret, trained, evaluated, registered)
        return outputs(model=model, registration=registered.outputs["registration"],
                       test_metrics=evaluated.outputs["metrics"], decision=promoted.outputs["decision"])

    return dvpt_pipeline


def use_tracking_secret(secret: str | None, *tasks: dsl.PipelineTask) -> None:
    """The MLflow credentials of Kubernetes secret ``secret`` as environment variables of ``tasks``
    (each key optional: a secret may hold a user and password, or a token)."""
    if not secret:
        return
    for task in tasks:
        kubernetes.use_secret_as_env(task, secret_name=secret, optional=True,
                                     secret_key_to_env={name: name for name in MLFLOW_CREDENTIAL_ENV})


def compile_pipeline(
    out_path: Path, cfg: ExperimentConfig, image: str | None = None, data_pvc: str | None = None,
    tracking_secret: str | None = None,
) -> Path:
    """Compile to KFP IR YAML with ``config_json`` defaulting to ``cfg``; returns ``out_path``.

    ``image``, ``data_pvc`` and ``tracking_secret`` as in :func:`build_pipeline`.
    """
    return compile_graph(build_pipeline(image, data_pvc, tracking_secret), out_path, cfg)


def without_credentials(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the tracking URI's credentials dropped (warning that they were), for shipping."""
    uri = cfg.tracking.tracking_uri
    if not uri or not has_credentials(uri):
        return cfg
    log.warning(
        "tracking.tracking_uri %s holds credentials: the pipeline is compiled without them; give the pods "
        "%s from a Kubernetes secret (--tracking-secret NAME)", mask_uri(uri), " / ".join(MLFLOW_CREDENTIAL_ENV),
    )
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": strip_credentials(uri)})})


def compile_graph(pipeline: GraphComponent, out_path: Path, cfg: ExperimentConfig, **defaults: object) -> Path:
    """Compile ``pipeline`` with ``config_json`` (and any other parameter in ``defaults``)
    defaulting to the given values, credentials removed (:func:`without_credentials`); warns when
    the pods could not share MLflow runs."""
    cfg = without_credentials(cfg)
    uri = cfg.tracking.tracking_uri
    if not (uri or "").startswith(("http://", "https://")):
        log.warning(
            "tracking.tracking_uri is %r: each KFP step runs in its own pod, so train, evaluate and "
            "register share runs only through an MLflow server (infra/k8s: "
            "http://mlflow.mlflow.svc.cluster.local:5000) or $MLFLOW_TRACKING_URI set in the pods", uri,
        )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    parameters = {"config_json": cfg.to_json(), **defaults}
    compiler.Compiler().compile(pipeline, str(out_path), pipeline_parameters=parameters)
    return out_path


@contextlib.contextmanager
def local_session(pipeline_root: Path) -> Iterator[None]:
    """Pipelines called inside run offline, each task a subprocess of this Python environment.

    Uses ``kfp.local`` with ``SubprocessRunner(use_venv=False)``: the default venv mode would
    pip-install per task. Outputs land under ``pipeline_root``.
    """
    pipeline_root = Path(pipeline_root).resolve()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(pipeline_root),
        workspace_root=str(pipeline_root / ".workspace"),
    )
    # kfp.local prints its own and every task's logs to stdout; stdout is for the result (the CLI
    # prints it as JSON), so they go to stderr.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        # kfp.local warns for any image whose name lacks "python": here the tasks run in this
        # environment, never in the image, so the warning says nothing about this run.
        warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
        yield


def run_local(cfg: ExperimentConfig, data_dir: Path, pipeline_root: Path) -> dict:
    """Run the whole pipeline offline (:func:`local_session`), outputs under ``pipeline_root``.

    Returns what the register task wrote (``registered.json``) plus the test metrics, the
    random-weights flag (the CLI warns on it) and where the artifacts are.
    """
    with local_session(pipeline_root):
        task = build_pipeline()(data_dir=str(Path(data_dir).resolve()), config_json=cfg.to_json())
    registration = Path(task.outputs["registration"].path)
    registered = json.loads((registration / "registered.json").read_text())
    # kfp.local writes <pipeline_root>/<run>/<task>/<output>: every task's outputs sit in run_dir.
    decision = json.loads((Path(task.outputs["decision"].path) / DECISION_FILE).read_text())
    return {**registered, "test_metrics": dict(task.outputs["test_metrics"].metadata), "promotion": decision,
            "random_weights": task.outputs["model"].metadata["random_weights"],
            "stand_in_weights": task.outputs["model"].metadata["stand_in_weights"],
            "run_dir": str(registration.parents[1])}


def submit(
    pipeline: Path | ExperimentConfig,
    host: str,
    data_dir: str,
    experiment: str = "dvpt",
    namespace: str | None = None,
    token: str | None = None,
    run_name: str | None = None,
    image: str | None = None,
    data_pvc: str | None = None,
    tracking_secret: str | None = None,
) -> dict:
    """Submit a run to a Kubeflow Pipelines host; returns the run id and its UI address.

    ``pipeline`` is a compiled package (whose ``config_json`` default is the configuration it was
    compiled with) or a configuration to compile now with ``image``, ``data_pvc`` and
    ``tracking_secret``. ``token`` (else
    ``$KF_PIPELINES_TOKEN``) is a bearer token, e.g. ``kubectl create token`` for a service
    account allowed to use the Kubeflow profile ``namespace``.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    # kfp.Client's own namespace default ("kubeflow") stands when no profile namespace is given.
    profile = {"namespace": namespace} if namespace else {}
    client = kfp.Client(host=host, existing_token=token, **profile)
    with tempfile.TemporaryDirectory() as tmp:
        package = (
            compile_pipeline(Path(tmp) / "pipeline.yaml", pipeline, image, data_pvc, tracking_secret)
            if isinstance(pipeline, ExperimentConfig) else Path(pipeline)
        )
        result = client.create_run_from_pipeline_package(
            str(package), arguments={"data_dir": data_dir}, run_name=run_name,
            experiment_name=experiment, namespace=namespace,
        )
    return {"run_id": result.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}",
            "experiment": experiment, "namespace": namespace, "data_dir": data_dir}
