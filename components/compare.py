"""The bodies of the comparison pipeline's own two components; every other task of that pipeline
runs a step component from :mod:`components.steps`.

The same rules as there: KFP serialises each function's source, so imports sit inside the body,
the body only calls ``dvpt_core`` (here ``dvpt_core.steps.compare``), and there is no
``from __future__ import annotations`` (KFP reads the annotations as real types).
"""

from typing import List

from kfp.dsl import HTML, Artifact, Input, Metrics, Model, Output

# Travels with the component through ``additional_funcs`` (see ``components.build_components``).
from components.steps import _log_scalars


def cell_config(config_json: str, cell: dict, epochs: int, learning_rate: float) -> str:
    """The experiment's configuration with the run's ``epochs`` and ``learning_rate``, then one
    grid cell (method, seed, label ratio and the method's own overrides, which win) applied, as
    the JSON the step components take."""
    from dvpt_core.config import ExperimentConfig, with_run_parameters
    from dvpt_core.steps.compare import cell_config as step

    run = with_run_parameters(ExperimentConfig.from_json(config_json), epochs=epochs, learning_rate=learning_rate)
    return step(run, cell).to_json()


def compare(config_json: str, models: Input[List[Model]], comparison: Output[Artifact], report: Output[HTML],
            metrics: Output[Metrics]):
    """The fan-in: every cell's MLflow run (named by its train step's ``run.json``) aggregated into
    the comparison report; ``comparison`` keeps all its files, ``report`` is the page the KFP UI shows.
    """
    import shutil
    from pathlib import Path

    from dvpt_core.config import ExperimentConfig
    from dvpt_core.steps.compare import REPORT_FILE
    from dvpt_core.steps.compare import compare as step

    result = step(ExperimentConfig.from_json(config_json), [Path(m.path) for m in models], Path(comparison.path))
    shutil.copyfile(Path(comparison.path) / REPORT_FILE, report.path)
    comparison.metadata.update({key: result[key] for key in ("run_id", "cells", "random_weights")})
    _log_scalars(metrics, result["scores"])
