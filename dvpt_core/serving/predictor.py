"""Images in, the task's answers out (class names and probabilities, or label maps): the one
prediction path of the MLflow pyfunc, batch inference (``dvpt predict``) and the multi-adapter server.

The model is any function from the normalised batch to logits: the adapted PyTorch model
(``torch_forward``) or the exported ONNX graph of backbone + adapter (``onnx_forward``); what the
logits mean is the adapter's task's (``dvpt_core.tasks``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from dvpt_core.peft.adapter import adapter_task
from dvpt_core.serving.inputs import Normaliser, to_rgb_array
from dvpt_core.tasks import get_task

Forward = Callable[[torch.Tensor], np.ndarray]


class Prepared(NamedTuple):
    """One input at the model's size, and its own (height, width)."""

    pixels: np.ndarray
    size: tuple[int, int]


class Predictor:
    """One adapter's predictions from images, with its own preprocessing (``adapter.json``)."""

    def __init__(self, meta: dict[str, Any], forward: Forward) -> None:
        self.task = get_task(adapter_task(meta))
        self.class_names = list(meta["class_names"])
        self.size = int(meta["image_size"])
        self.normalise = Normaliser(self.size, meta["mean"], meta["std"])
        self.forward = forward

    def prepare(self, value: Any, name: str = "image") -> Prepared:
        """One input ready for the model; ``InputError`` names what is wrong with it."""
        return Prepared(*to_rgb_array(value, self.size, name))

    def predict_prepared(self, images: Sequence[Prepared]) -> list[dict[str, Any]]:
        """One answer per prepared image (``Task.answers``)."""
        if not images:
            return []
        logits = np.asarray(self.forward(self.normalise([im.pixels for im in images])), dtype=np.float32)
        return self.task.answers(logits, self.class_names, [im.size for im in images])

    def predict(self, values: Sequence[Any]) -> list[dict[str, Any]]:
        return self.predict_prepared([self.prepare(v, f"image {i}") for i, v in enumerate(values)])


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
