"""The block families the methods adapt: timm ViT's ``Block``, timm Swin's ``SwinTransformerBlock``
and Hugging Face SegFormer's ``SegformerLayer`` (MiT).

Methods that add a branch beside the FFN (AdaptFormer, DVPT on Swin and SegFormer) need the block
split where the papers feed that branch, at the output of the attention residual
E~ = E + MHSA(LN(E)); these helpers split every family the same way, so a method's block wrapper
is written once. Swin blocks work on NHWC tensors, ViT blocks on token sequences, SegFormer blocks
on token sequences plus the map's height and width (``*spatial``: its spatial-reduction attention
and Mix-FFN's depth-wise convolution reshape the tokens to the map); the FFN is per-token (per
position for Mix-FFN), so all pass through unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from transformers import SegformerForSemanticSegmentation
from transformers.models.segformer.modeling_segformer import SegformerLayer

from dvpt_core.config import ConfigError

Arch = Literal["vit", "swin", "segformer"]
AnyBlock = Block | SwinTransformerBlock | SegformerLayer


def architecture(backbone: nn.Module) -> Arch:
    """Which family a backbone belongs to; anything else is refused by name."""
    if isinstance(backbone, VisionTransformer):
        return "vit"
    if isinstance(backbone, SwinTransformer):
        return "swin"
    if isinstance(backbone, SegformerForSemanticSegmentation):
        return "segformer"
    raise ConfigError(
        f"model.backbone builds a {type(backbone).__name__}; the methods support timm VisionTransformer "
        "and SwinTransformer and Hugging Face SegformerForSemanticSegmentation backbones"
    )


def block_stages(backbone: nn.Module) -> list[nn.ModuleList | nn.Sequential]:
    """The containers holding the blocks: one for a ViT, one per stage for Swin and SegFormer."""
    arch = architecture(backbone)
    if arch == "vit":
        stages = [backbone.blocks]
    elif arch == "swin":
        stages = [stage.blocks for stage in backbone.layers]
    else:
        stages = [stage.blocks for stage in backbone.segformer.stages]
    supported = (Block, SwinTransformerBlock, SegformerLayer)
    odd = {type(b).__name__ for stage in stages for b in stage if type(b) not in supported}
    if odd:
        raise ConfigError(
            f"only timm's pre-norm Block, SwinTransformerBlock and Hugging Face SegformerLayer are supported, not {sorted(odd)}"
        )
    return stages


def attention_residual(block: AnyBlock, x: torch.Tensor, *spatial: int) -> torch.Tensor:
    """E~ = E + MHSA(LN(E)) (paper eq. 7), windowed and shifted for Swin, spatially reduced for MiT."""
    if isinstance(block, SegformerLayer):
        attn, _ = block.attention(block.layernorm_before(x), *spatial)
        return x + block.drop_path(block.hidden_dropout(attn))
    if isinstance(block, SwinTransformerBlock):
        return x + block.drop_path1(block._attn(block.norm1(x)))
    return x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))


def ffn(block: AnyBlock, x: torch.Tensor, *spatial: int) -> torch.Tensor:
    """FFN(LN(E~)) with the block's drop path (and layer scale for ViT), without the residual."""
    if isinstance(block, SegformerLayer):
        return block.drop_path(block.mlp(block.layernorm_after(x), *spatial))
    if isinstance(block, SwinTransformerBlock):
        return block.drop_path2(block.mlp(block.norm2(x)))
    return block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def block_dim(block: AnyBlock) -> int:
    norm = block.layernorm_before if isinstance(block, SegformerLayer) else block.norm1
    return norm.normalized_shape[-1]
