"""Adapter files: the trainable tensors in safetensors plus a JSON config.

A task is an adapter over a shared frozen backbone, so an adapter records the backbone's
fingerprint and refuses to load over any other weights. Nothing is unpickled: tensors come from
safetensors and the rest from JSON. ``adapter.json`` also records the SHA-256 of the weights
file: loading refuses a file that changed since it was written (a flipped byte, a truncated
copy) and one holding NaN or infinite values (a diverged run), naming the file either way.

An adapter fixes the model it was trained as (method, backbone, input size, every ``model.*``
setting), its task and its class names: later steps take them from the adapter, and a setting
given explicitly that says otherwise is refused (:func:`check_against_adapter`) rather than ignored.
Adapters written before ``adapter.json`` recorded the task (``task``) are classification ones:
nothing else could be trained then.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, save_file

import dvpt_core
from dvpt_core.config import ExperimentConfig, explicit_keys, setting_value
from dvpt_core.data.atomic import atomic_directory
from dvpt_core.models.adapted import AdaptedModel
from dvpt_core.peft import build_model

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
# 2: adapter.json records ``weights_sha256``.
FORMAT_VERSION = 2
REQUIRED_FIELDS = frozenset({"format_version", "model", "backbone", "backbone_fingerprint", "class_names",
                             "weights_sha256"})
# Settings that do not describe the trained model: where its frozen weights lie on this machine.
NOT_FIXED_BY_ADAPTER = frozenset({"model.weights_file"})
# The data settings an adapter fixes (with every model.* setting but NOT_FIXED_BY_ADAPTER).
DATA_FIXED_BY_ADAPTER = frozenset({"data.class_names", "data.task"})
# What adapters recorded no task for: written before segmentation could be trained.
UNRECORDED_TASK = "classification"


class AdapterError(ValueError):
    """An adapter that is malformed, altered, or does not fit the backbone or settings it is used with."""


def save_adapter(model: AdaptedModel, cfg: ExperimentConfig, out_dir: Path) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` into ``out_dir`` atomically."""
    out_dir = Path(out_dir)
    tensors = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    info = model.info
    meta = {
        "format_version": FORMAT_VERSION,
        "package_version": dvpt_core.__version__,
        "method": cfg.model.method,
        "task": cfg.data.task,
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
    with atomic_directory(out_dir, replace=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"method": cfg.model.method})
        meta["weights_sha256"] = hashlib.sha256((tmp / WEIGHTS_FILE).read_bytes()).hexdigest()
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{path} does not exist: not an adapter directory")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterError(f"{path} has format_version {meta.get('format_version')}; this package reads "
                           f"{FORMAT_VERSION} (adapters that record their weights' SHA-256): retrain it")
    missing = REQUIRED_FIELDS - set(meta)
    if missing:
        raise AdapterError(f"{path} lacks the fields {sorted(missing)}")
    return meta


