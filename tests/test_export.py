"""ONNX export of backbone + adapter: dynamic batch, checker, parity with PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from dvpt_core.data.dataset import CachedSplit
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import save_adapter
from dvpt_core.steps.export import ExportParityError, export
from dvpt_core.steps.preprocess import preprocess
from tests.helpers import tiny_config, validated

# One block: tracing and exporting cost grows with depth (a 12-block ViT takes about a minute on
# 2 cores), and parity does not depend on it.
SHALLOW = "model.backbone_kwargs={depth: 1}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config()
    generate_dataset(root / "data", cfg)
    preprocess(cfg, root / "data", root / "cache", validated(cfg, root / "data", root / "validation"))
    return root / "cache"


@pytest.mark.parametrize(("method", "exporter"), [("dvpt", "dynamo"), ("lora", "dynamo"), ("dvpt", "torchscript")])
def test_export_matches_pytorch_at_any_batch_size(tmp_path, cache, method, exporter) -> None:
    cfg = tiny_config(SHALLOW, f"model.method={method}", "model.gate_init=0.5", f"export.exporter={exporter}")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, cfg, tmp_path / "train" / "adapter")
    report = export(cfg, cache, tmp_path / "train", tmp_path / "export")
    assert report["max_abs_diff"] <= 1e-4
    assert json.loads((tmp_path / "export" / "export.json").read_text())["opset"] == cfg.export.opset
    session = ort.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    split = CachedSplit(cache / "test", model.info.mean, model.info.std)
    batch = torch.stack([split[i][0] for i in range(5)])
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_allclose(session.run(None, {"images": batch.numpy()})[0], expected, atol=1e-4, rtol=0)


def test_failed_parity_writes_no_model(tmp_path, cache) -> None:
    cfg = tiny_config(SHALLOW, "export.parity_atol=1e-12", "model.gate_init=0.5")
    model = build_model(cfg)
    with torch.no_grad():
        model.prompts.add_(1.0)
    save_adapter(model, cfg, tmp_path / "train" / "adapter")
    with pytest.raises(ExportParityError, match="export.parity_atol"):
        export(cfg, cache, tmp_path / "train", tmp_path / "export")
    assert not list((tmp_path / "export").glob("*.onnx"))
