"""The DVPT Kubeflow pipeline: fetch -> validate -> preprocess -> train -> (evaluate, export) ->
register -> promote.

Every step task runs a component from :mod:`components`, i.e. the same ``dvpt_core.steps``
function ``dvc repro`` runs; the pipeline only wires artifacts between them.

Parameters. The data: ``data_repo`` (a git URL), ``data_path`` (its DVC-tracked folder) and
``data_revision`` (branch, tag or commit): the first tasks resolve the revision to a commit and
the folder's DVC hash, then fetch that content from the repository's DVC remote (``dvc get``'s
machinery), so a run's lineage is a git revision plus a data hash and no volume is filled by hand.
The settings a run most often changes are typed parameters (:data:`dvpt_core.config.RUN_PARAMETERS`:
``method``, ``epochs``, ``learning_rate``, ``label_ratio``, ``seed``) that override
``config_json``, the whole :class:`~dvpt_core.config.ExperimentConfig`; every default is the
configuration the package was compiled with, so the schema stays the one source of defaults.

The cluster gives each pod what is not the pipeline's to carry (:mod:`pipelines.cluster`): the
MLflow address from a ConfigMap and every credential from Secrets; the compiled configuration
holds no tracking URI. The train step asks for the CPU, memory and accelerators ``dvpt kfp
compile`` was given and tolerates the accelerator's taint, or launches ``torchrun`` as a Training
Operator PyTorchJob (:mod:`pipelines.pytorchjob`). Tasks that fail transiently retry with
back-off.

Caching is explicit per task (:data:`CACHED`): the tasks that are pure functions of their inputs
are cached, and their keys are content: the fetch task's inputs include the data hash, and the
validate and preprocess tasks read the fetched artifact, so they hit the cache exactly when the
data and their settings are unchanged. Training and everything that writes to MLflow or the
registry run every time.

The promote task is the quality gate (``dvpt_core.steps.promote``); when it promotes, a batch
inference task runs the new champion over the data (``dsl.If`` on the decision), a smoke test of
the served model on real files.

No ``from __future__ import annotations``: ``dsl.pipeline`` reads the pipeline function's
annotations as real types.
"""

import builtins
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import kfp
from kfp import compiler, dsl, kubernetes, local
from kfp.dsl.graph_component import GraphComponent
from kfp.dsl.pipeline_channel import PipelineChannel

from components import StepComponents, build_components, default_image
from dvpt_core.config import RUN_PARAMETERS, ExperimentConfig, KubeflowConfig, setting_value
from dvpt_core.registry.promotion import DECISION_FILE
from dvpt_core.secrets import mask_uri
from pipelines import cluster
from pipelines.pytorchjob import POD_ENV, SHARED_MOUNT, render_train_job

log = logging.getLogger(__name__)
PIPELINE_NAME = "dvpt-pipeline"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
# Which tasks KFP may answer from its cache (set on every task, by component name).
CACHED = {
    "configure": True, "resolve-data": False, "fetch-data": True, "importer": True, "pretrain": True,
    "validate": True, "preprocess": True, "train": False, "train-pytorchjob": False, "createpvc": False,
    "deletepvc": False, "evaluate": False, "export": False, "register": False, "promote": False,
    "predict": False, "cell-config": True, "compare": False,
}
# The shared volume's access mode: the launcher and every node of the job mount it together.
SHARED_ACCESS = ["ReadWriteMany"]


class Outputs(NamedTuple):
    model: dsl.Model
    registration: dsl.Artifact
    test_metrics: dsl.Metrics
    decision: dsl.Artifact


