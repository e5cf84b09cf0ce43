"""Logging an adapter as an MLflow 3 LoggedModel (the pyfunc of ``pyfunc_model.py``).

The train step logs the model as soon as the adapter exists, so evaluation metrics attach to the
model itself (``model_id``) and registration points at that same model rather than logging a new
copy; the served model is the trained one by construction.
"""

from __future__ import annotations

import base64
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import AnyType, ColSpec, DataType, Object, Property, Schema

import dvpt_core
from dvpt_core.data.synthetic.ddr import encode_jpeg, render_fundus
from dvpt_core.peft.adapter import read_adapter_config

MODEL_NAME = "adapter_model"
# The pyfunc's code file, by path: importing it would run its ``set_model`` here.
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# The artifact name under which the pyfunc finds the adapter folder.
ADAPTER_ARTIFACT = "adapter"
IMAGE_COLUMN = "image"
# Where the serving machine keeps the backbone checkpoint, if not where training had it.
WEIGHTS_FILE_ENV = "DVPT_BACKBONE_WEIGHTS"
SERVING_REQUIREMENTS = [f"dvpt-mlops=={dvpt_core.__version__}"]
# The example image: a synthetic fundus of this grade, seeded, as a JPEG file would arrive.
EXAMPLE_GRADE, EXAMPLE_SEED = 2, 0


def example_image(size: int, num_classes: int) -> bytes:
    """A small realistic request: one JPEG-encoded synthetic fundus at the model's input size."""
    grade = min(EXAMPLE_GRADE, num_classes - 1)
    return encode_jpeg(render_fundus(grade, num_classes, size, np.random.default_rng(EXAMPLE_SEED)))


def model_signature(adapter_dir: Path) -> tuple[pd.DataFrame, ModelSignature]:
    """An input example (one base64 JPEG, as JSON carries it) and the signature images ->
    class name, index and per-class probabilities. The ``image`` column is typed Any: it takes
    bytes, base64 text or uint8 arrays (``dvpt_core.serving.inputs``)."""
    meta = read_adapter_config(adapter_dir)
    names = list(meta["class_names"])
    jpeg = example_image(int(meta["image_size"]), len(names))
    example = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(jpeg).decode("ascii")]})
    outputs = Schema([
        ColSpec(DataType.string, "label"),
        ColSpec(DataType.long, "index"),
        ColSpec(Object([Property(name, DataType.double) for name in names]), "probabilities"),
    ])
    return example, ModelSignature(inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]), outputs=outputs)


def onnx_signature(adapter_dir: Path) -> ModelSignature:
    """The exported graph's signature: normalised float32 images (N, 3, S, S) -> logits (N, K)."""
    meta = read_adapter_config(adapter_dir)
    size = meta["image_size"]
    return infer_signature(np.zeros((1, 3, size, size), dtype=np.float32),
                           np.zeros((1, len(meta["class_names"])), dtype=np.float32))


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
