"""Logging an adapter as an MLflow 3 LoggedModel (the pyfunc of ``pyfunc_model.py``).

The train step logs the model as soon as the adapter exists, so evaluation metrics attach to the
model itself (``model_id``) and registration points at that same model rather than logging a new
copy; the served model is the trained one by construction.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import infer_signature
from mlflow.models.model import ModelInfo

import dvpt_core
from dvpt_core.peft.adapter import read_adapter_config

MODEL_NAME = "adapter_model"
# The pyfunc's code file, by path: importing it would run its ``set_model`` here.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# The artifact name under which the pyfunc finds the adapter folder.
ADAPTER_ARTIFACT = "adapter"
SERVING_REQUIREMENTS = [f"dvpt-mlops=={dvpt_core.__version__}"]


def model_signature(adapter_dir: Path) -> tuple[np.ndarray, object]:
    """An input example (one normalised image) and the signature images -> logits."""
    meta = read_adapter_config(adapter_dir)
    size = meta["image_size"]
    example = np.zeros((1, 3, size, size), dtype=np.float32)
    return example, infer_signature(example, np.zeros((1, len(meta["class_names"])), dtype=np.float32))


def log_adapter_model(adapter_dir: Path) -> ModelInfo:
    """Log the adapter as a pyfunc LoggedModel in the active run; nothing is pickled."""
    example, signature = model_signature(adapter_dir)
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=str(PYFUNC_CODE),
        artifacts={ADAPTER_ARTIFACT: str(adapter_dir)},
        signature=signature,
        input_example=example,
        pip_requirements=SERVING_REQUIREMENTS,
    )
