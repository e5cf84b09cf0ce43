"""PEFT methods, one module each, selected by ``model.method``; the builder depends on the backbone.

``METHODS[method][arch]`` builds a method for a timm VisionTransformer ("vit") or SwinTransformer
("swin"); a method absent for an architecture is refused with the reason in ``NOT_AVAILABLE``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dvpt_core.config import ConfigError, ExperimentConfig, ModelConfig
from dvpt_core.models.backbone import BackboneInfo, create_backbone
from dvpt_core.models.blocks import architecture
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.peft import adaptformer, dvpt, dvpt_swin, full, linear, lora, ssf, vpt

Builder = Callable[[nn.Module, BackboneInfo, ModelConfig, int], AdaptedClassifier]


def _both(builder: Builder) -> dict[str, Builder]:
    return {"vit": builder, "swin": builder}


METHODS: dict[str, dict[str, Builder]] = {
    "dvpt": {"vit": dvpt.build, "swin": dvpt_swin.build},
    "linear": _both(linear.build),
    "full": _both(full.build),
    "vpt_shallow": {"vit": vpt.build_shallow},
    "vpt_deep": {"vit": vpt.build_deep, "swin": vpt.build_swin},
    "ssf": _both(ssf.build),
    "adaptformer": _both(adaptformer.build),
    "lora": _both(lora.build),
}
NOT_AVAILABLE: dict[tuple[str, str], str] = {("vpt_shallow", "swin"): vpt.SHALLOW_ON_SWIN}


def build_model(cfg: ExperimentConfig) -> AdaptedClassifier:
    """The configured backbone (with its weights) adapted by the configured method."""
    if cfg.model.method not in METHODS:
        raise ValueError(f"unknown model.method {cfg.model.method!r}; known: {', '.join(METHODS)}")
    backbone, info = create_backbone(cfg.model)
    builders = METHODS[cfg.model.method]
    arch = architecture(backbone)
    if arch not in builders:
        reason = NOT_AVAILABLE[cfg.model.method, arch]
        raise ConfigError(f"model.method={cfg.model.method} is not available for {arch} backbones: {reason}")
    return builders[arch](backbone, info, cfg.model, cfg.data.num_classes)


def count_parameters(model: AdaptedClassifier) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
