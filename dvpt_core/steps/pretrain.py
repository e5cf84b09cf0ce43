"""Pretrain step: the stand-in foundation model the default experiment adapts.

No foundation-model weights can be downloaded on every machine this project runs on, and DVPT
adapting a *random* backbone learns nothing (the frozen features are noise). So the default
experiment (``model.weights=stand-in``) adapts a backbone pre-trained here: ``model``'s
architecture trained from scratch, fully, on a synthetic source task unlike the target, through
the task layer (``dvpt_core.tasks``: its loss and validation scores). A timm classifier (ViT,
Swin) learns the scene classification task (``dvpt_core.data.synthetic.source``); a SegFormer
learns the scene segmentation task (``dvpt_core.data.synthetic.source_segmentation``), with
Hugging Face's decoder layout so its fuse layer is trained and either layout can adapt it. It is
a stand-in, not a foundation model: the weights file says so in its metadata, and every step that
loads it says so in its outputs.

Writes ``<out_dir>/backbone.safetensors`` (the backbone's state dict under its library's key names,
loadable through ``model.weights_file``; a SegFormer's without the source task's classifier,
which every method replaces) and ``pretrain.json`` (settings key, source-task test score,
history). The result is a pure function of its settings (seeded renderer and training on the
CPU), so a folder already holding the output for the same settings key is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import dvpt_core
from dvpt_core.config import ExperimentConfig, ModelConfig
from dvpt_core.data.atomic import atomic_directory
from dvpt_core.data.cache_layout import IMAGES_FILE, LABELS_FILE, MASKS_FILE, SLICES_FILE, VOLUMES_FILE
from dvpt_core.data.dataset import make_loader, set_epoch
from dvpt_core.data.synthetic import source, source_segmentation
from dvpt_core.engine import train_one_epoch
from dvpt_core.models.backbone import STAND_IN_METADATA_KEY
from dvpt_core.optim import make_optimizer, make_scheduler
from dvpt_core.peft import build_model
from dvpt_core.runtime import seed_everything
from dvpt_core.tasks import Prediction, get_task

log = logging.getLogger(__name__)
BACKBONE_FILE = "backbone.safetensors"
PRETRAIN_FILE = "pretrain.json"
SPLIT_SIZES = ("train", "valid", "test")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class SourceTask:
    """A synthetic source task: the task that trains it, its classes, the score that summarises
    it (a validation column of that task, without ``val_``), the modules whose code renders it
    (part of the settings key) and ``render(n, image_size, seed, split_index)``, a split as the
    arrays of the preprocessed cache's layout, by file name."""

    task: str
    class_names: list[str]
    score: str
    renderers: tuple[ModuleType, ...]
    render: Callable[[int, int, int, int], dict[str, np.ndarray]]


def _classification_split(n: int, image_size: int, seed: int, split_index: int) -> dict[str, np.ndarray]:
    images, labels = source.render_split(n, image_size, seed, split_index)
    return {IMAGES_FILE: images, LABELS_FILE: labels}


def _segmentation_split(n: int, image_size: int, seed: int, split_index: int) -> dict[str, np.ndarray]:
    """Images and label maps, each image its own 2D case (no volume, no slice index)."""
    images, masks = source_segmentation.render_split(n, image_size, seed, split_index)
    return {IMAGES_FILE: images, MASKS_FILE: masks, VOLUMES_FILE: np.full(n, "", dtype=str),
            SLICES_FILE: np.full(n, -1, dtype=np.int32)}


# By the architecture's family: what its models do (classify or segment) decides what it learns.
SOURCES: dict[str, SourceTask] = {
    "timm": SourceTask("classification", source.CLASS_NAMES, "accuracy", (source,), _classification_split),
    "segformer": SourceTask("segmentation", source_segmentation.CLASS_NAMES, "dice",
                            (source_segmentation, source), _segmentation_split),
}


def source_task(cfg: ExperimentConfig) -> SourceTask:
    """The source task ``cfg.model``'s architecture is pre-trained on."""
    return SOURCES[cfg.model.resolved_family]


