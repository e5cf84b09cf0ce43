"""SSF (Lian et al., 2022): scale and shift the output of frozen operations, y = gamma * x + beta.

As in SSF's code, every ``nn.Linear``, ``nn.LayerNorm`` and ``nn.Conv2d`` of the backbone except
its head gets its own gamma and beta per output channel (initialised N(1, 0.02) and N(0, 0.02)):
in each block qkv, the attention projection, fc1, fc2, norm1 and norm2; outside the blocks the
patch-embedding convolution and the norms (ViT's pre- and final norm; Swin's patch-embedding norm,
final norm and each patch merging's norm and reduction). Each acts right after a map that is linear
per output channel, so ``merge()`` folds it into that map (W' = diag(gamma) W,
b' = gamma * b + beta), leaving a plain timm model.

Counts (5 classes): per block 2 * (3d + d + 4d + d + d + d) = 22d. CLIP ViT-B/16:
12 * 22 * 768 + 3 * 2 * 768 (patch embedding, pre and final norm) + 2,565 = 209,925. Swin-B:
22 * 12,032 (its 24 block widths summed) + 2 * (128 + 128 + 1,024) (patch embedding and its norm,
final norm) + 12 * (128 + 256 + 512) (patch mergings: 4C norm and 2C reduction) + 5,125 = 283,141.
The paper reports 0.3824M and 0.3790M. Its SSF baseline is not in the released code, and for ViT
382,4xx - 2,560 = 379,904 = 494 * 768 + 512 implies about 41 scaled 768-vectors per block, nearly
twice SSF's own placement (22); no placement of whole SSF pairs gives the Swin figure either.

On SegFormer the same rule wraps, per MiT block, its two norms, the query, key, value and output
maps, the spatial reduction's convolution and norm (stages 1-3), fc1, the depth-wise convolution
and fc2 (17C, 15C in stage 4), plus the patch embeddings' convolutions and norms, the stage norms
and the decoder's projections (and, in Hugging Face's layout, its fuse convolution). SegFormer-B4,
2 classes, released layout: 2 * (17 * 9,856 + 15 * 1,536) + 4 * 1,024 + 2 * 1,024 + 8 * 768 +
6,146 = 399,618. Table 2's 0.3125M is not the released code's (it has no SSF SegFormer) and fits
no natural subset of these layers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dvpt_core.config import ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.segmenter import AdaptedSegmenter
from dvpt_core.peft.layers import MergeableLayer, MergeableModel, swap_modules


class SSF(MergeableLayer):
    """A frozen linear, norm or convolution layer followed by a per-channel scale and shift."""

    def __init__(self, base: nn.Linear | nn.LayerNorm | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        dim = base.weight.shape[0]  # output channels, for all three kinds
        self.scale = nn.Parameter(torch.empty(dim).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))
        # Channels are last except in a convolution's NCHW output.
        self.channel_shape = (-1, 1, 1) if isinstance(base, nn.Conv2d) else (-1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale.view(self.channel_shape) + self.shift.view(self.channel_shape)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        module = copy.deepcopy(self.base)
        bias = module.bias if module.bias is not None else torch.zeros_like(self.shift)
        scale = self.scale.view(-1, *([1] * (module.weight.dim() - 1)))
        module.weight = nn.Parameter(module.weight * scale, requires_grad=False)
        module.bias = nn.Parameter(bias * self.scale + self.shift, requires_grad=False)
        return module


def add_ssf(backbone: nn.Module) -> None:
    """Every linear, norm and convolution layer but a timm head gets its scale and shift."""
    swap_modules(
        backbone,
        lambda name, m: SSF(m) if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Conv2d)) and not name.startswith("head") else None,
    )


class SSFModel(MergeableModel):
    method = "ssf"

    def __init__(self, backbone: nn.Module, info: BackboneInfo, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        add_ssf(backbone)


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> SSFModel:
    return SSFModel(backbone, info, num_classes)


def build_segformer(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> AdaptedSegmenter:
    """After the segmenter dropped the layers it does not use (the decoder's own classifier and,
    in the released layout, its fuse layer), so that no SSF pair sits on an unused layer."""
    model = AdaptedSegmenter(backbone, info, num_classes, cfg.segformer.decoder, method="ssf")
    add_ssf(backbone)
    return model
