"""The bodies of the KFP components, one per ``dvpt_core.steps`` function, plus the run's
configuration and the launcher of a Training Operator job.

KFP serialises each function's source into the component, so every body imports what it needs
inside itself and does no work of its own: it parses ``config_json`` (the one schema), calls the
step function with the artifacts' local paths, and copies the step's result into KFP metadata.
The helpers at the bottom travel with each component through ``additional_funcs``
(see ``components.build_components``).

The dataset is a ``Dataset`` artifact: a folder holding the dataset folder (its name in the
artifact's ``root`` metadata) and, where DVC tracks it, its ``.dvc`` pointer beside it, as in a
checkout. The fetch task makes one from the DVC remote; a local run imports a folder as one.

No ``from __future__ import annotations`` here: KFP reads the artifact annotations at
decoration time and needs them as real types (the helpers quote ``Path``, which the serialised
module does not import). KFP's executor already sends logging to the pod log at INFO, so the
steps' own logs need no set-up here.
"""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def configure(config_json: str, method: str, epochs: int, learning_rate: float, label_ratio: float, seed: int) -> str:
    """The run's configuration: ``config_json`` with the typed run parameters applied
    (``dvpt_core.config.RUN_PARAMETERS``), validated, as the JSON the step components take."""
    from dvpt_core.config import ExperimentConfig, with_run_parameters

    return with_run_parameters(ExperimentConfig.from_json(config_json), method=method, epochs=epochs,
                               learning_rate=learning_rate, label_ratio=label_ratio, seed=seed).to_json()


def resolve_data(data_repo: str, data_path: str, data_revision: str) -> NamedTuple("Source", commit=str, md5=str):
    """The commit ``data_revision`` names and the DVC hash of ``data_path`` there: what the
    fetch task's cache is keyed on."""
    from dvpt_core.steps.fetch import resolve_data as step

    source = step(data_repo, data_path, data_revision)
    return (source["commit"], source["md5"])


def fetch_data(data_repo: str, data_path: str, data_revision: str, data_md5: str, data: Output[Dataset]):
    """The dataset with hash ``data_md5`` from the repository's DVC remote (``dvpt_core.steps.fetch``)."""
    from pathlib import Path

    from dvpt_core.steps.fetch import fetch_data as step

    data.metadata.update(step(data_repo, data_path, data_revision, data_md5, Path(data.path)))


def pretrain(config_json: str, backbone: Output[Model], metrics: Output[Metrics]):
    """The stand-in backbone (``model.weights=stand-in``); an empty artifact otherwise."""
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.pretrain import pretrain_if_stand_in

    summary = pretrain_if_stand_in(ExperimentConfig.from_json(config_json), Path(backbone.path))
    backbone.metadata["stand_in"] = summary["stand_in"]
    _log_scalars(metrics, summary)


def validate(config_json: str, data: Input[Dataset], validation: Output[Artifact], data_docs: Output[HTML],
             metrics: Output[Metrics]):
    """Great Expectations over the dataset; fails the run (naming every bad file) on bad data.

    ``validation`` keeps the manifest, ``validation.json`` and the whole Data Docs site;
    ``data_docs`` is the suite's result page, the one HTML file the KFP UI can show inline.
    """
    import shutil
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.validate import DOCS_DIR
    from dvpt_core.steps.validate import validate as step

    cfg = ExperimentConfig.from_json(config_json)
    summary = step(cfg, _data_root(data), Path(validation.path))
    (page,) = (Path(validation.path) / DOCS_DIR / "validations").rglob("*.html")
    shutil.copyfile(page, data_docs.path)
    validation.metadata["images"] = summary["images"]
    _log_scalars(metrics, {"images": summary["images"], "counts": summary["counts"]})


def preprocess(config_json: str, data: Input[Dataset], validation: Input[Artifact], cache: Output[Dataset],
               metrics: Output[Metrics]):
    """Resized splits as memory-mapped arrays: the input every later step reads. Only the samples
    the validate task's manifest (``validation``) lists, as they were validated, are read."""
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.preprocess import preprocess as step

    meta = step(ExperimentConfig.from_json(config_json), _data_root(data), Path(cache.path), Path(validation.path))
    cache.metadata["inputs_sha256"] = meta["inputs_sha256"]
    _log_scalars(metrics, meta)


def train(config_json: str, data: Input[Dataset], cache: Input[Dataset], backbone: Input[Model],
          validation: Input[Artifact], model: Output[Model], metrics: Output[Metrics]):
    """The train step folder (``adapter/``, ``run.json``, ``history.csv``) as a Model artifact.

    ``data`` is passed so the MLflow run records the dataset's DVC hash where one exists, and
    ``validation`` so it keeps the data gate's verdict and Data Docs.
    """
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.pretrain import use_stand_in
    from dvpt_core.steps.train import train as step

    cfg = use_stand_in(ExperimentConfig.from_json(config_json), Path(backbone.path))
    summary = step(cfg, Path(cache.path), Path(model.path), data_root=_data_root(data),
                   validation_dir=Path(validation.path))
    _describe_model(model, metrics, summary)


def train_pytorchjob(config_json: str, job_json: str, shared_claim: str, data: Input[Dataset], cache: Input[Dataset],
                     backbone: Input[Model], validation: Input[Artifact], model: Output[Model],
                     metrics: Output[Metrics]):
    """The train step run by ``torchrun`` in a Training Operator PyTorchJob (``job_json``, the
    manifest rendered at compile time) on the volume ``shared_claim``; the same outputs as ``train``."""
    import json
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from pipelines.pytorchjob import run_train_job

    summary = run_train_job(json.loads(job_json), shared_claim, ExperimentConfig.from_json(config_json),
                            _data_root(data), Path(cache.path), Path(backbone.path), Path(validation.path),
                            Path(model.path))
    _describe_model(model, metrics, summary)