def read_adapter_tensors(adapter_dir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter's tensors, once their file matches the recorded SHA-256 and every value is finite.

    The bytes are hashed and parsed from one read, so the file checked is the file loaded.
    """
    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AdapterError(f"{path}: cannot read the adapter's weights ({err.strerror or err})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta["weights_sha256"]:
        raise AdapterError(
            f"{path}: SHA-256 {digest[:16]}... differs from {meta['weights_sha256'][:16]}... recorded in "
            f"{CONFIG_FILE}: the weights changed after training (corrupted or edited); refusing to load them"
        )
    try:
        tensors = load(data)
    except SafetensorError as err:
        raise AdapterError(f"{path} is not a readable safetensors file ({err})") from None
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterError(f"{path}: tensor(s) {', '.join(sorted(bad)[:5])} hold NaN or infinite values "
                           "(a diverged training run?); refusing to load them")
    return tensors


def verify_adapter(adapter_dir: Path) -> dict[str, Any]:
    """``adapter.json`` once the whole adapter passed every check a load makes short of building
    the backbone: for steps that ship the adapter rather than run it (register)."""
    meta = read_adapter_config(adapter_dir)
    read_adapter_tensors(adapter_dir, meta)
    return meta


def adapter_experiment(adapter_dir: Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The configuration that rebuilds the adapter's model; ``overrides`` patch ``model`` keys
    (e.g. ``weights_file`` where the backbone checkpoint lives on the serving machine)."""
    meta = read_adapter_config(adapter_dir)
    return _experiment(adapter_dir, {**meta["model"], **(overrides or {})}, meta)


def adapter_task(meta: dict[str, Any]) -> str:
    """The ``data.task`` an adapter was trained for (from its ``adapter.json``)."""
    return meta.get("task", UNRECORDED_TASK)


def _experiment(adapter_dir: Path, model: dict[str, Any], meta: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(
            {"model": model, "data": {"class_names": meta["class_names"], "task": adapter_task(meta)}})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise AdapterError(
            f"{Path(adapter_dir) / CONFIG_FILE}: its settings do not hold here ({problems}); "
            "where the backbone's weights file lies elsewhere on this machine, set model.weights_file"
        ) from None


def check_against_adapter(cfg: ExperimentConfig, meta: dict[str, Any], adapter_dir: Path,
                          explicit: Iterable[str] | None = None) -> None:
    """Refuse settings the adapter fixes (``model.*`` but the weights file, ``data.class_names``,
    ``data.task``) that were given explicitly and differ from the adapter's.

    ``explicit``: the dotted keys given explicitly; by default those ``cfg`` was parsed from (a
    preset, a params file, ``--set``, a JSON configuration; see ``config.explicit_keys``), so
    schema defaults never conflict. Values are compared as the schema normalises them.
    """
    fixed = _experiment(adapter_dir, meta["model"], meta)
    given = explicit_keys(cfg) if explicit is None else set(explicit)
    conflicts = []
    for key in sorted(given):
        if not _fixed_by_adapter(key):
            continue
        wanted, trained = setting_value(cfg, key), setting_value(fixed, key)
        if wanted != trained:
            conflicts.append(f"{key}={wanted!r} (the adapter has {trained!r})")
    if conflicts:
        raise AdapterError(
            f"adapter {adapter_dir} was trained with other settings than given: {'; '.join(conflicts)}. "
            "An adapter fixes its model.* settings, data.class_names and data.task: drop these settings, or retrain"
        )


def _fixed_by_adapter(key: str) -> bool:
    return (key.startswith("model.") and key not in NOT_FIXED_BY_ADAPTER) or key in DATA_FIXED_BY_ADAPTER


def config_for_adapter(cfg: ExperimentConfig, adapter_dir: Path) -> ExperimentConfig:
    """``cfg`` with the adapter's model settings, task and class names, after :func:`check_against_adapter`.

    An explicitly given ``model.weights_file`` is kept (the backbone checkpoint's place on this
    machine); the frozen weights are still checked against the adapter's fingerprint on load.
    """
    meta = read_adapter_config(adapter_dir)
    check_against_adapter(cfg, meta, adapter_dir)
    model = dict(meta["model"])
    if "model.weights_file" in explicit_keys(cfg):
        model["weights_file"] = cfg.model.weights_file
    adapted = _experiment(adapter_dir, model, meta)
    data = cfg.data.model_copy(update={"class_names": adapted.data.class_names, "task": adapted.data.task})
    return cfg.model_copy(update={"model": adapted.model, "data": data})


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
    tensors = read_adapter_tensors(adapter_dir, meta)
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
    # A direct copy into the adapter's own parameters: load_state_dict would walk every module of
    # the frozen backbone to place a few dozen small tensors (half of a hot swap's time on ViT-B).
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model


def load_adapter(adapter_dir: Path, overrides: dict[str, Any] | None = None) -> AdaptedModel:
    """Rebuild backbone and method from the adapter's config, then load and verify its tensors."""
    model = build_model(adapter_experiment(adapter_dir, overrides))
    return apply_adapter(model, adapter_dir).eval()
