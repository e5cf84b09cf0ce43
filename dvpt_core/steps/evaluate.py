"""Evaluate step: the trained adapter on the test split, scored as its task scores it
(``dvpt_core.tasks``: kappa and accuracy for classification; Dice, IoU and HD95 for segmentation).

The model, its input size, its task and the class names come from the adapter
(``config_for_adapter``): a setting given explicitly that contradicts the adapter is refused,
never silently ignored. ``metrics.json`` (DVC's metrics) holds the task's report; the same numbers
go to the train step's MLflow run and to its logged model, with the task's files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.atomic import atomic_file
from dvpt_core.data.dataset import make_loader
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import apply_adapter, config_for_adapter
from dvpt_core.metrics.per_sample import ARTIFACT_DIR as RECORDS_DIR
from dvpt_core.runtime import resolve_device
from dvpt_core.tasks import Prediction, get_task
from dvpt_core.tracking import read_run_file, resume_run

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def evaluate(cfg: ExperimentConfig, cache_dir: Path, train_dir: Path, out_dir: Path, split: str = "test") -> dict:
    """Writes ``metrics.json`` and the task's files into ``out_dir``; returns the report with the
    main figure's path (``figure``) and what the task adds (e.g. the confusion matrix)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    adapter_dir = Path(train_dir) / "adapter"
    cfg = config_for_adapter(cfg, adapter_dir)
    task = get_task(cfg.data.task)
    model = apply_adapter(build_model(cfg), adapter_dir).eval().to(device)
    info = model.info
    loader = make_loader(Path(cache_dir) / split, info.mean, info.std, False, cfg, image_size=info.image_size)
    title = f"{info.name} + {cfg.model.method} on {split}" + (f" ({info.weights_label})" if info.weights_label else "")
    run = Prediction(model, loader, device, cfg.train.amp, cfg.data.class_names, Path(cache_dir), split)
    result = task.evaluate(run, out_dir, title)
    report = {**result.report, "split": split, "random_weights": info.random_weights, "stand_in_weights": info.stand_in}
    with atomic_file(out_dir / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    trained = read_run_file(train_dir)
    with resume_run(cfg, trained["run_id"]):
        # On the logged model too, so the registry shows each version's test scores.
        mlflow.log_metrics({f"{split}_{k}": v for k, v in result.metrics.items()}, model_id=trained.get("model_id"))
        for path in (*result.artifacts, out_dir / METRICS_FILE):
            mlflow.log_artifact(str(path))
        if result.records is not None:
            mlflow.log_artifact(str(result.records), artifact_path=RECORDS_DIR)
    log.info("%s: %s", split, result.summary)
    return {**report, **result.extra, "figure": str(result.figure), "figure_title": result.figure_title}
