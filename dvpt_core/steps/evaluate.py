"""Evaluate step: the trained adapter on the test split, as the paper scores DR grading.

The model, its input size and the class names come from the adapter (``config_for_adapter``):
a setting given explicitly that contradicts the adapter is refused, never silently ignored.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import mlflow
import torch

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.dataset import make_loader
from dvpt_core.engine import predict
from dvpt_core.metrics.classification import classification_metrics, confusion_matrix, plot_confusion_matrix
from dvpt_core.metrics.per_sample import (
    ARTIFACT_DIR, classification_records, records_file, split_sample_ids, write_records,
)
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import apply_adapter, config_for_adapter
from dvpt_core.runtime import resolve_device
from dvpt_core.tracking import read_run_file, resume_run

log = logging.getLogger(__name__)


def evaluate(cfg: ExperimentConfig, cache_dir: Path, train_dir: Path, out_dir: Path, split: str = "test") -> dict:
    """Writes ``metrics.json`` (for DVC) and ``confusion_matrix.png``; logs both to the train run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    adapter_dir = Path(train_dir) / "adapter"
    cfg = config_for_adapter(cfg, adapter_dir)
    model = apply_adapter(build_model(cfg), adapter_dir).eval().to(device)
    info = model.info
    loader = make_loader(Path(cache_dir) / split, info.mean, info.std, False, cfg, image_size=info.image_size)
    logits, labels = predict(model, loader, device, amp=cfg.train.amp, desc=f"evaluate {split}")
    preds = logits.argmax(1)
    num_classes = cfg.data.num_classes
    metrics = classification_metrics(preds, labels, num_classes)
    metrics["samples"] = int(len(labels))
    matrix = confusion_matrix(preds, labels, num_classes)
    title = f"{info.name} + {cfg.model.method} on {split}" + (f" ({info.weights_label})" if info.weights_label else "")
    plot = plot_confusion_matrix(matrix, cfg.data.class_names, out_dir / "confusion_matrix.png", title)
    report = {**metrics, "split": split, "random_weights": info.random_weights, "stand_in_weights": info.stand_in}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    _write_predictions(out_dir / "predictions.csv", labels, preds, cfg.data.class_names)
    # Per test image, for the promotion gate's paired bootstrap (dvpt_core.registry.promotion).
    ids = split_sample_ids(cache_dir, split, len(labels))
    records = write_records(out_dir / records_file(split),
                            classification_records(ids, labels.tolist(), preds.tolist(), split, cfg.data.class_names))
    run = read_run_file(train_dir)
    with resume_run(cfg, run["run_id"]):
        # On the logged model too, so the registry shows each version's test scores.
        mlflow.log_metrics({f"{split}_{k}": v for k, v in metrics.items()}, model_id=run.get("model_id"))
        mlflow.log_artifact(str(plot))
        mlflow.log_artifact(str(out_dir / "metrics.json"))
        mlflow.log_artifact(str(records), artifact_path=ARTIFACT_DIR)
    log.info("%s: kappa=%.4f accuracy=%.4f on %d images", split, metrics["kappa"], metrics["accuracy"], len(labels))
    return {**report, "confusion_matrix": matrix.tolist()}


def _write_predictions(path: Path, labels: torch.Tensor, preds: torch.Tensor, class_names: list[str]) -> None:
    """One row per test image (true and predicted grade by name): DVC's confusion-matrix plot."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows([class_names[int(a)], class_names[int(p)]] for a, p in zip(labels, preds))
