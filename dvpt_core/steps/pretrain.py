"""Pretrain step: the stand-in foundation model the default experiment adapts.

No foundation-model weights can be downloaded on every machine this project runs on, and DVPT
adapting a *random* ViT learns nothing (the frozen features are noise). So the default experiment
(``model.weights=stand-in``) adapts a backbone pre-trained here: ``model``'s architecture trained
from scratch, fully, on the synthetic source task (``dvpt_core.data.synthetic.source``), a task
and domain unlike the DR-grading target. It is a stand-in, not a foundation model: the weights
file says so in its metadata, and every step that loads it says so in its outputs.

Writes ``<out_dir>/backbone.safetensors`` (the backbone's state dict, timm's key names, loadable
through ``model.weights_file``) and ``pretrain.json`` (settings key, source-task accuracy,
history). The result is a pure function of its settings (seeded renderer and training on the
CPU), so a folder already holding the output for the same settings key is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import dvpt_core
from dvpt_core.config import ExperimentConfig, ModelConfig
from dvpt_core.data.atomic import atomic_directory
from dvpt_core.data.cache_layout import IMAGES_FILE, LABELS_FILE
from dvpt_core.data.dataset import make_loader, set_epoch
from dvpt_core.data.synthetic import source
from dvpt_core.engine import predict, train_one_epoch
from dvpt_core.models.backbone import STAND_IN_METADATA_KEY
from dvpt_core.optim import make_optimizer, make_scheduler
from dvpt_core.peft import build_model
from dvpt_core.runtime import seed_everything

log = logging.getLogger(__name__)
BACKBONE_FILE = "backbone.safetensors"
PRETRAIN_FILE = "pretrain.json"
SPLIT_SIZES = ("train", "valid", "test")


def settings_key(cfg: ExperimentConfig) -> str:
    """A hash of everything the weights depend on: the architecture, the pretrain settings, the
    renderer's source and the package version."""
    payload = {
        "architecture": cfg.model.model_dump(mode="json", include={"backbone", "backbone_kwargs", "image_size"}),
        "pretrain": cfg.pretrain.model_dump(mode="json"),
        "renderer": Path(source.__file__).read_text(),
        "package": dvpt_core.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Pre-train ``cfg.model``'s architecture on the source task into ``out_dir``; returns
    ``pretrain.json``'s content (reused without training when it matches the settings)."""
    out_dir = Path(out_dir)
    key = settings_key(cfg)
    cached = _cached(out_dir, key)
    if cached is not None:
        log.info("stand-in backbone for settings %s already in %s: not pre-training again", key, out_dir)
        return cached
    source_cfg = _source_config(cfg)
    seed_everything(cfg.pretrain.seed)
    model = build_model(source_cfg)
    with tempfile.TemporaryDirectory(prefix="dvpt-source-") as scratch:
        splits = _render(cfg, Path(scratch))
        loaders = {split: make_loader(path, model.info.mean, model.info.std, split == "train", source_cfg)
                   for split, path in splits.items()}
        history = _fit(model, loaders, cfg)
        logits, labels = predict(model, loaders["test"], torch.device("cpu"), desc="source test")
    accuracy = float((logits.argmax(1) == labels).float().mean())
    log.info("source task: test accuracy %.3f over %d classes (chance %.3f)", accuracy, len(source.CLASS_NAMES),
             1 / len(source.CLASS_NAMES))
    summary = {
        "settings_key": key, "backbone": cfg.model.backbone, "image_size": cfg.model.image_size,
        "source_classes": source.CLASS_NAMES, "source_test_accuracy": accuracy,
        "sizes": {split: getattr(cfg.pretrain, split) for split in SPLIT_SIZES}, "history": history,
        "weights_file": BACKBONE_FILE, "stand_in": True,
    }
    _write(out_dir, model.backbone.state_dict(), summary)
    return summary


def pretrain_if_stand_in(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """The pretrain step where ``model.weights=stand-in``; otherwise an empty ``out_dir`` (the
    Kubeflow pipeline always has the task, so its wiring does not depend on the configuration)."""
    if cfg.model.weights != "stand-in":
        summary = {"stand_in": False, "skipped": f"model.weights={cfg.model.weights}"}
        with atomic_directory(Path(out_dir), replace=True) as tmp:
            (tmp / PRETRAIN_FILE).write_text(json.dumps(summary, indent=2))
        return summary
    return pretrain(cfg, out_dir)


def use_stand_in(cfg: ExperimentConfig, pretrain_dir: Path) -> ExperimentConfig:
    """``cfg`` reading its backbone from ``pretrain_dir`` where ``model.weights=stand-in``
    (wherever the pretrain step's output landed: another folder, another pod); else ``cfg``."""
    if cfg.model.weights != "stand-in":
        return cfg
    model = cfg.model.model_copy(update={"weights_file": Path(pretrain_dir) / BACKBONE_FILE})
    return cfg.model_copy(update={"model": model})


def _source_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Full fine-tuning of a random initialisation of the architecture, on the source classes,
    optimised as ``cfg.pretrain`` says (flips only: crops would change the dot counts)."""
    arch = cfg.model.model_dump(include={"backbone", "backbone_kwargs", "image_size"})
    p = cfg.pretrain
    return ExperimentConfig.model_validate({
        "model": ModelConfig(**arch, method="full", weights="random", init_seed=p.seed).model_dump(),
        "data": {"format": "folder", "class_names": source.CLASS_NAMES},
        "train": {"epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr, "weight_decay": p.weight_decay,
                  "warmup_epochs": p.warmup_epochs, "seed": p.seed, "crop_scale": (1.0, 1.0), "amp": False,
                  "device": "cpu"},
    })


def _render(cfg: ExperimentConfig, root: Path) -> dict[str, Path]:
    """Each split rendered into the array-cache layout the loaders read."""
    splits = {}
    for index, split in enumerate(SPLIT_SIZES):
        images, labels = source.render_split(getattr(cfg.pretrain, split), cfg.model.image_size,
                                             cfg.pretrain.seed, index)
        splits[split] = root / split
        splits[split].mkdir()
        np.save(splits[split] / IMAGES_FILE, images)
        np.save(splits[split] / LABELS_FILE, labels)
    return splits


def _fit(model: torch.nn.Module, loaders: dict, cfg: ExperimentConfig) -> list[dict[str, float]]:
    p = cfg.pretrain
    steps = len(loaders["train"])
    optimizer = make_optimizer(model, p.lr, p.weight_decay)
    scheduler = make_scheduler(optimizer, p.lr, p.epochs, p.warmup_epochs, steps)
    history = []
    for epoch in range(p.epochs):
        set_epoch(loaders["train"], epoch)
        loss = train_one_epoch(model, loaders["train"], optimizer,
                               lambda step, done=epoch * steps: scheduler.step_update(done + step),
                               torch.device("cpu"), desc=f"pretrain {epoch + 1}/{p.epochs}")
        logits, labels = predict(model, loaders["valid"], torch.device("cpu"), desc="source valid")
        accuracy = float((logits.argmax(1) == labels).float().mean())
        history.append({"epoch": epoch + 1, "train_loss": loss, "val_accuracy": accuracy})
        log.info("pretrain epoch %d/%d: train_loss=%.4f source val_accuracy=%.3f", epoch + 1, p.epochs, loss, accuracy)
    return history


def _cached(out_dir: Path, key: str) -> dict[str, Any] | None:
    meta = out_dir / PRETRAIN_FILE
    if not (meta.is_file() and (out_dir / BACKBONE_FILE).is_file()):
        return None
    summary = json.loads(meta.read_text())
    return summary if summary.get("settings_key") == key else None


def _write(out_dir: Path, state: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    metadata = {STAND_IN_METADATA_KEY: json.dumps({k: summary[k] for k in ("settings_key", "backbone",
                                                                           "source_test_accuracy")})}
    with atomic_directory(out_dir, replace=True) as tmp:
        save_file(tensors, str(tmp / BACKBONE_FILE), metadata=metadata)
        (tmp / PRETRAIN_FILE).write_text(json.dumps(summary, indent=2))
