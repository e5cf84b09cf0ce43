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
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from dvpt_core.config import AdaptFormerConfig, ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.blocks import attention_residual, block_dim, block_stages, ffn
from dvpt_core.models.classifier import AdapterLayer
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
    """A frozen ViT or Swin block with an AdaptMLP beside its FFN, both fed the attention residual."""

    def __init__(self, block: Block | SwinTransformerBlock, branch: AdaptMLP) -> None:
        super().__init__()
        self.block = block
        self.adapter = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = attention_residual(self.block, x)
        return x + ffn(self.block, x) + self.adapter(x)


class AdaptFormer(LinearProbe):
    method = "adaptformer"

    def __init__(self, backbone: nn.Module, info: BackboneInfo, cfg: AdaptFormerConfig, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        for stage in block_stages(backbone):
            for i, block in enumerate(stage):
                stage[i] = AdaptFormerBlock(block, AdaptMLP(block_dim(block), cfg))


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> AdaptFormer:
    return AdaptFormer(backbone, info, cfg.adaptformer, num_classes)
