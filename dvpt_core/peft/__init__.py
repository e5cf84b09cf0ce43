"""PEFT methods, one module each, selected by ``model.method``; the builder depends on the backbone.

``METHODS[method][arch]`` builds a method for a timm VisionTransformer ("vit") or SwinTransformer
("swin") classifier, or a Hugging Face SegFormer ("segformer") segmenter; a method absent for an
architecture is refused with the reason in ``NOT_AVAILABLE``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dvpt_core.config import ConfigError, ExperimentConfig, ModelConfig
from dvpt_core.models.adapted import AdaptedModel
from dvpt_core.models.backbone import BackboneInfo, create_backbone
from dvpt_core.models.blocks import architecture
from dvpt_core.peft import adaptformer, dvpt, dvpt_segformer, dvpt_swin, evp, full, linear, lora, ssf, vpt

Builder = Callable[[nn.Module, BackboneInfo, ModelConfig, int], AdaptedModel]


def _classifiers_and(builder: Builder, segformer: Builder) -> dict[str, Builder]:
    """One builder for both timm families, another for SegFormer."""
    return {"vit": builder, "swin": builder, "segformer": segformer}


METHODS: dict[str, dict[str, Builder]] = {
    "dvpt": {"vit": dvpt.build, "swin": dvpt_swin.build, "segformer": dvpt_segformer.build},
    "linear": _classifiers_and(linear.build, linear.build_segformer),
    "full": _classifiers_and(full.build, full.build_segformer),
    "vpt_shallow": {"vit": vpt.build_shallow},
    "vpt_deep": {"vit": vpt.build_deep, "swin": vpt.build_swin, "segformer": vpt.build_segformer},
    "ssf": _classifiers_and(ssf.build, ssf.build_segformer),
    "adaptformer": _classifiers_and(adaptformer.build, adaptformer.build_segformer),
    "lora": _classifiers_and(lora.build, lora.build_segformer),
    "evp": {"vit": evp.build_vit, "swin": evp.build_swin, "segformer": evp.build_segformer},
}
NOT_AVAILABLE: dict[tuple[str, str], str] = {
    ("vpt_shallow", "swin"): vpt.SHALLOW_ON_SWIN,
    ("vpt_shallow", "segformer"): vpt.SHALLOW_ON_SEGFORMER,
}


def build_model(cfg: ExperimentConfig) -> AdaptedModel:
    """The configured backbone (with its weights) adapted by the configured method: a classifier on
    timm backbones, a segmenter on SegFormer."""
    if cfg.model.method not in METHODS:
        raise ValueError(f"unknown model.method {cfg.model.method!r}; known: {', '.join(METHODS)}")
    segments = cfg.model.resolved_family == "segformer"
    if segments != (cfg.data.task == "segmentation"):
        # The other pairing would fail deep inside the loss, naming neither setting.
        raise ConfigError(
            f"model.backbone={cfg.model.backbone} is a {'SegFormer, which segments' if segments else 'timm backbone, which classifies'}, "
            f"but data.task={cfg.data.task} (data.format={cfg.data.format}): use "
            f"{'a timm backbone for classification' if segments else 'a SegFormer backbone for segmentation'}, "
            "or a dataset format of the model's task")
    backbone, info = create_backbone(cfg.model)
    builders = METHODS[cfg.model.method]
    arch = architecture(backbone)
    if arch not in builders:
        reason = NOT_AVAILABLE[cfg.model.method, arch]
        raise ConfigError(f"model.method={cfg.model.method} is not available for {arch} backbones: {reason}")
    return builders[arch](backbone, info, cfg.model, cfg.data.num_classes)


def count_parameters(model: AdaptedModel) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}
