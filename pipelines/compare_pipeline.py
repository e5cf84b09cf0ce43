"""The comparison Kubeflow pipeline: fetch, validate and preprocess once, then fan out over a grid
of cells (method x seed x label ratio) with ``dsl.ParallelFor``, at most ``parallelism`` cells at
once, each cell train -> evaluate with the step components every other pipeline runs, and fan in
with ``dsl.Collected`` to one report.

One preprocessed cache serves the whole grid: it holds the whole training split, and each cell's
train step takes its labelled subset (``data.label_ratio``, drawn with the cell's seed as
``data.label_seed``) from the cache's ``splits.csv``. Each cell first gets its own configuration
(the ``cell_config`` component applies the run's parameters, then the cell, to ``config_json``). The ``compare`` task
reads every cell's MLflow run and writes the HTML report (table and plot), logged to MLflow as a
parent run ``comparison`` over the cell runs; it consumes the train models through
``dsl.Collected``, which makes it wait for the whole loop, evaluation included.

Data, cluster wiring, retries and caching as in :mod:`pipelines.dvpt_pipeline`; the typed run
parameters are the ones a grid does not set per cell (``epochs``, ``learning_rate``).

No ``from __future__ import annotations``: ``dsl.pipeline`` reads the annotations as real types.
"""

import json
from pathlib import Path
from typing import NamedTuple

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent
from kfp.dsl.pipeline_channel import PipelineChannel

from components import build_compare_components, build_components
from dvpt_core.config import ExperimentConfig, KubeflowConfig
from dvpt_core.steps.compare import RESULT_FILE
from dvpt_core.tracking import connect
from pipelines import cluster
from pipelines.dvpt_pipeline import (
    compile_graph, data_defaults, fetch_dataset, for_cluster, import_dataset, local_session, run_arguments,
    set_caching,
)

PIPELINE_NAME = "dvpt-compare"
# The typed run parameters a grid leaves to the run (the cells set method, seed and label ratio).
GRID_RUN_PARAMETERS = ("epochs", "learning_rate")


class Outputs(NamedTuple):
    comparison: dsl.Artifact
    report: dsl.HTML


def build_compare_pipeline(image: str | None = None, settings: KubeflowConfig | None = None,
                           local_data: bool = False) -> GraphComponent:
    """The pipeline with every component in ``image``, wired as ``settings`` say; ``local_data``
    as in :func:`pipelines.dvpt_pipeline.build_pipeline`. ``grid`` holds the cells as
    :func:`dvpt_core.steps.compare.expand_grid` makes them."""
    step = build_components(image)
    own = build_compare_components(image)
    settings = settings or KubeflowConfig()
    description = __doc__.splitlines()[0]

    def body(data: PipelineChannel, config_json: str, grid: list, epochs: int, learning_rate: float) -> Outputs:
        pretrained = step.pretrain(config_json=config_json)
        backbone = pretrained.outputs["backbone"]
        validated = step.validate(config_json=config_json, data=data)
        validation = validated.outputs["validation"]
        cached = step.preprocess(config_json=config_json, data=data, validation=validation)
        cache = cached.outputs["cache"]
        with dsl.ParallelFor(grid, parallelism=settings.parallelism) as cell:
            celled = own.cell_config(config_json=config_json, cell=cell, epochs=epochs, learning_rate=learning_rate)
            cell_json = celled.output
            trained = step.train(config_json=cell_json, data=data, cache=cache, backbone=backbone,
                                 validation=validation)
            evaluated = step.evaluate(config_json=cell_json, cache=cache, backbone=backbone,
                                      model=trained.outputs["model"])
        compared = own.compare(config_json=config_json, models=dsl.Collected(trained.outputs["model"]))
        set_caching(pretrained, validated, cached, celled, trained, evaluated, compared)
        cluster.request_compute(trained, settings)
        cluster.use_tracking(trained, evaluated, compared)
        cluster.retry(settings, evaluated, compared)
        return Outputs(comparison=compared.outputs["comparison"], report=compared.outputs["report"])

    if local_data:
        @dsl.pipeline(name=PIPELINE_NAME, description=description)
        def dvpt_compare(data_dir: str, config_json: str, grid: list, epochs: int, learning_rate: float) -> Outputs:
            return body(import_dataset(data_dir), config_json, grid, epochs, learning_rate)

        return dvpt_compare

    @dsl.pipeline(name=PIPELINE_NAME, description=description)
    def dvpt_compare(data_repo: str, data_path: str, data_revision: str, config_json: str, grid: list, epochs: int,
                     learning_rate: float) -> Outputs:
        data = fetch_dataset(step, settings, data_repo, data_path, data_revision)
        return body(data, config_json, grid, epochs, learning_rate)

    return dvpt_compare


def grid_arguments(cfg: ExperimentConfig) -> dict:
    """The values in ``cfg`` of the typed run parameters the comparison takes."""
    return {name: value for name, value in run_arguments(cfg).items() if name in GRID_RUN_PARAMETERS}


def compile_compare(out_path: Path, cfg: ExperimentConfig, grid: list[dict], image: str | None = None,
                    settings: KubeflowConfig | None = None) -> Path:
    """Compile to KFP IR YAML with ``config_json`` defaulting to ``cfg``, ``grid`` to ``grid``
    and the data parameters to ``settings``."""
    settings = settings or KubeflowConfig()
    return compile_graph(build_compare_pipeline(image, settings), out_path, cfg, grid=grid,
                         **data_defaults(settings), **grid_arguments(cfg))


def run_compare_local(cfg: ExperimentConfig, grid: list[dict], data_dir: Path, pipeline_root: Path) -> dict:
    """Run the comparison offline (``kfp.local``) on the folder ``data_dir``; returns the report's
    ranking, its MLflow run and where the report and every task's outputs are.

    The tracking store and experiment are created here first: kfp.local runs two cells at once,
    and two tasks creating a new SQLite store together collide ("table ... already exists").
    """
    connect(cfg)
    with local_session(pipeline_root, cfg):
        task = build_compare_pipeline(local_data=True)(
            data_dir=str(Path(data_dir).resolve()), config_json=for_cluster(cfg).to_json(), grid=grid,
            **grid_arguments(cfg))
    comparison = Path(task.outputs["comparison"].path)
    result = json.loads((comparison / RESULT_FILE).read_text())
    return {"run_id": task.outputs["comparison"].metadata["run_id"], "cells": result["cells"],
            "ranking": result["ranking"], "random_weights": result["random_weights"],
            "report": task.outputs["report"].path, "run_dir": str(comparison.parents[1])}
