"""Image classification (DR grading): cross-entropy, the best epoch by validation quadratic kappa,
kappa / accuracy / confusion matrix on the test split, class probabilities when served."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from dvpt_core.data.atomic import atomic_file
from dvpt_core.engine import predict
from dvpt_core.metrics.classification import classification_metrics, confusion_matrix, plot_confusion_matrix
from dvpt_core.metrics.per_sample import classification_records, records_file, split_sample_ids, write_records
from dvpt_core.tasks.base import FIGURES_DIR, Evaluation, LossFn, Prediction, Task

PREDICTIONS_FILE = "predictions.csv"


class ClassificationTask(Task):
    name = "classification"
    selection_metric = "kappa"
    comparison_metrics = ("kappa", "accuracy")
    metric_labels = {"kappa": "quadratic kappa", "accuracy": "accuracy"}

    def loss(self) -> LossFn:
        return F.cross_entropy

    def validate(self, run: Prediction) -> dict[str, float]:
        logits, labels = _predict_all(run, "validate")
        scores = classification_metrics(logits.argmax(1), labels, len(run.class_names))
        return {"val_loss": float(F.cross_entropy(logits, labels)), "val_accuracy": scores["accuracy"],
                "val_kappa": scores["kappa"]}

    def evaluate(self, run: Prediction, out_dir: Path, title: str) -> Evaluation:
        """``figures/confusion_matrix.png`` and ``predictions.csv`` (one row per image: true and
        predicted class by name, for DVC's confusion plot and for reading)."""
        logits, labels = _predict_all(run, f"evaluate {run.split}")
        preds = logits.argmax(1)
        num_classes = len(run.class_names)
        metrics = {**classification_metrics(preds, labels, num_classes), "samples": int(len(labels))}
        matrix = confusion_matrix(preds, labels, num_classes)
        figure = out_dir / FIGURES_DIR / "confusion_matrix.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        plot_confusion_matrix(matrix, run.class_names, figure, title)
        _write_predictions(out_dir / PREDICTIONS_FILE, labels, preds, run.class_names)
        ids = split_sample_ids(run.cache_dir, run.split, len(labels))
        records = write_records(out_dir / records_file(run.split), classification_records(
            ids, labels.tolist(), preds.tolist(), run.split, run.class_names))
        return Evaluation(records=records,
            metrics=metrics, report=dict(metrics), figure=figure, figure_title="Confusion matrix", artifacts=[figure],
            summary=f"kappa={metrics['kappa']:.4f} accuracy={metrics['accuracy']:.4f} on {len(labels)} images",
            extra={"confusion_matrix": matrix.tolist()},
        )

    def logits_shape(self, batch: int | str, image_size: int, num_classes: int) -> list[int | str]:
        return [batch, num_classes]

    def answers(self, logits: np.ndarray, class_names: Sequence[str],
                sizes: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """Per image: the most probable class's name and index, and the softmax over the classes."""
        logits = np.asarray(logits, dtype=np.float64)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return [{"label": class_names[int(row.argmax())], "index": int(row.argmax()),
                 "probabilities": {name: float(p) for name, p in zip(class_names, row)}} for row in probabilities]

    def table_columns(self, class_names: Sequence[str]) -> list[str]:
        return ["label", "index", *[f"p_{name}" for name in class_names]]

    def table_row(self, answer: dict[str, Any], out_dir: Path, name: str) -> dict[str, Any]:
        return {"label": answer["label"], "index": answer["index"],
                **{f"p_{n}": p for n, p in answer["probabilities"].items()}}

def _predict_all(run: Prediction, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every logit and label of the split on the CPU (N x K: small for any classification split)."""
    return predict(run.model, run.loader, run.device, amp=run.amp, desc=desc)


def _write_predictions(path: Path, labels: torch.Tensor, preds: torch.Tensor, class_names: list[str]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows([class_names[int(a)], class_names[int(p)]] for a, p in zip(labels, preds))
