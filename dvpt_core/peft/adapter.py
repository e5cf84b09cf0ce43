"""Adapter files: the trainable tensors in safetensors plus a JSON config.

A task is an adapter over a shared frozen backbone, so an adapter records the backbone's
fingerprint and refuses to load over any other weights. Nothing is unpickled: tensors come from
safetensors and the rest from JSON.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

import dvpt_core
from dvpt_core.config import ExperimentConfig
from dvpt_core.models.adapted import AdaptedModel
from dvpt_core.peft import build_model

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter that is malformed or does not fit the backbone it is loaded onto."""


def save_adapter(model: AdaptedModel, cfg: ExperimentConfig, out_dir: Path) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    tensors = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    info = model.info
    meta = {
        "format_version": FORMAT_VERSION,
        "package_version": dvpt_core.__version__,
        "method": cfg.model.method,
        "model": cfg.model.model_dump(mode="json"),
        "backbone": info.name,
        "backbone_fingerprint": info.fingerprint,
        "random_weights": info.random_weights,
        "stand_in": info.stand_in,
        "image_size": info.image_size,
        "mean": list(info.mean),
        "std": list(info.std),
        "class_names": cfg.data.class_names,
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"method": cfg.model.method})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: not an adapter directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from None
    missing = {"format_version", "model", "backbone", "backbone_fingerprint", "class_names"} - set(meta)
    if missing:
        raise AdapterError(f"{path} lacks the fields {sorted(missing)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {meta['format_version']}; this package reads {FORMAT_VERSION}")
    return meta


def adapter_experiment(adapter_dir: Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The configuration that rebuilds the adapter's model; ``overrides`` patch ``model`` keys
    (e.g. ``weights_file`` where the backbone checkpoint lives on the serving machine)."""
    meta = read_adapter_config(adapter_dir)
    model = {**meta["model"], **(overrides or {})}
    return ExperimentConfig.model_validate({"model": model, "data": {"class_names": meta["class_names"]}})


def backbone_location(cfg: ExperimentConfig) -> dict[str, Any]:
    """Where this machine keeps the backbone weights, when the configuration says so: the only
    model setting that may differ from the adapter's own (the file moves between machines and
    pods; the fingerprint check still proves it holds the same weights)."""
    return {"weights_file": cfg.model.weights_file} if cfg.model.weights_file is not None else {}


def apply_adapter(model: AdaptedModel, adapter_dir: Path) -> AdaptedModel:
    """Load the adapter's tensors into ``model`` after checking it was trained on this backbone."""
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    if meta["backbone"] != model.info.name or meta["backbone_fingerprint"] != model.info.fingerprint:
        raise AdapterError(
            f"adapter {adapter_dir} was trained on backbone {meta['backbone']} "
            f"(weights fingerprint {meta['backbone_fingerprint'][:12]}) but the model has "
            f"{model.info.name} (fingerprint {model.info.fingerprint[:12]}): refusing to load it "
            "over different frozen weights"
        )
    tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
    expected = model.trainable_state_dict()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise AdapterError(
            f"adapter {adapter_dir} does not fit a {meta['method']} model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise AdapterError(
                f"adapter {adapter_dir}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)
    return model


def load_adapter(adapter_dir: Path, overrides: dict[str, Any] | None = None) -> AdaptedModel:
    """Rebuild backbone and method from the adapter's config, then load and verify its tensors."""
    model = build_model(adapter_experiment(adapter_dir, overrides))
    return apply_adapter(model, adapter_dir).eval()
