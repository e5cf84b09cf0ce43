"""The comparison Kubeflow pipeline: validate once, then fan out over a grid of cells (method x
seed x label ratio) with ``dsl.ParallelFor``, each cell preprocess -> train -> evaluate with the
step components every other pipeline runs, and fan in with ``dsl.Collected`` to one report.

Each cell first gets its own configuration (the ``cell_config`` component applies the cell to
``config_json``), then preprocesses the samples the one validation passed itself:
``data.label_ratio`` and the seed's ``data.split_seed`` choose the labelled subset in the
preprocess step, so the cache differs per (seed, ratio). The ``compare`` task reads every cell's MLflow run and writes the HTML report
(table and plot), logged to MLflow as a parent run ``comparison`` over the cell runs. It consumes
the train models through ``dsl.Collected``, which makes it wait for the whole loop, evaluation
included. Caching is off for every task but the stand-in backbone's, as in
:mod:`pipelines.dvpt_pipeline`.

No ``from __future__ import annotations``: ``dsl.pipeline`` reads the annotations as real types.
"""

import json
from pathlib import Path
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl.graph_component import GraphComponent

from components import build_compare_components, build_components
from dvpt_core.config import ExperimentConfig
from dvpt_core.steps.compare import RESULT_FILE
from dvpt_core.tracking import connect
from pipelines.dvpt_pipeline import DATA_MOUNT, compile_graph, local_session, use_tracking_secret

PIPELINE_NAME = "dvpt-compare"


def build_compare_pipeline(image: str | None = None, data_pvc: str | None = None,
                           tracking_secret: str | None = None) -> GraphComponent:
    """The pipeline with every component in ``image``; ``data_pvc`` and ``tracking_secret`` as in
    :func:`pipelines.dvpt_pipeline.build_pipeline`. Parameters: ``data_dir``, ``config_json`` and
    ``grid``, the cells as :func:`dvpt_core.steps.compare.expand_grid` makes them."""
    step = build_components(image)
    own = build_compare_components(image)
    outputs = NamedTuple("Outputs", [("comparison", dsl.Artifact), ("report", dsl.HTML)])

    @dsl.pipeline(name=PIPELINE_NAME, description=__doc__.splitlines()[0])
    def dvpt_compare(data_dir: str, config_json: str, grid: list) -> outputs:
        pretrained = step.pretrain(config_json=config_json)
        backbone = pretrained.outputs["backbone"]
        validated = step.validate(config_json=config_json, data_dir=data_dir)
        with dsl.ParallelFor(grid) as cell:
            configured = own.cell_config(config_json=config_json, cell=cell).after(validated)
            cell_json = configured.output
            cached = step.preprocess(config_json=cell_json, data_dir=data_dir,
                                     validation=validated.outputs["validation"])
            cache = cached.outputs["cache"]
            trained = step.train(config_json=cell_json, data_dir=data_dir, cache=cache, backbone=backbone,
                                 validation=validated.outputs["validation"])
            evaluated = step.evaluate(config_json=cell_json, cache=cache, backbone=backbone,
                                      model=trained.outputs["model"])
        compared = own.compare(config_json=config_json, models=dsl.Collected(trained.outputs["model"]))
        for task in (validated, configured, cached, trained, evaluated, compared):
            task.set_caching_options(enable_caching=False)
        pretrained.set_caching_options(enable_caching=True)
        if data_pvc:
            for task in (validated, cached, trained):
                kubernetes.mount_pvc(task, pvc_name=data_pvc, mount_path=DATA_MOUNT)
        use_tracking_secret(tracking_secret, trained, evaluated, compared)
        return outputs(comparison=compared.outputs["comparison"], report=compared.outputs["report"])

    return dvpt_compare


def compile_compare(out_path: Path, cfg: ExperimentConfig, grid: list[dict], image: str | None = None,
                    data_pvc: str | None = None, tracking_secret: str | None = None) -> Path:
    """Compile to KFP IR YAML with ``config_json`` defaulting to ``cfg`` and ``grid`` to ``grid``."""
    return compile_graph(build_compare_pipeline(image, data_pvc, tracking_secret), out_path, cfg, grid=grid)


def run_compare_local(cfg: ExperimentConfig, grid: list[dict], data_dir: Path, pipeline_root: Path) -> dict:
    """Run the comparison offline (``kfp.local``); returns the report's ranking, its MLflow run
    and where the report and every task's outputs are.

    The tracking store and experiment are created here first: kfp.local runs two cells at once,
    and two tasks creating a new SQLite store together collide ("table ... already exists").
    """
    connect(cfg)
    with local_session(pipeline_root):
        task = build_compare_pipeline()(data_dir=str(Path(data_dir).resolve()), config_json=cfg.to_json(), grid=grid)
    comparison = Path(task.outputs["comparison"].path)
    result = json.loads((comparison / RESULT_FILE).read_text())
    return {"run_id": task.outputs["comparison"].metadata["run_id"], "cells": result["cells"],
            "ranking": result["ranking"], "random_weights": result["random_weights"],
            "report": task.outputs["report"].path, "run_dir": str(comparison.parents[1])}

