"""The MLflow pyfunc that serves an adapter: it rebuilds the frozen backbone, verifies the
adapter's fingerprint against it, and classifies images.

Logged as "models from code" (this file is copied into the model and executed on load), so
registering a model pickles nothing. The serving environment needs this package installed
(the project's container image has it).

Input: a DataFrame with one column ``image``, one row per image: encoded image bytes, base64 text
(what JSON carries) or a uint8 H x W [x 3] array. The model resizes and normalises each image as
training did (``dvpt_core.serving.inputs``). Output: per image ``label`` (class name), ``index``
and ``probabilities`` (class name -> probability). Over HTTP (``mlflow models serve``)::

    POST /invocations  {"dataframe_records": [{"image": "<base64 of a JPEG or PNG file>"}]}
    -> {"predictions": [{"label": "moderate", "index": 2, "probabilities": {"no DR": 0.01, ...}}]}
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import pandas as pd

from dvpt_core.peft.adapter import load_adapter, read_adapter_config
from dvpt_core.serving.logged_model import ADAPTER_ARTIFACT, IMAGE_COLUMN, WEIGHTS_FILE_ENV
from dvpt_core.serving.predictor import Predictor, torch_forward


class DVPTAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        overrides = {}
        if os.environ.get(WEIGHTS_FILE_ENV):
            overrides["weights_file"] = os.environ[WEIGHTS_FILE_ENV]
        adapter_dir = context.artifacts[ADAPTER_ARTIFACT]
        model = load_adapter(adapter_dir, overrides).cpu().eval()
        self.predictor = Predictor(read_adapter_config(adapter_dir), torch_forward(model))

    # No type hints on predict: MLflow would try to derive a schema from them; the signature
    # logged with the model describes the input instead.
    def predict(self, context, model_input, params=None):
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input:
            raise ValueError(f"expected a DataFrame with an {IMAGE_COLUMN!r} column (one image per row), got "
                             f"{type(model_input).__name__}")
        return pd.DataFrame(self.predictor.predict(list(model_input[IMAGE_COLUMN])))


mlflow.models.set_model(DVPTAdapterModel())
