"""PEFT methods, one module each, selected by ``model.method``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dvpt_core.config import ExperimentConfig, ModelConfig
from dvpt_core.models.backbone import BackboneInfo, create_backbone
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.peft import dvpt

Builder = Callable[[nn.Module, BackboneInfo, ModelConfig, int], AdaptedClassifier]
METHODS: dict[str, Builder] = {"dvpt": dvpt.build}


def build_model(cfg: ExperimentConfig) -> AdaptedClassifier:
    """The configured backbone (with its weights) adapted by the configured method."""
    if cfg.model.method not in METHODS:
        raise ValueError(f"unknown model.method {cfg.model.method!r}; known: {', '.join(METHODS)}")
    backbone, info = create_backbone(cfg.model)
    return METHODS[cfg.model.method](backbone, info, cfg.model, cfg.data.num_classes)


def count_parameters(model: AdaptedClassifier) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
