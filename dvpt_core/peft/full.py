"""Full fine-tuning: every backbone weight trains, with the backbone in training mode.

Counts for 5 classes: CLIP ViT-B/16 at 224 has 86,193,152 weights in timm (which gives CLIP's
bias-free 768 -> 512 projection a 512-bias) plus the 2,565-weight head: 86,195,717. The paper's
86.2935M is the same network at its 288 input: the position embedding grows by
(18*18 - 14*14) * 768 = 98,304 weights, and 86,195,717 + 98,304 - 512 - 5 (no projection bias, no
classifier bias) = 86,293,504 exactly. Swin-B has 86,743,224 + 5,125 = 86,748,349; the paper's
86.7934M is 45,056 (0.05%) more, which the released code does not account for.

SegFormer-B4, 2 classes: the MiT-B4 encoder (60,842,688) and the decoder's four projections
(789,504) plus the classifier: 61,638,338 in the released decoder layout, exactly Table 2's
61.6383M; Hugging Face's layout also trains its fuse layer and BatchNorm (3072 * 768 + 2 * 768) and
classifies from 768 channels: 63,994,562.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dvpt_core.config import ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.segmenter import AdaptedSegmenter
from dvpt_core.peft.linear import LinearProbe


class TrainsBackbone(nn.Module):
    """Mixed in before a task's model class: unfreezes the backbone and lets it train."""

    method = "full"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backbone.requires_grad_(True)

    def train(self, mode: bool = True) -> "TrainsBackbone":
        """Nothing is frozen, so the backbone's dropout, drop path and norms train too."""
        nn.Module.train(self, mode)
        return self


class FullFineTune(TrainsBackbone, LinearProbe):
    """Full fine-tuning of a classifier."""


class FullFineTuneSegmenter(TrainsBackbone, AdaptedSegmenter):
    """Full fine-tuning of a segmenter."""


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> FullFineTune:
    return FullFineTune(backbone, info, num_classes)


def build_segformer(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> FullFineTuneSegmenter:
    return FullFineTuneSegmenter(backbone, info, num_classes, cfg.segformer.decoder, method="full")