def settings_key(cfg: ExperimentConfig) -> str:
    """A hash of everything the weights depend on: the architecture, the pretrain settings, the
    renderer's source and the package version."""
    payload = {
        "architecture": cfg.model.model_dump(mode="json", include={"backbone", "backbone_kwargs", "image_size"}),
        "pretrain": cfg.pretrain.model_dump(mode="json"),
        "renderer": "".join(Path(module.__file__).read_text() for module in source_task(cfg).renderers),
        "package": dvpt_core.__version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def pretrain(cfg: ExperimentConfig, out_dir: Path) -> dict[str, Any]:
    """Pre-train ``cfg.model``'s architecture on its source task into ``out_dir``; returns
    ``pretrain.json``'s content (reused without training when it matches the settings)."""
    out_dir = Path(out_dir)
    key = settings_key(cfg)
    cached = _cached(out_dir, key)
    if cached is not None:
        log.info("stand-in backbone for settings %s already in %s: not pre-training again", key, out_dir)
        return cached
    task = source_task(cfg)
    source_cfg = _source_config(cfg, task)
    seed_everything(cfg.pretrain.seed)
    model = build_model(source_cfg)
    with tempfile.TemporaryDirectory(prefix="dvpt-source-") as scratch:
        root = Path(scratch)
        _render(cfg, task, root)
        loaders = {split: make_loader(root / split, model.info.mean, model.info.std, split == "train", source_cfg)
                   for split in SPLIT_SIZES}
        history = _fit(model, loaders, root, cfg, task)
        score = _score(model, loaders["test"], root, "test", task)
    log.info("source task: test %s %.3f over %d classes", task.score, score, len(task.class_names))
    summary = {
        "settings_key": key, "backbone": cfg.model.backbone, "image_size": cfg.model.image_size,
        "source_task": task.task, "source_classes": task.class_names, f"source_test_{task.score}": score,
        "sizes": {split: getattr(cfg.pretrain, split) for split in SPLIT_SIZES}, "history": history,
        "weights_file": BACKBONE_FILE, "stand_in": True,
    }
    _write(out_dir, model.backbone.state_dict(), summary, task)
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


def _source_config(cfg: ExperimentConfig, task: SourceTask) -> ExperimentConfig:
    """Full fine-tuning of a random initialisation of the architecture, on the source classes,
    optimised as ``cfg.pretrain`` says (flips only: crops would change the classification task's
    dot counts). A SegFormer trains Hugging Face's decoder (its fuse layer included), so that the
    whole checkpoint is pre-trained whichever decoder layout later adapts it."""
    arch = cfg.model.model_dump(include={"backbone", "family", "backbone_kwargs", "image_size"})
    p = cfg.pretrain
    return ExperimentConfig.model_validate({
        "model": ModelConfig(**arch, method="full", weights="random", init_seed=p.seed).model_dump(),
        "data": {"format": "folder", "task": task.task, "class_names": task.class_names},
        "train": {"epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr, "weight_decay": p.weight_decay,
                  "warmup_epochs": p.warmup_epochs, "seed": p.seed, "crop_scale": (1.0, 1.0), "amp": False,
                  "device": "cpu"},
    })


def _render(cfg: ExperimentConfig, task: SourceTask, root: Path) -> None:
    """Each split rendered into ``root/<split>`` in the array-cache layout the loaders read."""
    for index, split in enumerate(SPLIT_SIZES):
        (root / split).mkdir()
        arrays = task.render(getattr(cfg.pretrain, split), cfg.model.image_size, cfg.pretrain.seed, index)
        for name, array in arrays.items():
            np.save(root / split / name, array)


def _fit(model: torch.nn.Module, loaders: dict, root: Path, cfg: ExperimentConfig,
         task: SourceTask) -> list[dict[str, float]]:
    """Training as the train step does it, each epoch scored by the task's validation."""
    p = cfg.pretrain
    steps = len(loaders["train"])
    optimizer = make_optimizer(model, p.lr, p.weight_decay)
    scheduler = make_scheduler(optimizer, p.lr, p.epochs, p.warmup_epochs, steps)
    loss_fn = get_task(task.task).loss()
    history = []
    for epoch in range(p.epochs):
        set_epoch(loaders["train"], epoch)
        loss = train_one_epoch(model, loaders["train"], optimizer,
                               lambda step, done=epoch * steps: scheduler.step_update(done + step),
                               CPU, desc=f"pretrain {epoch + 1}/{p.epochs}", loss_fn=loss_fn)
        scores = get_task(task.task).validate(_prediction(model, loaders["valid"], root, "valid", task))
        history.append({"epoch": epoch + 1, "train_loss": loss, **scores})
        log.info("pretrain epoch %d/%d: train_loss=%.4f source val_%s=%.3f", epoch + 1, p.epochs, loss, task.score,
                 scores[f"val_{task.score}"])
    return history


def _score(model: torch.nn.Module, loader, root: Path, split: str, task: SourceTask) -> float:
    """The source task's summary score on ``split``."""
    return float(get_task(task.task).validate(_prediction(model, loader, root, split, task))[f"val_{task.score}"])


def _prediction(model: torch.nn.Module, loader, root: Path, split: str, task: SourceTask) -> Prediction:
    return Prediction(model=model, loader=loader, device=CPU, amp=False, class_names=task.class_names,
                      cache_dir=root, split=split)


def _cached(out_dir: Path, key: str) -> dict[str, Any] | None:
    meta = out_dir / PRETRAIN_FILE
    if not (meta.is_file() and (out_dir / BACKBONE_FILE).is_file()):
        return None
    summary = json.loads(meta.read_text())
    return summary if summary.get("settings_key") == key else None


def _write(out_dir: Path, state: dict[str, torch.Tensor], summary: dict[str, Any], task: SourceTask) -> None:
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
    recorded = ("settings_key", "backbone", f"source_test_{task.score}")
    metadata = {STAND_IN_METADATA_KEY: json.dumps({k: summary[k] for k in recorded})}
    with atomic_directory(out_dir, replace=True) as tmp:
        save_file(tensors, str(tmp / BACKBONE_FILE), metadata=metadata)
        (tmp / PRETRAIN_FILE).write_text(json.dumps(summary, indent=2))
