"""What a task (classification, segmentation) decides in every step, behind one interface.

The train, evaluate, export and register steps, the comparison and the serving model call the
task ``data.task`` names (``dvpt_core.tasks.get_task``) and never branch on the task themselves.
A task owns:

- its loss;
- validation after every epoch: the per-epoch history columns, ending with the score that selects
  the best epoch (``dvc.yaml`` plots that last column as the learning curve of every task);
- test evaluation: the metrics (``metrics.json``, DVC, MLflow) and the files a user reads, with one
  main figure (the KFP report page shows it);
- what ONNX parity means for its output;
- turning logits into the answer a served model returns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dvpt_core.engine import predict_batches

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Each figure a task draws goes here, under the evaluate step's folder: dvc.yaml shows the folder's
# images whatever the task (a path that one task never writes would be an error in `dvc plots`).
FIGURES_DIR = "figures"


@dataclass(frozen=True)
class Prediction:
    """A model with the cached split it is to predict (in the cache's order, never shuffled)."""

    model: nn.Module
    loader: DataLoader
    device: torch.device
    amp: bool
    class_names: list[str]
    cache_dir: Path
    split: str

    @property
    def split_dir(self) -> Path:
        return Path(self.cache_dir) / self.split

    def batches(self, desc: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Logits and targets batch by batch, on the model's device."""
        return predict_batches(self.model, self.loader, self.device, amp=self.amp, desc=desc)


@dataclass
class Evaluation:
    """A task's test evaluation.

    ``metrics``: flat numbers, logged to MLflow as ``<split>_<name>`` (on the run and its model);
    ``report``: what ``metrics.json`` holds for DVC (numbers, nested where that reads better);
    ``figure``: the main figure (under :data:`FIGURES_DIR`) and ``figure_title`` its caption;
    ``artifacts``: the files logged to MLflow beside ``metrics.json``; ``extra``: returned by the
    step but written nowhere; ``summary``: the log line; ``records``: per-sample scores.
    """

    metrics: dict[str, float]
    report: dict[str, Any]
    figure: Path
    figure_title: str
    artifacts: list[Path]
    summary: str
    extra: dict[str, Any] = field(default_factory=dict)
    # Per test sample (image or case) scores for the promotion gate's paired bootstrap
    # (dvpt_core.metrics.per_sample), logged under its own artifact folder.
    records: Path | None = None


class Task(ABC):
    """One task's pieces; subclasses are stateless singletons (``dvpt_core.tasks.TASKS``)."""

    name: ClassVar[str]
    # The validation score that selects the best epoch (history column ``val_<name>``), the test
    # metric comparisons rank by, and the headline a user reads first.
    selection_metric: ClassVar[str]
    # Test metrics a comparison reports, the selection metric first.
    comparison_metrics: ClassVar[tuple[str, ...]]
    # How figures and reports name each metric.
    metric_labels: ClassVar[dict[str, str]]

    @abstractmethod
    def loss(self) -> LossFn:
        """``loss(logits, targets)`` -> a scalar, for training and the validation loss."""

    @abstractmethod
    def validate(self, run: Prediction) -> dict[str, float]:
        """The epoch's validation columns: ``val_loss``, then the task's other scores, then
        ``val_<selection_metric>`` last."""

    @abstractmethod
    def evaluate(self, run: Prediction, out_dir: Path, title: str) -> Evaluation:
        """Scores ``run``'s split and writes the task's files into ``out_dir``."""

    @abstractmethod
    def logits_shape(self, batch: int | str, image_size: int, num_classes: int) -> list[int | str]:
        """The model's output shape for ``batch`` images (``"batch"`` for a dynamic axis)."""

    @abstractmethod
    def answers(self, logits: np.ndarray, class_names: Sequence[str],
                sizes: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """What a served model returns: one JSON-ready answer per image, from the batch's logits
        and each input's original (height, width)."""

    @abstractmethod
    def table_columns(self, class_names: Sequence[str]) -> list[str]:
        """The columns batch inference writes for an answer (after ``file`` and ``status``)."""

    @abstractmethod
    def table_row(self, answer: dict[str, Any], out_dir: Path, name: str) -> dict[str, Any]:
        """``answer`` as a row of :meth:`table_columns`; files too big for a cell (masks) are
        written under ``out_dir`` and the row names them (``name``: the input's relative path)."""

    def parity(self, outputs: Sequence[tuple[np.ndarray, np.ndarray]], atol: float) -> tuple[dict[str, Any], str | None]:
        """Whether ONNX reproduces PyTorch: ``outputs`` are (PyTorch, ONNX Runtime) pairs per batch.
        Returns the numbers for ``export.json`` and, when it does not, the reason. Here: every
        logit within ``atol``; a task adds its own conditions."""
        worst = max(float(np.abs(got - expected).max()) for expected, got in outputs)
        problem = None
        if worst > atol:
            problem = f"ONNX logits differ from PyTorch by {worst:.3g} > export.parity_atol={atol}"
        return {"max_abs_diff": worst}, problem
