"""Full fine-tuning: every backbone weight trains, with the backbone in training mode.

Counts for 5 classes: CLIP ViT-B/16 at 224 has 86,193,152 weights in timm (which gives CLIP's
bias-free 768 -> 512 projection a 512-bias) plus the 2,565-weight head: 86,195,717. The paper's
86.2935M is the same network at its 288 input: the position embedding grows by
(18*18 - 14*14) * 768 = 98,304 weights, and 86,195,717 + 98,304 - 512 - 5 (no projection bias, no
classifier bias) = 86,293,504 exactly. Swin-B has 86,743,224 + 5,125 = 86,748,349; the paper's
86.7934M is 45,056 (0.05%) more, which the released code does not account for.
"""

from __future__ import annotations

from torch import nn

from dvpt_core.config import ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.peft.linear import LinearProbe


class FullFineTune(LinearProbe):
    method = "full"

    def __init__(self, backbone: nn.Module, info: BackboneInfo, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        self.backbone.requires_grad_(True)

    def train(self, mode: bool = True) -> "FullFineTune":
        """Nothing is frozen, so the backbone's dropout and drop path train too."""
        nn.Module.train(self, mode)
        return self


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> FullFineTune:
    return FullFineTune(backbone, info, num_classes)
