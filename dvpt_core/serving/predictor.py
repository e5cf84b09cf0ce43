"""Images in, class names and probabilities out: the one prediction path of the MLflow pyfunc,
batch inference (``dvpt predict``) and the multi-adapter server.

The model is any function from the normalised batch to logits: the adapted PyTorch model
(``torch_forward``) or the exported ONNX graph of backbone + adapter (``onnx_forward``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvpt_core.serving.inputs import Normaliser, to_rgb_array

Forward = Callable[[torch.Tensor], np.ndarray]
# Segmentation serving (masks as PNG / NIfTI) plugs in here once the segmentation head exists.
SEGMENTATION_HOOK = ("serving segmentation adapters (masks as PNG or NIfTI) is not built yet: it comes with the "
                     "segmentation head (issue #9); dvpt_core.serving.predictor.Predictor is where it plugs in")


class Predictor:
    """One adapter's predictions from images, with its own preprocessing (``adapter.json``)."""

    def __init__(self, meta: dict[str, Any], forward: Forward) -> None:
        if meta.get("task", "classification") != "classification":
            raise NotImplementedError(SEGMENTATION_HOOK)
        self.class_names = list(meta["class_names"])
        self.size = int(meta["image_size"])
        self.normalise = Normaliser(self.size, meta["mean"], meta["std"])
        self.forward = forward

    def prepare(self, value: Any, name: str = "image") -> np.ndarray:
        """One input as a uint8 RGB array at the model's size; ``InputError`` names what is wrong."""
        return to_rgb_array(value, self.size, name)

    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """Prepared images -> one ``{"label", "index", "probabilities"}`` per image."""
        if not images:
            return []
        logits = np.asarray(self.forward(self.normalise(images)), dtype=np.float64)
        return records_from_logits(logits, self.class_names)

    def predict(self, values: Sequence[Any]) -> list[dict[str, Any]]:
        return self.predict_arrays([self.prepare(v, f"image {i}") for i, v in enumerate(values)])


def records_from_logits(logits: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    return [{"label": class_names[int(row.argmax())], "index": int(row.argmax()),
             "probabilities": {name: float(p) for name, p in zip(class_names, row)}} for row in probabilities]


def torch_forward(model: torch.nn.Module) -> Forward:
    """``model`` must already be in eval mode (``load_adapter`` and ``AdapterPool`` hand it so):
    setting it here would walk the whole frozen backbone again on every hot swap."""

    def forward(batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(batch).float().numpy()

    return forward


def onnx_forward(path: Path) -> Forward:
    """The exported graph (input ``images``, output ``logits``: ``dvpt_core.steps.export``) on
    ONNX Runtime's best available provider, with as many CPU threads as PyTorch uses (so the two
    runtimes compare on equal terms, and ``torch.set_num_threads`` sizes both)."""
    import onnxruntime as ort

    from dvpt_core.steps.export import INPUT, OUTPUT

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=ort.get_available_providers())

    def forward(batch: torch.Tensor) -> np.ndarray:
        return session.run([OUTPUT], {INPUT: batch.numpy()})[0]

    return forward
