"""Adapter files at the unit level (peft/adapter.py): what ``adapter.json`` records, every refusal
of a malformed, altered or ill-fitting adapter with the file or setting it names, and the settings
an adapter fixes. A linear probe on the tiny ViT keeps each test well under a second; the
end-to-end refusals through the command line are in test_faults_data.py."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dvpt_core
from dvpt_core.config import ExperimentConfig
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import (
    AdapterError,
    adapter_task,
    apply_adapter,
    check_against_adapter,
    config_for_adapter,
    load_adapter,
    read_adapter_config,
    save_adapter,
    verify_adapter,
)
from tests.helpers import tiny_config

CLASSES = ["a", "b", "c"]
LINEAR = ["model.method=linear", f"data.class_names=[{', '.join(CLASSES)}]"]


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    cfg = tiny_config(*LINEAR)
    model = build_model(cfg)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    return save_adapter(model, cfg, tmp_path / "adapter")


def rewrite(adapter: Path, tensors: dict[str, torch.Tensor], **fields: object) -> None:
    """New weights with a matching checksum (as a training run would write them), and fields of
    ``adapter.json`` replaced."""
    save_file(tensors, str(adapter / "adapter.safetensors"))
    meta = json.loads((adapter / "adapter.json").read_text())
    meta["weights_sha256"] = hashlib.sha256((adapter / "adapter.safetensors").read_bytes()).hexdigest()
    meta.update(fields)
    (adapter / "adapter.json").write_text(json.dumps(meta))


def test_adapter_json_records_the_trained_model_and_its_weights_checksum(adapter: Path) -> None:
    meta = json.loads((adapter / "adapter.json").read_text())
    cfg = tiny_config(*LINEAR)
    weights = (adapter / "adapter.safetensors").read_bytes()
    assert meta["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert meta["format_version"] == 2 and meta["package_version"] == dvpt_core.__version__
    assert meta["method"] == "linear" and meta["task"] == "classification" and meta["class_names"] == CLASSES
    assert meta["model"] == cfg.model.model_dump(mode="json")
    assert meta["backbone"] == "vit_tiny_patch16_224" and meta["image_size"] == 32
    assert meta["random_weights"] is True and meta["stand_in"] is False
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.5, 0.5, 0.5]  # timm's vit_tiny normalisation
    assert meta["trainable_parameters"] == 192 * 3 + 3  # the linear probe: a 192 -> 3 classifier
    assert sorted(load_file(str(adapter / "adapter.safetensors"))) == ["classifier.bias", "classifier.weight"]
    with safe_open(str(adapter / "adapter.safetensors"), "pt") as handle:
        assert handle.metadata() == {"method": "linear"}
    assert verify_adapter(adapter) == meta


def test_a_loaded_adapter_holds_the_saved_tensors(adapter: Path) -> None:
    saved = load_file(str(adapter / "adapter.safetensors"))
    loaded = load_adapter(adapter)
    assert not loaded.training
    torch.testing.assert_close(loaded.classifier.weight.detach(), saved["classifier.weight"], atol=0, rtol=0)
    torch.testing.assert_close(loaded.classifier.bias.detach(), saved["classifier.bias"], atol=0, rtol=0)


def test_malformed_adapter_json_is_refused_naming_the_file(adapter: Path, tmp_path: Path) -> None:
    config = adapter / "adapter.json"
    meta = json.loads(config.read_text())
    with pytest.raises(AdapterError, match=f"{tmp_path / 'none' / 'adapter.json'} does not exist: not an adapter directory"):
        read_adapter_config(tmp_path / "none")
    config.write_text("{broken")
    with pytest.raises(AdapterError, match=f"{config} is not valid JSON: "):
        read_adapter_config(adapter)
    config.write_text("[1, 2]")
    with pytest.raises(AdapterError, match=f"{config} must hold a JSON object, not list"):
        read_adapter_config(adapter)
    config.write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(AdapterError, match=rf"{config} has format_version 1; this package reads 2 \(adapters that "
                                           r"record their weights' SHA-256\): retrain it"):
        read_adapter_config(adapter)
    config.write_text(json.dumps({**meta, "format_version": 3}))  # a newer package's adapter
    with pytest.raises(AdapterError, match=f"{config} has format_version 3; this package reads 2"):
        read_adapter_config(adapter)
    config.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("weights_sha256", "class_names")}))
    with pytest.raises(AdapterError, match=rf"{config} lacks the fields \['class_names', 'weights_sha256'\]"):
        read_adapter_config(adapter)
    config.write_text(json.dumps({k: v for k, v in meta.items() if k != "task"}))
    assert read_adapter_config(adapter)["method"] == "linear"


def test_altered_or_unusable_weights_are_refused_naming_the_file(adapter: Path) -> None:
    weights = adapter / "adapter.safetensors"
    recorded = json.loads((adapter / "adapter.json").read_text())["weights_sha256"]
    tensors = load_file(str(weights))
    tensors["classifier.bias"][0] += 1.0
    save_file(tensors, str(weights))
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(AdapterError, match=rf"{weights}: SHA-256 {actual[:16]}\.\.\. differs from {recorded[:16]}\.\.\. "
                                           r"recorded in adapter.json: the weights changed after training"):
        verify_adapter(adapter)
    for recorded in ("0" * 64, "f" * 64):  # whichever way the digests compare
        (adapter / "adapter.json").write_text(json.dumps({**read_adapter_config(adapter), "weights_sha256": recorded}))
        with pytest.raises(AdapterError, match=rf"SHA-256 {actual[:16]}\.\.\. differs from {recorded[:16]}\.\.\."):
            verify_adapter(adapter)
    tensors["classifier.weight"][1, 2] = float("nan")
    tensors["classifier.bias"][0] = float("-inf")
    rewrite(adapter, {**tensors, "steps": torch.tensor([3])})  # an integer tensor is not judged
    with pytest.raises(AdapterError, match=rf"{weights}: tensor\(s\) classifier.bias, classifier.weight hold NaN or "
                                           r"infinite values \(a diverged training run\?\); refusing to load them"):
        verify_adapter(adapter)
    rewrite(adapter, {f"t{i}": torch.tensor([float("nan")]) for i in range(6)})
    with pytest.raises(AdapterError, match=r"tensor\(s\) t0, t1, t2, t3, t4 hold NaN"):  # five names at most
        verify_adapter(adapter)
    rewrite(adapter, {"steps": torch.tensor([3])})
    verify_adapter(adapter)  # finite: only a load into a model can tell it does not fit
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")  # a header that is not JSON
    meta = json.loads((adapter / "adapter.json").read_text())
    (adapter / "adapter.json").write_text(json.dumps({**meta, "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}))
    with pytest.raises(AdapterError, match=f"{weights} is not a readable safetensors file"):
        verify_adapter(adapter)
    weights.unlink()
    with pytest.raises(AdapterError, match=rf"{weights}: cannot read the adapter's weights \(No such file or directory\)$"):
        verify_adapter(adapter)


def test_an_adapter_that_does_not_fit_the_model_is_refused(adapter: Path) -> None:
    model = build_model(tiny_config(*LINEAR))
    tensors = load_file(str(adapter / "adapter.safetensors"))
    rewrite(adapter, {"classifier.weight": tensors["classifier.weight"], "extra": torch.zeros(2)})
    with pytest.raises(AdapterError, match=rf"adapter {adapter} does not fit a linear model: "
                                           r"missing \['classifier.bias'\], unexpected \['extra'\]"):
        apply_adapter(model, adapter)
    rewrite(adapter, {"classifier.weight": tensors["classifier.weight"]})
    with pytest.raises(AdapterError, match=r"missing \['classifier.bias'\], unexpected \[\]"):
        apply_adapter(model, adapter)
    rewrite(adapter, {**tensors, "extra": torch.zeros(2)})
    with pytest.raises(AdapterError, match=r"missing \[\], unexpected \['extra'\]"):
        apply_adapter(model, adapter)
    rewrite(adapter, {**tensors, "classifier.weight": torch.zeros(3, 191)})
    with pytest.raises(AdapterError, match=rf"adapter {adapter}: tensor classifier.weight has shape \(3, 191\), "
                                           r"the model expects \(3, 192\)"):
        apply_adapter(model, adapter)
    rewrite(adapter, {**tensors, "classifier.weight": torch.zeros(3, 193)})
    with pytest.raises(AdapterError, match=r"tensor classifier.weight has shape \(3, 193\), the model expects \(3, 192\)"):
        apply_adapter(model, adapter)
    # At most five names of each kind: the first five in sorted order.
    dvpt = build_model(tiny_config("data.class_names=[a, b, c]"))
    names = sorted(dvpt.trainable_state_dict())
    assert len(names) > 5
    rewrite(adapter, {f"extra{i}": torch.zeros(1) for i in range(6)})
    with pytest.raises(AdapterError, match=rf"does not fit a linear model: missing {re.escape(str(names[:5]))}, "
                                           rf"unexpected \['extra0', 'extra1', 'extra2', 'extra3', 'extra4'\]$"):
        apply_adapter(dvpt, adapter)


def test_an_adapter_names_the_backbone_it_was_trained_on(adapter: Path) -> None:
    meta = json.loads((adapter / "adapter.json").read_text())
    other = build_model(tiny_config(*LINEAR, "model.init_seed=1"))
    with pytest.raises(AdapterError, match=rf"adapter {adapter} was trained on backbone vit_tiny_patch16_224 \(weights "
                                           rf"fingerprint {meta['backbone_fingerprint'][:12]}\) but the model has "
                                           rf"vit_tiny_patch16_224 \(fingerprint {other.info.fingerprint[:12]}\): "
                                           "refusing to load it over different frozen weights"):
        apply_adapter(other, adapter)
    # Either way round: whichever fingerprint sorts first, a different one is refused.
    cfg = tiny_config(*LINEAR, "model.init_seed=1")
    other_adapter = save_adapter(other, cfg, adapter.parent / "other")
    with pytest.raises(AdapterError, match=f"adapter {other_adapter} was trained on backbone"):
        apply_adapter(build_model(tiny_config(*LINEAR)), other_adapter)
    for name in ("vit_small_patch16_224", "vit_tiny_patch16_384"):  # names sorting before and after the model's
        (adapter / "adapter.json").write_text(json.dumps({**meta, "backbone": name}))
        with pytest.raises(AdapterError, match=f"was trained on backbone {name}"):
            apply_adapter(build_model(tiny_config(*LINEAR)), adapter)


def test_settings_an_adapter_fixes_are_refused_only_when_given_and_different(adapter: Path) -> None:
    meta = read_adapter_config(adapter)
    same = tiny_config(*LINEAR)
    check_against_adapter(same, meta, adapter)  # every model.* setting given, all equal
    # Not fixed by the adapter: where the backbone's weights lie, and any train.* or data setting
    # but the class names and task.
    check_against_adapter(tiny_config(*LINEAR, "model.weights_file=/elsewhere/w.safetensors", "train.lr=0.5",
                                      "data.max_pixels=1000"), meta, adapter)
    with pytest.raises(AdapterError, match=rf"adapter {adapter} was trained with other settings than given: "
                                           r"data.class_names=\['a', 'b'\] \(the adapter has \['a', 'b', 'c'\]\); "
                                           r"model.image_size=64 \(the adapter has 32\)\. An adapter fixes its "
                                           r"model.\* settings, data.class_names and data.task: drop these settings, "
                                           "or retrain"):
        check_against_adapter(tiny_config(*LINEAR, "model.image_size=64", "data.class_names=[a, b]"), meta, adapter)
    with pytest.raises(AdapterError, match=r"data.task='segmentation' \(the adapter has 'classification'\)"):
        check_against_adapter(tiny_config(*LINEAR, "data.task=segmentation"), meta, adapter, explicit={"data.task"})
    # A setting the adapter does not fix, sorted before one it does, does not end the comparison.
    with pytest.raises(AdapterError, match=r"model.image_size=64 \(the adapter has 32\)"):
        check_against_adapter(tiny_config(*LINEAR, "model.image_size=64", "data.max_pixels=1000"), meta, adapter,
                              explicit={"data.max_pixels", "model.image_size"})
    # Only the keys said to be explicit are compared: a differing default is no conflict.
    check_against_adapter(tiny_config(*LINEAR, "model.image_size=64"), meta, adapter, explicit={"train.lr"})


def test_config_for_adapter_takes_the_adapters_settings_and_keeps_the_weights_file(adapter: Path) -> None:
    meta = read_adapter_config(adapter)
    adapted = config_for_adapter(ExperimentConfig(), adapter)
    assert adapted.model.model_dump(mode="json") == meta["model"]
    assert adapted.data.class_names == CLASSES and adapted.data.task == "classification"
    given = tiny_config("model.weights_file=/elsewhere/w.safetensors", "train.lr=0.5")
    kept = config_for_adapter(given, adapter)
    assert str(kept.model.weights_file) == "/elsewhere/w.safetensors" and kept.train.lr == 0.5
    assert kept.model.method == "linear"
    assert config_for_adapter(tiny_config("train.lr=0.5"), adapter).model.weights_file is None


def test_an_adapter_without_a_task_is_a_classification_one_and_bad_settings_are_named(adapter: Path) -> None:
    assert adapter_task({}) == "classification" and adapter_task({"task": "segmentation"}) == "segmentation"
    meta = json.loads((adapter / "adapter.json").read_text())
    (adapter / "adapter.json").write_text(json.dumps({**meta, "model": {**meta["model"], "image_size": -1}}))
    with pytest.raises(AdapterError, match=rf"{adapter / 'adapter.json'}: its settings do not hold here \(model.image_size: "
                                           r".*\); where the backbone's weights file lies elsewhere on this machine, "
                                           "set model.weights_file"):
        load_adapter(adapter)
