"""Linear probing: the frozen backbone's own pooled feature, and only the classifier trains.

It is also the base of every method that adapts the backbone in place (SSF, LoRA, AdaptFormer,
full fine-tuning, DVPT and VPT on Swin): those change modules inside the backbone and then pool
exactly as the backbone does (ViT: its cls token or its own pooling; Swin: the mean of the last
stage). The head on CLIP ViT-B/16 (512-d projection) with 5 classes has 512 * 5 + 5 = 2,565
weights and on Swin-B (1024-d) 5,125; the paper's 0.0025M and 0.0051M are 2,560 and 5,120
truncated to four decimals: the authors' classifier has no bias.

On SegFormer the probe is the segmenter itself (``dvpt_core.models.segmenter``): frozen encoder
and decoder, a trained 1x1 classifier. SegFormer-B4, 2 classes: 4 * 768 * 2 + 2 = 6,146 in the
released decoder layout (Table 2's 0.0061M), 768 * 2 + 2 = 1,538 in Hugging Face's.
"""

from __future__ import annotations

import torch
from torch import nn

from dvpt_core.config import ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.models.segmenter import AdaptedSegmenter


class LinearProbe(AdaptedClassifier):
    method = "linear"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.backbone
        return backbone.forward_head(backbone.forward_features(images), pre_logits=True)


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> LinearProbe:
    return LinearProbe(backbone, info, num_classes)


def build_segformer(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> AdaptedSegmenter:
    return AdaptedSegmenter(backbone, info, num_classes, cfg.segformer.decoder)
