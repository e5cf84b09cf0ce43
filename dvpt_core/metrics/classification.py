"""DR-grading metrics (paper section 4.1.4): quadratic-weighted kappa and accuracy.

The kappa is computed on a fixed K x K confusion matrix, so a grade missing from a batch of
labels still counts in the expected-agreement term.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import (  # noqa: E402
    multiclass_accuracy,
    multiclass_cohen_kappa,
    multiclass_confusion_matrix,
)


def classification_metrics(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Kappa is undefined (0/0) when predictions and labels are one and the same constant class;
    that case is reported as 0, never as NaN that would vanish from an average."""
    kappa = multiclass_cohen_kappa(preds, targets, num_classes=num_classes, weights="quadratic")
    accuracy = multiclass_accuracy(preds, targets, num_classes=num_classes, average="micro")
    return {
        "kappa": 0.0 if torch.isnan(kappa) else float(kappa),
        "accuracy": float(accuracy),
    }


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return multiclass_confusion_matrix(preds, targets, num_classes=num_classes)


def plot_confusion_matrix(matrix: torch.Tensor, class_names: list[str], path: Path, title: str) -> Path:
    """Counts with row-normalised shading: rows are true grades, columns predictions."""
    counts = matrix.cpu().numpy()
    shade = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
    size = max(4.0, 0.9 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
                    color="white" if shade[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
