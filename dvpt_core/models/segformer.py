"""SegFormer backbones from Hugging Face ``transformers``: weights, MiT variants, normalisation.

Pretrained weights come from ``SegformerForSemanticSegmentation.from_pretrained``, which reads a
hub name (``nvidia/segformer-b4-finetuned-ade-512-512``, the paper's ADE20K SegFormer-B4), a
local ``save_pretrained`` folder, or the offline Hugging Face cache (``HF_HUB_OFFLINE=1``). The
whole model, decoder included, is the frozen backbone; an encoder-only checkpoint (``nvidia/mit-b4``)
would leave the decoder's projections random and frozen, so it is refused.

A random initialisation builds the configuration in code from the MiT variant the name carries
(``b0``..``b5``, the SegFormer paper's Table 6 widths and depths), updated with
``model.backbone_kwargs`` (tests shrink it that way). A stand-in (``model.weights=stand-in``) is
that architecture with the pretrain step's weights from ``model.weights_file``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from safetensors.torch import load_file
from transformers import SegformerConfig, SegformerForSemanticSegmentation
from transformers.image_processing_base import ImageProcessingMixin

from dvpt_core.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# MiT-B0..B5 (Xie et al., 2021, Table 6). All share heads 1/2/5/8, reduction ratios 8/4/2/1,
# patch sizes 7/3/3/3 with strides 4/2/2/2 and MLP ratio 4: SegformerConfig's defaults.
MIT_VARIANTS: dict[str, dict[str, Any]] = {
    "b0": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
# The checkpoint's own classifier, which a stand-in's weights file does not hold.
SOURCE_CLASSIFIER = "decode_head.classifier."
_VARIANT = re.compile(r"(?:segformer|mit)[-_]?(b[0-5])(?![0-9])", re.IGNORECASE)


class MissingDecoderWeightsError(OSError):
    """The checkpoint holds no (or part of a) decoder: frozen random layers would follow."""


def mit_variant(name: str) -> str:
    """``b0``..``b5`` from a name such as ``nvidia/segformer-b4-finetuned-ade-512-512``."""
    found = _VARIANT.search(name)
    if not found:
        raise ConfigError(
            f"model.backbone={name!r} does not say which MiT variant (b0..b5) to build for "
            "model.weights=random; name one, e.g. nvidia/segformer-b4-finetuned-ade-512-512"
        )
    return found.group(1).lower()


def random_segformer(cfg: ModelConfig) -> SegformerForSemanticSegmentation:
    """The configured MiT variant with random weights (the caller seeds and warns)."""
    config = SegformerConfig(**{**MIT_VARIANTS[mit_variant(cfg.backbone)], **cfg.backbone_kwargs})
    return SegformerForSemanticSegmentation(config)


def stand_in_segformer(cfg: ModelConfig) -> SegformerForSemanticSegmentation:
    """The configured architecture with the pretrain step's weights (``model.weights_file``): every
    weight but the source task's classifier, which the pretrain step leaves out (every method
    replaces it) and which keeps its seeded random initialisation here."""
    model = random_segformer(cfg)
    state, expected = load_file(str(cfg.weights_file)), model.state_dict()
    wrong = [k for k, v in state.items() if k not in expected or expected[k].shape != v.shape]
    missing = [k for k in expected if k not in state and not k.startswith(SOURCE_CLASSIFIER)]
    if wrong or missing:
        raise ConfigError(
            f"model.weights_file {cfg.weights_file} does not fit model.backbone={cfg.backbone!r} with "
            f"model.backbone_kwargs={cfg.backbone_kwargs}: {len(wrong)} weights of another shape or name "
            f"(e.g. {wrong[:3]}), {len(missing)} missing (e.g. {missing[:3]}); pre-train it again with this "
            "architecture (dvpt pretrain)"
        )
    model.load_state_dict(state, strict=False)
    return model


def pretrained_segformer(cfg: ModelConfig) -> SegformerForSemanticSegmentation:
    """Hub name, local folder or cache; refuses checkpoints whose decoder would stay random."""
    model, loading = SegformerForSemanticSegmentation.from_pretrained(
        cfg.backbone, output_loading_info=True, **cfg.backbone_kwargs
    )
    missing = sorted(loading.get("missing_keys", [])) + sorted(loading.get("mismatched_keys", []))
    if missing:
        raise MissingDecoderWeightsError(
            f"the checkpoint lacks {len(missing)} weights the frozen model needs (e.g. {missing[:3]}); "
            "use a SegFormer fine-tuned for segmentation, e.g. nvidia/segformer-b4-finetuned-ade-512-512"
        )
    return model


def normalisation(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std from the checkpoint's image processor configuration, else ImageNet's (which
    is what SegFormer's processors use)."""
    if cfg.weights == "pretrained":
        try:
            processor, _ = ImageProcessingMixin.get_image_processor_dict(cfg.backbone)
            return tuple(map(float, processor["image_mean"])), tuple(map(float, processor["image_std"]))
        except (OSError, KeyError) as err:
            log.info("no image processor configuration for %s (%s): ImageNet normalisation", cfg.backbone, err)
    return IMAGENET_MEAN, IMAGENET_STD
