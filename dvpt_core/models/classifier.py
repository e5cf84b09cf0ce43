"""The classifier every PEFT method builds: frozen backbone features -> frozen projection -> linear head.

Methods differ only in how they compute the pooled feature (``features``); the head is shared so
that parameter counts, adapters and exports treat every method alike.
"""

from __future__ import annotations

import torch
from torch import nn

from dvpt_core.models.adapted import AdaptedModel
from dvpt_core.models.backbone import BackboneInfo


class AdaptedClassifier(AdaptedModel):
    """Base of every classification method's model; subclasses implement ``features``."""

    def __init__(self, backbone: nn.Module, info: BackboneInfo, num_classes: int) -> None:
        super().__init__(backbone, info)
        # CLIP keeps its frozen contrastive projection (768 -> 512) before the trainable classifier.
        self.projection: nn.Module = backbone.head if info.frozen_projection else nn.Identity()
        in_features = backbone.head.out_features if info.frozen_projection else backbone.num_features
        self.classifier = nn.Linear(in_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projection(self.features(x)))
