"""The classifier every PEFT method builds: frozen backbone features -> frozen projection -> linear head.

Methods differ only in how they compute the pooled feature (``features``); the head is shared so
that parameter counts, adapters and exports treat every method alike.
"""

from __future__ import annotations

import torch
from torch import nn

from dvpt_core.models.backbone import BackboneInfo


class AdapterLayer(nn.Module):
    """Marks trainable layers that a method places inside the frozen backbone, so that they follow
    the classifier's train/eval mode (their dropout) while the backbone around them stays in eval.
    They must not hold frozen modules whose behaviour depends on that mode."""


class AdaptedClassifier(nn.Module):
    """Base of every method's model; subclasses implement ``features`` and mark what trains."""

    method: str = ""

    def __init__(self, backbone: nn.Module, info: BackboneInfo, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.info = info
        self.backbone.requires_grad_(False)
        # CLIP keeps its frozen contrastive projection (768 -> 512) before the trainable classifier.
        self.projection: nn.Module = backbone.head if info.frozen_projection else nn.Identity()
        in_features = backbone.head.out_features if info.frozen_projection else backbone.num_features
        self.classifier = nn.Linear(in_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.projection(self.features(x)))

    def train(self, mode: bool = True) -> "AdaptedClassifier":
        """Frozen parts stay in eval mode so their dropout and norms behave as at inference."""
        super().train(mode)
        self.backbone.eval()
        for module in self.backbone.modules():
            if isinstance(module, AdapterLayer):
                module.train(mode)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter: every trainable tensor once, under its first (canonical) name."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