def evaluate(config_json: str, cache: Input[Dataset], backbone: Input[Model], model: Input[Model],
             evaluation: Output[Artifact], report: Output[HTML], metrics: Output[Metrics]):
    """The task's test metrics (kappa and accuracy, or Dice, IoU and HD95); ``report`` shows the
    task's main figure inline (the confusion matrix, or images with their true and predicted masks)."""
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.evaluate import evaluate as step
    from dvpt_core.steps.pretrain import use_stand_in

    cfg = use_stand_in(ExperimentConfig.from_json(config_json), Path(backbone.path))
    result = step(cfg, Path(cache.path), Path(model.path), Path(evaluation.path))
    _image_page(Path(result["figure"]), Path(report.path),
                f"{result['figure_title']} on {result['split']}" + _weights_note(result))
    _log_scalars(metrics, result)


def export(config_json: str, cache: Input[Dataset], backbone: Input[Model], model: Input[Model],
           onnx_model: Output[Model], metrics: Output[Metrics]):
    """``model.onnx`` and ``export.json``; fails when ONNX Runtime disagrees with PyTorch."""
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.export import export as step
    from dvpt_core.steps.pretrain import use_stand_in

    cfg = use_stand_in(ExperimentConfig.from_json(config_json), Path(backbone.path))
    report = step(cfg, Path(cache.path), Path(model.path), Path(onnx_model.path))
    onnx_model.metadata.update({key: report[key] for key in ("opset", "input", "output", "random_weights",
                                                              "stand_in_weights")})
    _log_scalars(metrics, report)


def register(config_json: str, model: Input[Model], onnx_model: Input[Model], registration: Output[Artifact]):
    """A new MLflow model version with the configured alias; ``registered.json`` says which."""
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.register import register as step

    cfg = ExperimentConfig.from_json(config_json)
    result = step(cfg, Path(model.path), Path(onnx_model.path), Path(registration.path))
    registration.metadata.update(result)


def promote(config_json: str, registration: Input[Artifact], decision: Output[Artifact]) -> str:
    """The quality gate on the version the register task created; ``decision.json`` holds the
    figures and reason. Returns the outcome (promoted, rejected, skipped) for ``dsl.If``."""
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.promote import promote_step

    result = promote_step(ExperimentConfig.from_json(config_json), Path(registration.path), Path(decision.path))
    decision.metadata.update({k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))})
    return result["decision"]


def predict(config_json: str, backbone: Input[Model], predictions: Output[Dataset], metrics: Output[Metrics],
            model_uri: str = "", data_dir: str = "", data: Input[Dataset] = None):
    """Batch inference over ``data`` (a dataset artifact) or else the folder ``data_dir``
    (``predictions.csv``, ``summary.json``) with ``model_uri``, by default the configured
    registered model's champion; unreadable files are reported, not fatal."""
    from pathlib import Path

    import mlflow

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.predict import predict as step
    from dvpt_core.steps.pretrain import use_stand_in

    cfg = use_stand_in(ExperimentConfig.from_json(config_json), Path(backbone.path))
    mlflow.set_tracking_uri(cfg.tracking.resolved_uri())
    uri = model_uri or f"models:/{cfg.tracking.registered_model}@{cfg.promotion.champion_alias}"
    summary = step(uri, _data_root(data) if data else Path(data_dir), Path(predictions.path),
                   weights_file=cfg.model.weights_file)
    predictions.metadata.update({k: summary[k] for k in ("model", "version", "images", "predicted", "failed")})
    _log_scalars(metrics, summary)


def _data_root(data: Dataset) -> "Path":
    """The dataset folder inside a dataset artifact (see the module docstring)."""
    from pathlib import Path

    return Path(data.path) / data.metadata["root"]


def _describe_model(model: Model, metrics: Metrics, summary: dict):
    """A train step's summary (``run.json``) as the model artifact's metadata and KFP metrics."""
    model.metadata.update({key: summary[key] for key in ("run_id", "backbone", "method", "random_weights",
                                                         "stand_in_weights")})
    _log_scalars(metrics, summary)


def _log_scalars(metrics: Metrics, values: dict, prefix: str = ""):
    """Every number in a step's result (nested dicts as dotted names) as a KFP metric."""
    for key, value in values.items():
        if isinstance(value, dict):
            _log_scalars(metrics, value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(f"{prefix}{key}", value)


def _weights_note(report: dict) -> str:
    """The title suffix that says when the backbone was not a real pretrained one."""
    if report["random_weights"]:
        return " (RANDOM WEIGHTS)"
    return " (STAND-IN WEIGHTS)" if report["stand_in_weights"] else ""


def _image_page(png: "Path", html: "Path", title: str):
    """A one-file HTML page with the PNG inlined, so the KFP UI can show it without a server."""
    import base64
    import html as markup

    data = base64.b64encode(png.read_bytes()).decode("ascii")
    html.write_text(f'<!doctype html><meta charset="utf-8"><title>{markup.escape(title)}</title>'
                    f'<h3>{markup.escape(title)}</h3><img alt="{markup.escape(title)}" '
                    f'src="data:image/png;base64,{data}">\n')
