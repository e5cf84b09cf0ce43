"""The tasks a pipeline can run, picked by ``data.task`` (see ``base.Task`` for what a task owns)."""

from __future__ import annotations

from dvpt_core.config import ConfigError
from dvpt_core.tasks.base import FIGURES_DIR, Evaluation, Prediction, Task
from dvpt_core.tasks.classification import ClassificationTask
from dvpt_core.tasks.segmentation import SegmentationTask

TASKS: dict[str, Task] = {task.name: task for task in (ClassificationTask(), SegmentationTask())}


def get_task(name: str) -> Task:
    """The task named ``name`` (a ``data.task`` value)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown data.task {name!r}; known: {', '.join(TASKS)}") from None


__all__ = ["FIGURES_DIR", "TASKS", "Evaluation", "Prediction", "Task", "get_task"]
