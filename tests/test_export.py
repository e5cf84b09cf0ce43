"""ONNX export of backbone + adapter: dynamic batch, checker, parity with PyTorch."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dvpt_core.data.dataset import CachedSplit
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import save_adapter
from dvpt_core.steps.export import PARITY_BATCH, ExportParityError, export, export_onnx, onnx_parity, parity_batches
from dvpt_core.steps.preprocess import preprocess
from tests.helpers import tiny_config, validated

# One block: tracing and exporting cost grows with depth (a 12-block ViT takes about a minute on
# 2 cores), and parity does not depend on it.
SHALLOW = "model.backbone_kwargs={depth: 1}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config("synthetic.test=12")  # more test images than the parity batch
    generate_dataset(root / "data", cfg)
    preprocess(cfg, root / "data", root / "cache", validated(cfg, root / "data", root / "validation"))
    return root / "cache"


@pytest.mark.parametrize(("method", "exporter"), [("dvpt", "dynamo"), ("lora", "dynamo"), ("dvpt", "torchscript")])
def test_export_matches_pytorch_at_any_batch_size(tmp_path, cache, capfd, method, exporter) -> None:
    cfg = tiny_config(SHALLOW, f"model.method={method}", "model.gate_init=0.5", f"export.exporter={exporter}")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, cfg, tmp_path / "train" / "adapter")
    out = tmp_path / "export" / method  # a folder whose parent does not exist yet
    report = export(cfg, cache, tmp_path / "train", out)
    if exporter == "torchscript":  # a re-run (DVC) exports over the last export
        report = export(cfg, cache, tmp_path / "train", out)
    assert report["max_abs_diff"] <= 1e-4
    assert capfd.readouterr().out == "", "stdout is the CLI's JSON result: the exporters must not print there"
    written = json.loads((out / "export.json").read_text())
    assert written == report and (written["opset"], written["exporter"]) == (cfg.export.opset, exporter)
    size = cfg.model.image_size
    assert (written["input_shape"], written["output_shape"]) == (["batch", 3, size, size], ["batch", 5])
    assert written["parity_batch_sizes"] == [1, 8], "parity is checked at batch 1 and at a full batch"
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    assert written["bytes"] == (out / "model.onnx").stat().st_size
    # The legacy exporter names nodes by module scope ("/blocks.0/..."), dynamo does not.
    scoped = [n.name.startswith("/") for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert any(scoped) if exporter == "torchscript" else not any(scoped)
    session = ort.InferenceSession(str(out / "model.onnx"))
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


class Spectrum(torch.nn.Module):
    """An FFT, as EVP's high-pass filter uses: an operator the TorchScript exporter lacks."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.fft.fft2(images).abs().mean(dim=(-2, -1))


def test_a_model_the_torchscript_exporter_cannot_export_is_exported_with_dynamo(tmp_path, caplog) -> None:
    model = Spectrum()
    with caplog.at_level(logging.WARNING, logger="dvpt_core.steps.export"):
        path, exporter = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "model.onnx", 18, "torchscript")
    assert exporter == "dynamo" and "exporting with dynamo" in caplog.text
    assert onnx_parity(model, path, [torch.randn(1, 3, 8, 8), torch.randn(4, 3, 8, 8)]) <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_parity_is_checked_on_the_first_test_images_as_evaluation_sees_them(cache) -> None:
    """In order and unaugmented (the training loader flips, crops and shuffles), at batch 1 and at
    PARITY_BATCH even when the loader's batch is larger."""
    cfg = tiny_config("train.batch_size=16")
    info = build_model(cfg).info
    split = CachedSplit(cache / "test", info.mean, info.std)
    expected = torch.stack([split[i][0] for i in range(PARITY_BATCH)])
    one, full = parity_batches(cfg, cache, info)
    assert (len(one), len(full)) == (1, 8) and len(split) > PARITY_BATCH
    assert torch.equal(full, expected) and torch.equal(one, expected[:1])


def test_a_graph_that_fails_strict_shape_inference_is_refused_and_nothing_written(tmp_path, monkeypatch) -> None:
    """The checker runs in full: a graph whose MatMul cannot multiply its declared shapes passes
    ONNX's structural check but not shape inference, and never reaches the model's path."""
    def inconsistent_export(model, args, f, **kwargs) -> None:
        declared = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [2, 3]) for name in ("images", "logits")]
        node = onnx.helper.make_node("MatMul", ["images", "images"], ["logits"])
        onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", declared[:1], declared[1:])), f)

    monkeypatch.setattr(torch.onnx, "export", inconsistent_export)
    with pytest.raises(onnx.shape_inference.InferenceError, match="Incompatible dimensions"):
        export_onnx(torch.nn.Identity(), torch.zeros(2, 3), tmp_path / "model.onnx", 18, "torchscript")
    assert list(tmp_path.iterdir()) == []
