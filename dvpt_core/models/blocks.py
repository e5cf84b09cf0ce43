"""The two timm block families the methods adapt: ViT's ``Block`` and Swin's ``SwinTransformerBlock``.

Methods that add a branch beside the FFN (AdaptFormer, DVPT on Swin) need the block split where
the papers feed that branch, at the output of the attention residual E~ = E + MHSA(LN(E)); these
helpers split both families the same way, so a method's block wrapper is written once. Swin blocks work on NHWC
tensors, ViT blocks on token sequences; the FFN is per-token, so both pass through unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from dvpt_core.config import ConfigError

Arch = Literal["vit", "swin"]


def architecture(backbone: nn.Module) -> Arch:
    """Which family a timm backbone belongs to; anything else is refused by name."""
    if isinstance(backbone, VisionTransformer):
        return "vit"
    if isinstance(backbone, SwinTransformer):
        return "swin"
    raise ConfigError(
        f"model.backbone builds a {type(backbone).__name__}; the methods support timm VisionTransformer "
        "and SwinTransformer backbones"
    )


def block_stages(backbone: nn.Module) -> list[nn.Sequential]:
    """The containers holding the blocks: one for a ViT, one per stage for a Swin (widths differ)."""
    if architecture(backbone) == "vit":
        stages = [backbone.blocks]
    else:
        stages = [stage.blocks for stage in backbone.layers]
    odd = {type(b).__name__ for stage in stages for b in stage if type(b) not in (Block, SwinTransformerBlock)}
    if odd:
        raise ConfigError(f"only timm's pre-norm Block and SwinTransformerBlock are supported, not {sorted(odd)}")
    return stages


def attention_residual(block: Block | SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """E~ = E + MHSA(LN(E)) (paper eq. 7), windowed and shifted for Swin."""
    if isinstance(block, SwinTransformerBlock):
        return x + block.drop_path1(block._attn(block.norm1(x)))
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))


def ffn(block: Block | SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """FFN(LN(E~)) with the block's drop path (and layer scale for ViT), without the residual."""
    if isinstance(block, SwinTransformerBlock):
        return block.drop_path2(block.mlp(block.norm2(x)))
    return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def block_dim(block: Block | SwinTransformerBlock) -> int:
    return block.norm1.normalized_shape[-1]
