"""AdaptFormer (Chen et al., 2022): a scaled bottleneck beside each block's frozen FFN.

    E~ = E + MHSA(LN(E))
    E  = E~ + FFN(LN(E~)) + s * Up(ReLU(Down(E~)))

with a bottleneck of 64, s = 0.1, dropout 0.1 inside the branch, Up initialised to zero (so
training starts from the frozen model) and Down as nn.Linear's default Kaiming-uniform with a zero
bias, as in AdaptFormer's code. The same wrapper serves ViT and Swin blocks (one branch per block,
at the block's width).

Counts (5 classes): a branch has 2 * 64 * d + 64 + d weights (+ 2d with ``layer_norm``).
CLIP ViT-B/16: 12 * 99,136 + 2,565 = 1,192,197; Swin-B: 129 * 12,032 + 24 * 64 + 5,125 =
1,558,789. The paper's 1.2106M and 1.5828M are the DVPT authors' baseline, which puts a trainable
LayerNorm before the branch (AdaptFormer's "in" option): with ``model.adaptformer.layer_norm=true``
the counts are 1,210,629 and 1,582,853, the paper's figures plus our classifier's 5 biases.

On SegFormer the branch sits beside each block's Mix-FFN. SegFormer-B4 (41 blocks, widths summing
to 11,392), 2 classes, released decoder layout: 129 * 11,392 + 41 * 64 + 6,146 = 1,478,338;
with the LayerNorm 1,501,122, Table 2's 1.5011M exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from dvpt_core.config import AdaptFormerConfig, ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.blocks import AnyBlock, attention_residual, block_dim, block_stages, ffn
from dvpt_core.models.segmenter import AdaptedSegmenter
from dvpt_core.models.adapted import AdapterLayer
from dvpt_core.peft.linear import LinearProbe


class AdaptMLP(AdapterLayer):
    """The trainable branch: s * Up(dropout(ReLU(Down(LN?(x)))))."""

    def __init__(self, dim: int, cfg: AdaptFormerConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if cfg.layer_norm else nn.Identity()
        self.down = nn.Linear(dim, cfg.bottleneck)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(cfg.dropout)
        self.up = nn.Linear(cfg.bottleneck, dim)
        self.scale = cfg.scale
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(self.act(self.down(self.norm(x)))))


class AdaptFormerBlock(nn.Module):
    """A frozen ViT, Swin or SegFormer block with an AdaptMLP beside its FFN, both fed the
    attention residual (SegFormer's blocks also take the map's height and width)."""

    def __init__(self, block: AnyBlock, branch: AdaptMLP) -> None:
        super().__init__()
        self.block = block
        self.adapter = branch

    def forward(self, x: torch.Tensor, *spatial: int) -> torch.Tensor:
        x = attention_residual(self.block, x, *spatial)
        return x + ffn(self.block, x, *spatial) + self.adapter(x)


def add_adaptformer(backbone: nn.Module, cfg: AdaptFormerConfig) -> None:
    for stage in block_stages(backbone):
        for i, block in enumerate(stage):
            stage[i] = AdaptFormerBlock(block, AdaptMLP(block_dim(block), cfg))


class AdaptFormer(LinearProbe):
    method = "adaptformer"

    def __init__(self, backbone: nn.Module, info: BackboneInfo, cfg: AdaptFormerConfig, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        add_adaptformer(backbone, cfg)


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> AdaptFormer:
    return AdaptFormer(backbone, info, cfg.adaptformer, num_classes)


def build_segformer(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> AdaptedSegmenter:
    model = AdaptedSegmenter(backbone, info, num_classes, cfg.segformer.decoder, method="adaptformer")
    add_adaptformer(backbone, cfg.adaptformer)
    return model