def build_pipeline(image: str | None = None, settings: KubeflowConfig | None = None,
                   local_data: bool = False) -> GraphComponent:
    """The pipeline with every component in ``image`` (default ``$DVPT_IMAGE`` or the local tag),
    wired to the cluster as ``settings`` say.

    ``local_data``: the dataset is the folder ``data_dir`` (a parameter, imported as the dataset
    artifact) instead of the DVC remote, for ``kfp.local`` runs. Outputs: the trained adapter, the
    registration record, the test metrics and the promotion decision.
    """
    step = build_components(image)
    settings = settings or KubeflowConfig()
    job = render_train_job(settings, image or default_image())
    description = __doc__.splitlines()[0]

    def body(data: PipelineChannel, config_json: str, run: dict[str, Any]) -> Outputs:
        # The data's tasks read config_json itself: no run parameter changes what they do, so a
        # run that only changes those still finds them in KFP's cache.
        validated = step.validate(config_json=config_json, data=data)
        validation = validated.outputs["validation"]
        cached = step.preprocess(config_json=config_json, data=data, validation=validation)
        cache = cached.outputs["cache"]
        pretrained = step.pretrain(config_json=config_json)
        backbone = pretrained.outputs["backbone"]
        configured = step.configure(config_json=config_json, **run)
        run_json = configured.output
        trained = train_task(step, settings, json.dumps(job), run_json, data, cache, backbone, validation)
        model = trained.outputs["model"]
        evaluated = step.evaluate(config_json=run_json, cache=cache, backbone=backbone, model=model)
        exported = step.export(config_json=run_json, cache=cache, backbone=backbone, model=model)
        # After evaluate too: a model whose evaluation failed is never registered.
        registered = step.register(
            config_json=run_json, model=model, onnx_model=exported.outputs["onnx_model"]
        ).after(evaluated)
        promoted = step.promote(config_json=run_json, registration=registered.outputs["registration"])
        with dsl.If(promoted.outputs["Output"] == "promoted", name="promoted"):
            champion = step.predict(config_json=run_json, data=data, backbone=backbone)
        set_caching(configured, pretrained, validated, cached, evaluated, exported, registered, promoted, champion)
        cluster.use_tracking(evaluated, registered, promoted, champion)
        cluster.retry(settings, evaluated, registered, promoted, champion)
        return Outputs(model=model, registration=registered.outputs["registration"],
                       test_metrics=evaluated.outputs["metrics"], decision=promoted.outputs["decision"])

    if local_data:
        @dsl.pipeline(name=PIPELINE_NAME, description=description)
        def dvpt_pipeline(data_dir: str, config_json: str, method: str, epochs: int, learning_rate: float,
                          label_ratio: float, seed: int) -> Outputs:
            run = dict(method=method, epochs=epochs, learning_rate=learning_rate, label_ratio=label_ratio, seed=seed)
            return body(import_dataset(data_dir), config_json, run)

        return dvpt_pipeline

    @dsl.pipeline(name=PIPELINE_NAME, description=description)
    def dvpt_pipeline(data_repo: str, data_path: str, data_revision: str, config_json: str, method: str,
                      epochs: int, learning_rate: float, label_ratio: float, seed: int) -> Outputs:
        run = dict(method=method, epochs=epochs, learning_rate=learning_rate, label_ratio=label_ratio, seed=seed)
        return body(fetch_dataset(step, settings, data_repo, data_path, data_revision), config_json, run)

    return dvpt_pipeline


def fetch_dataset(step: StepComponents, settings: KubeflowConfig, repo: str, path: str,
                  revision: str) -> PipelineChannel:
    """The dataset artifact from the DVC remote: resolved (never cached), then fetched (cached by
    repository, folder, revision and data hash), both retried and given the S3 credentials."""
    resolved = step.resolve_data(data_repo=repo, data_path=path, data_revision=revision)
    fetched = step.fetch_data(data_repo=repo, data_path=path, data_revision=revision,
                              data_md5=resolved.outputs["md5"])
    set_caching(resolved, fetched)
    cluster.use_data_remote(resolved, fetched)
    cluster.retry(settings, resolved, fetched)
    return fetched.outputs["data"]


def import_dataset(data_dir: str) -> PipelineChannel:
    """The folder ``data_dir`` as the dataset artifact (the folder itself is the dataset root)."""
    imported = dsl.importer(artifact_uri=data_dir, artifact_class=dsl.Dataset, metadata={"root": "."})
    set_caching(imported)
    return imported.output


def train_task(step: StepComponents, settings: KubeflowConfig, job_json: str, run_json: str,
               data: PipelineChannel, cache: PipelineChannel, backbone: PipelineChannel,
               validation: PipelineChannel) -> dsl.PipelineTask:
    """The train step: in its own pod with ``settings``' resources, or (``train_launcher:
    pytorchjob``) a launcher that runs the PyTorchJob ``job_json`` on a volume created for it."""
    inputs = dict(config_json=run_json, data=data, cache=cache, backbone=backbone, validation=validation)
    if settings.train_launcher == "pod":
        trained = step.train(**inputs)
        cluster.request_compute(trained, settings)
        cluster.use_tracking(trained)
        set_caching(trained)
        return trained
    volume = kubernetes.CreatePVC(pvc_name_suffix="-dvpt-train", access_modes=SHARED_ACCESS,
                                  size=settings.shared_storage, **_storage_class(settings))
    claim = volume.outputs["name"]
    trained = step.train_pytorchjob(job_json=job_json, shared_claim=claim, **inputs)
    kubernetes.mount_pvc(trained, pvc_name=claim, mount_path=SHARED_MOUNT)
    for env, field in POD_ENV.items():
        kubernetes.use_field_path_as_env(trained, env, field)
    # A retried launcher finds the job's checkpoint on the volume and resumes.
    cluster.retry(settings, trained)
    removed = kubernetes.DeletePVC(pvc_name=claim).after(trained)
    set_caching(volume, trained, removed)
    return trained


def _storage_class(settings: KubeflowConfig) -> dict[str, str]:
    return {"storage_class_name": settings.storage_class} if settings.storage_class else {}


def set_caching(*tasks: dsl.PipelineTask) -> None:
    """Each task's caching as :data:`CACHED` says for its component."""
    for task in tasks:
        task.set_caching_options(enable_caching=CACHED[task.component_spec.name])


def run_arguments(cfg: ExperimentConfig) -> dict[str, Any]:
    """The typed run parameters' values in ``cfg`` (their compiled defaults)."""
    return {name: setting_value(cfg, key) for name, key in RUN_PARAMETERS.items()}


