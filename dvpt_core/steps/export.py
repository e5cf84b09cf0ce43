"""Export step: backbone + adapter as one ONNX graph with a dynamic batch axis, checked for parity.

Parity is measured with onnxruntime against PyTorch on real preprocessed test images, at batch 1
and at a larger batch, so the dynamic axis is exercised too; what parity means beyond every logit
being within ``export.parity_atol`` is the task's (segmentation: the masks agree too; see
``dvpt_core.tasks``). The graph's output is the model's logits: ``[batch, K]`` for classification,
``[batch, K, H, W]`` for segmentation. The model, its input size, its task and the class names come
from the adapter; a setting given explicitly that contradicts it is refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.dataset import make_loader
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import apply_adapter, config_for_adapter
from dvpt_core.tasks import get_task

log = logging.getLogger(__name__)
INPUT, OUTPUT = "images", "logits"
PARITY_BATCH = 8


class ExportParityError(RuntimeError):
    """The ONNX graph does not reproduce the PyTorch model within tolerance."""


class Exported(NamedTuple):
    path: Path
    exporter: str  # the exporter that wrote the graph (torchscript falls back to dynamo)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                exporter: str = "dynamo") -> Exported:
    """The graph with a dynamic batch axis, checked, written to a temp file then renamed.

    ``exporter``: ``dynamo`` (torch.export, the maintained exporter) or ``torchscript`` (the
    legacy tracer: the same graph for these models in a tenth of the time, a deprecated path; a
    model with an operator it lacks, EVP's FFT, is exported with dynamo, with a warning).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    # Quiet: their progress lines go to stdout, where the CLI prints its JSON result.
    common = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": opset, "verbose": False}
    try:
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(model.eval(), (example,), tmp, dynamo=True, dynamic_shapes=({0: batch},),
                              external_data=False, **common)
        else:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", category=DeprecationWarning)
                    torch.onnx.export(model.eval(), (example,), tmp, dynamo=False,
                                      dynamic_axes={INPUT: {0: "batch"}}, **common)
            except torch.onnx.errors.UnsupportedOperatorError as err:
                log.warning("the torchscript exporter cannot export this model (%s); exporting with dynamo", err)
                return export_onnx(model, example, path, opset, "dynamo")
        onnx.checker.check_model(tmp, full_check=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return Exported(path, exporter)


def onnx_outputs(model: torch.nn.Module, path: Path, batches: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """PyTorch's and onnxruntime's outputs for each of ``batches``."""
    session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    with torch.no_grad():
        return [(model(images).numpy(), session.run([OUTPUT], {INPUT: images.numpy()})[0]) for images in batches]


def onnx_parity(model: torch.nn.Module, path: Path, batches: list[torch.Tensor]) -> float:
    """Largest absolute logit difference between onnxruntime and PyTorch over ``batches``."""
    return max(float(np.abs(got - expected).max()) for expected, got in onnx_outputs(model, path, batches))


def parity_batches(cfg: ExperimentConfig, cache_dir: Path, info: BackboneInfo) -> list[torch.Tensor]:
    """The first test images as evaluation sees them (in order, unaugmented), at batch 1 and at up
    to :data:`PARITY_BATCH`: what a served model will be given, not what training perturbs."""
    loader = make_loader(Path(cache_dir) / "test", info.mean, info.std, False, cfg, image_size=info.image_size)
    images, _ = next(iter(loader))
    return [images[:1], images[: min(len(images), PARITY_BATCH)]]


def export(cfg: ExperimentConfig, cache_dir: Path, train_dir: Path, out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    adapter_dir = Path(train_dir) / "adapter"
    cfg = config_for_adapter(cfg, adapter_dir)
    task = get_task(cfg.data.task)
    model = apply_adapter(build_model(cfg), adapter_dir).cpu().eval()
    info = model.info
    batches = parity_batches(cfg, cache_dir, info)
    candidate, exporter = export_onnx(model, batches[-1][:2], out_dir / ".candidate.onnx", cfg.export.opset,
                                      cfg.export.exporter)
    try:
        outputs = onnx_outputs(model, candidate, batches)
        parity, problem = task.parity(outputs, cfg.export.parity_atol)
        if problem:
            raise ExportParityError(f"{problem}; nothing was written to {out_dir / 'model.onnx'}")
        path = out_dir / "model.onnx"
        os.replace(candidate, path)
    finally:
        candidate.unlink(missing_ok=True)
    report = {
        "onnx": path.name, "task": task.name, "opset": cfg.export.opset, "exporter": exporter, **parity,
        "tolerance": cfg.export.parity_atol, "parity_batch_sizes": [len(b) for b in batches],
        "input": INPUT, "output": OUTPUT,
        "input_shape": ["batch", 3, info.image_size, info.image_size],
        "output_shape": task.logits_shape("batch", info.image_size, cfg.data.num_classes),
        "mean": list(info.mean), "std": list(info.std), "class_names": cfg.data.class_names,
        "random_weights": info.random_weights, "stand_in_weights": info.stand_in, "bytes": path.stat().st_size,
    }
    (out_dir / "export.json").write_text(json.dumps(report, indent=2))
    log.info("exported %s (%d bytes), parity max |diff| %.2e", path, report["bytes"], parity["max_abs_diff"])
    return report
