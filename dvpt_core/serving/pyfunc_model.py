"""The MLflow pyfunc that serves an adapter: it rebuilds the frozen backbone, verifies the
adapter's fingerprint against it and predicts logits.

Logged as "models from code" (this file is copied into the model and executed on load), so
registering a model pickles nothing. The serving environment needs this package installed
(the project's container image has it).

Input: float32 array ``(N, 3, H, W)`` normalised with the adapter's mean/std (see
``adapter.json``); output: float32 logits ``(N, K)``.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import numpy as np
import torch

from dvpt_core.peft.adapter import load_adapter
from dvpt_core.serving.logged_model import ADAPTER_ARTIFACT
# Where the serving machine keeps the backbone checkpoint, if not where training had it.
WEIGHTS_FILE_ENV = "DVPT_BACKBONE_WEIGHTS"


class DVPTAdapterModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        overrides = {}
        if os.environ.get(WEIGHTS_FILE_ENV):
            overrides["weights_file"] = os.environ[WEIGHTS_FILE_ENV]
        self.model = load_adapter(context.artifacts[ADAPTER_ARTIFACT], overrides).cpu().eval()

    # No type hints on predict: MLflow would try to derive a schema from them; the signature
    # logged with the model (a float32 tensor spec) describes the input instead.
    def predict(self, context, model_input, params=None):
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images shaped (N, 3, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            return self.model(images).numpy()


mlflow.models.set_model(DVPTAdapterModel())
