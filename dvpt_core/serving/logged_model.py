"""Logging an adapter as an MLflow 3 LoggedModel (the pyfunc of ``pyfunc_model.py``).

The train step logs the model as soon as the adapter exists, so evaluation metrics attach to the
model itself (``model_id``) and registration points at that same model rather than logging a new
copy; the served model is the trained one by construction.
"""

from __future__ import annotations

import base64
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature, infer_signature
from mlflow.models.model import ModelInfo
from mlflow.types.schema import AnyType, ColSpec, Schema
from PIL import Image

import dvpt_core
from dvpt_core.data.synthetic.ddr import encode_jpeg, render_fundus
from dvpt_core.data.synthetic.kvasir import render_polyp
from dvpt_core.peft.adapter import adapter_task, read_adapter_config
from dvpt_core.tasks import get_task

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


def example_image(meta: dict) -> bytes:
    """A small realistic request, one JPEG at the model's input size, of the adapter's task: a
    synthetic fundus of a middle grade, or a synthetic polyp for segmentation."""
    size, rng = int(meta["image_size"]), np.random.default_rng(EXAMPLE_SEED)
    if adapter_task(meta) == "segmentation":
        return encode_jpeg(Image.fromarray(render_polyp(size, size, rng)[0]))
    num_classes = len(meta["class_names"])
    return encode_jpeg(render_fundus(min(EXAMPLE_GRADE, num_classes - 1), num_classes, size, rng))


def model_signature(adapter_dir: Path) -> tuple[pd.DataFrame, ModelSignature]:
    """An input example (one base64 JPEG, as JSON carries it) and the signature images -> the
    task's answer (``Task.answers``: class name, index and probabilities, or a PNG label map and
    class fractions), inferred from an answer to all-zero logits. The ``image`` column is typed
    Any: it takes bytes, base64 text or uint8 arrays (``dvpt_core.serving.inputs``)."""
    meta = read_adapter_config(adapter_dir)
    example = pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(example_image(meta)).decode("ascii")]})
    with warnings.catch_warnings():
        # MLflow's hint about integer columns and missing values: an answer's index is never missing.
        warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
        outputs = infer_signature(model_output=pd.DataFrame(_answers_to_zeros(meta))).outputs
    return example, ModelSignature(inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN)]), outputs=outputs)


def onnx_signature(adapter_dir: Path) -> ModelSignature:
    """The exported graph's signature: normalised float32 images (N, 3, S, S) -> the task's
    logits ((N, K) or (N, K, S, S))."""
    meta = read_adapter_config(adapter_dir)
    size = int(meta["image_size"])
    return infer_signature(np.zeros((1, 3, size, size), dtype=np.float32), _zero_logits(meta))


def _zero_logits(meta: dict) -> np.ndarray:
    """All-zero logits of one image, in the shape the adapter's task outputs."""
    task = get_task(adapter_task(meta))
    return np.zeros(task.logits_shape(1, int(meta["image_size"]), len(meta["class_names"])), dtype=np.float32)


def _answers_to_zeros(meta: dict) -> list[dict]:
    size = int(meta["image_size"])
    return get_task(adapter_task(meta)).answers(_zero_logits(meta), list(meta["class_names"]), [(size, size)])


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
