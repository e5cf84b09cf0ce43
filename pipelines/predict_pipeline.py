"""The batch-inference Kubeflow pipeline: a registered adapter over a folder of images.

Two tasks: ``pretrain`` (the stand-in backbone where ``model.weights=stand-in``, from KFP's
cache after the first run; an empty artifact otherwise) and ``predict`` (``dvpt_core.steps.predict``).
Parameters: ``data_dir`` (a folder or CSV the pods can read: new images to score, e.g. on a
volume mounted with ``data_pvc``), ``model_uri`` (default: the configured registered model's
``@champion``) and ``config_json``. The MLflow address and credentials come from the cluster, as
in :mod:`pipelines.cluster`.

No ``from __future__ import annotations``: ``dsl.pipeline`` reads the annotations as real types.
"""

import json
from pathlib import Path

from kfp import dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent

from components import build_components
from dvpt_core.config import ExperimentConfig, KubeflowConfig
from dvpt_core.steps.predict import SUMMARY_FILE
from pipelines import cluster
from pipelines.dvpt_pipeline import compile_graph, for_cluster, local_session, set_caching

PIPELINE_NAME = "dvpt-predict"
DATA_MOUNT = "/mnt/data"


def build_predict_pipeline(image: str | None = None, data_pvc: str | None = None,
                           settings: KubeflowConfig | None = None) -> GraphComponent:
    step = build_components(image)
    settings = settings or KubeflowConfig()

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def predict_pipeline(data_dir: str, config_json: str, model_uri: str = "") -> dsl.Dataset:
        pretrained = step.pretrain(config_json=config_json)
        predicted = step.predict(config_json=config_json, data_dir=data_dir, model_uri=model_uri,
                                 backbone=pretrained.outputs["backbone"])
        set_caching(pretrained, predicted)
        cluster.use_tracking(predicted)
        cluster.retry(settings, predicted)
        if data_pvc:
            kubernetes.mount_pvc(predicted, pvc_name=data_pvc, mount_path=DATA_MOUNT)
        return predicted.outputs["predictions"]

    return predict_pipeline


def compile_predict(out_path: Path, cfg: ExperimentConfig, image: str | None = None,
                    data_pvc: str | None = None, settings: KubeflowConfig | None = None) -> Path:
    return compile_graph(build_predict_pipeline(image, data_pvc, settings), out_path, cfg)


def run_predict_local(cfg: ExperimentConfig, data_dir: Path, pipeline_root: Path, model_uri: str = "") -> dict:
    """The pipeline offline (``kfp.local``); returns the predict task's ``summary.json``."""
    with local_session(pipeline_root, cfg):
        task = build_predict_pipeline()(data_dir=str(Path(data_dir).resolve()), config_json=for_cluster(cfg).to_json(),
                                        model_uri=model_uri)
    return json.loads((Path(task.output.path) / SUMMARY_FILE).read_text())
