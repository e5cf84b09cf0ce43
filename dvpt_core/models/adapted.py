"""What every adapted model shares, whatever its task: a frozen backbone with its provenance
(``info``), trainable tensors placed by a method, and the adapter those tensors make.

The classifier (``classifier.py``) and the segmenter (``segmenter.py``) differ only in the head
they put on the frozen features.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from dvpt_core.models.backbone import BackboneInfo


class AdapterLayer(nn.Module):
    """Marks trainable layers that a method places inside the frozen backbone, so that they follow
    the model's train/eval mode (their dropout) while the backbone around them stays in eval.
    They must not hold frozen modules whose behaviour depends on that mode."""


class AdaptedModel(nn.Module):
    """Base of every method's model: holds the frozen backbone; subclasses add the head and mark
    what trains."""

    method: str = ""

    def __init__(self, backbone: nn.Module, info: BackboneInfo) -> None:
        super().__init__()
        self.backbone = backbone
        self.info = info
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "AdaptedModel":
        """Frozen parts stay in eval mode so their dropout and norms behave as at inference, but
        for stochastic depth (timm's DropPath: Identity unless ``backbone_kwargs.drop_path_rate``
        asks for it, as the released Swin code trains with the whole model in train mode)."""
        super().train(mode)
        self.backbone.eval()
        for module in self.backbone.modules():
            if isinstance(module, (AdapterLayer, DropPath)):
                module.train(mode)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter: every trainable tensor once, under its first (canonical) name."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