def for_cluster(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` as a package carries it: without a tracking URI, which the pods take from the
    cluster (ConfigMap ``dvpt-mlflow``), so no address or credential is compiled in."""
    uri = cfg.tracking.tracking_uri
    if uri is None:
        return cfg
    log.info("tracking.tracking_uri %s is not compiled into the pipeline: its pods read MLFLOW_TRACKING_URI from "
             "ConfigMap %s", mask_uri(uri), cluster.TRACKING_CONFIG_MAP)
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": None})})


def data_defaults(settings: KubeflowConfig) -> dict[str, str]:
    """The data parameters' compiled defaults (a package without ``data_repo`` needs it at submission)."""
    defaults = {"data_path": settings.data_path, "data_revision": settings.data_revision}
    return {**defaults, "data_repo": settings.data_repo} if settings.data_repo else defaults


def compile_pipeline(out_path: Path, cfg: ExperimentConfig, image: str | None = None,
                     settings: KubeflowConfig | None = None) -> Path:
    """Compile to KFP IR YAML with every parameter but (possibly) ``data_repo`` defaulting to
    ``cfg`` and ``settings``; returns ``out_path``."""
    settings = settings or KubeflowConfig()
    return compile_graph(build_pipeline(image, settings), out_path, cfg, **data_defaults(settings),
                         **run_arguments(cfg))


def compile_graph(pipeline: GraphComponent, out_path: Path, cfg: ExperimentConfig, **defaults: object) -> Path:
    """Compile ``pipeline`` with ``config_json`` (and any other parameter in ``defaults``)
    defaulting to the given values, ``config_json`` as :func:`for_cluster` ships it."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    parameters = {"config_json": for_cluster(cfg).to_json(), **defaults}
    compiler.Compiler().compile(pipeline, str(out_path), pipeline_parameters=parameters)
    return out_path


@contextlib.contextmanager
def local_session(pipeline_root: Path, cfg: ExperimentConfig) -> Iterator[None]:
    """Pipelines called inside run offline, each task a subprocess of this Python environment,
    with ``MLFLOW_TRACKING_URI`` set to ``cfg``'s tracking URI as the cluster's ConfigMap sets it.

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
    with _environment(MLFLOW_TRACKING_URI=cfg.tracking.resolved_uri()), warnings.catch_warnings(), \
            contextlib.redirect_stdout(sys.stderr), _print_restored():
        # kfp.local warns for any image whose name lacks "python": here the tasks run in this
        # environment, never in the image, so the warning says nothing about this run.
        warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
        yield


@contextlib.contextmanager
def _print_restored() -> Iterator[None]:
    """``builtins.print`` as it was before the block. kfp.local indents task logs by swapping
    ``builtins.print`` (``logging_utils.indented_print``); tasks that run in parallel threads (a
    ParallelFor) restore each other's swap, leaving every later print of the process indented."""
    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """``values`` in ``os.environ`` (which the local tasks inherit) for the block, then as before."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_local(cfg: ExperimentConfig, data_dir: Path, pipeline_root: Path) -> dict:
    """Run the whole pipeline offline (:func:`local_session`) on the folder ``data_dir``, outputs
    under ``pipeline_root``, with the configuration a package would carry (:func:`for_cluster`).

    Returns what the register task wrote (``registered.json``) plus the test metrics, the
    random-weights flag (the CLI warns on it) and where the artifacts are.
    """
    with local_session(pipeline_root, cfg):
        task = build_pipeline(local_data=True)(data_dir=str(Path(data_dir).resolve()),
                                               config_json=for_cluster(cfg).to_json(), **run_arguments(cfg))
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
    arguments: dict[str, Any] | None = None,
    experiment: str = "dvpt",
    namespace: str | None = None,
    token: str | None = None,
    run_name: str | None = None,
    image: str | None = None,
    settings: KubeflowConfig | None = None,
) -> dict:
    """Submit a run to a Kubeflow Pipelines host; returns the run id and its UI address.

    ``pipeline`` is a compiled package or a configuration to compile now with ``image`` and
    ``settings``; ``arguments`` set the run's parameters (the rest keep the package's defaults).
    ``token`` (else ``$KF_PIPELINES_TOKEN``) is a bearer token, e.g. ``kubectl create token`` for
    a service account allowed to use the Kubeflow profile ``namespace``.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    arguments = arguments or {}
    # kfp.Client's own namespace default ("kubeflow") stands when no profile namespace is given.
    profile = {"namespace": namespace} if namespace else {}
    client = kfp.Client(host=host, existing_token=token, **profile)
    with tempfile.TemporaryDirectory() as tmp:
        package = (
            compile_pipeline(Path(tmp) / "pipeline.yaml", pipeline, image, settings)
            if isinstance(pipeline, ExperimentConfig) else Path(pipeline)
        )
        result = client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name, experiment_name=experiment, namespace=namespace,
        )
    return {"run_id": result.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}",
            "experiment": experiment, "namespace": namespace, "arguments": arguments}
