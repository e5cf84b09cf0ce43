"""VPT (Jia et al., 2022): learnable prompt tokens in a frozen transformer.

ViT, tokens ``[cls, P, patches]``: prompts after cls (and any register tokens), without position
embedding, where the first block's input begins (after the embedding and any pre-norm). Shallow:
one set of m prompts enters there and travels through every block. Deep: before every block the
prompt positions are overwritten with that block's own set. The classifier reads the backbone's own
pooled feature with the prompt tokens removed. Prompts are initialised uniformly in
+-sqrt(6 / (3 * p * p + d)) (Xavier over the patch size p and the embedding width d, as in VPT's
code, for Swin its first stage's width throughout) and pass through dropout (VPT's default: 0).

Swin, deep only. Swin attends inside windows, so there is no token sequence to extend; VPT's own
Swin code prepends the prompts to every window. Here each block's attention gets the block's m
prompts (after its LN) as extra keys and values in every window, with zero relative-position bias
and no shift mask; as in VPT-deep the prompt outputs are dropped (VPT's Swin code also averages the
last block's prompt outputs into the pooled feature; here Swin pools its patches as usual). Shallow
VPT on Swin would carry prompt tokens through windows and patch merging, which VPT's code does by
averaging them over windows and tiling them 4x at each merge: refused here.

SegFormer, deep only, as in EVP's released MiT-VPT code (the DVPT authors' SegFormer baseline):
each block's m prompts (width C, initialised over MiT's nominal patch size 4 and C) join its
efficient attention as extra keys and values, after the block's LN and, where keys are spatially
reduced, after the reduction's LN; the prompt outputs are dropped, as the Mix-FFN's depth-wise
convolution could not take them (EVP's code computes them and drops them after the block). Shallow
VPT is refused for the same reason as on Swin (the stages change width and resolution).

Counts (m=50, 5 classes): deep CLIP ViT-B/16: 12 * 50 * 768 + 2,565 = 463,365 (paper: 0.4633M,
i.e. 460,800 + its bias-free 2,560 truncated); shallow: 40,965. Deep Swin-B: 50 * 12,032 + 5,125
= 606,725; the paper's 0.3254M is not m * 12,032 + 5,120 for any whole m (m = 26.6), so its Swin
VPT had some other prompt layout the released code does not show. Deep SegFormer-B4, 2 classes,
released decoder layout: 50 * 11,392 (its 41 block widths summed) + 6,146 = 575,746, Table 2's
0.5757M.
"""

from __future__ import annotations

import math

import torch
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F
from transformers.models.segformer.modeling_segformer import SegformerAttention

from dvpt_core.config import ModelConfig, VPTConfig
from dvpt_core.models.adapted import AdapterLayer
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.blocks import block_dim, block_stages
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.models.segmenter import AdaptedSegmenter
from dvpt_core.peft.linear import LinearProbe


def xavier_bound(patch_area: int, width: int) -> float:
    """VPT's prompt initialisation range: Xavier-uniform over a patch of 3 channels and the width."""
    return math.sqrt(6.0 / (3 * patch_area + width))


def timm_bound(backbone: nn.Module) -> float:
    embed = backbone.patch_embed
    return xavier_bound(math.prod(embed.patch_size), embed.proj.out_channels)


# MiT's nominal patch size (its first, overlapping, patch convolution has stride 4).
MIT_PATCH_AREA = 4 * 4


class Prompts(AdapterLayer):
    """``sets`` sets of m prompt tokens of width ``dim``, with VPT's initialisation and dropout."""

    def __init__(self, sets: int, cfg: VPTConfig, dim: int, bound: float) -> None:
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(sets, cfg.prompts, dim).uniform_(-bound, bound))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self) -> torch.Tensor:
        return self.dropout(self.tokens)


class VPTViT(AdaptedClassifier):
    """A frozen timm VisionTransformer with shallow or deep VPT prompts."""

    def __init__(self, backbone: VisionTransformer, info: BackboneInfo, cfg: VPTConfig, num_classes: int, deep: bool) -> None:
        super().__init__(backbone, info, num_classes)
        block_stages(backbone)  # refuses block types the prompts cannot pass through
        self.method = "vpt_deep" if deep else "vpt_shallow"
        self.deep = deep
        sets = len(backbone.blocks) if deep else 1
        self.prompts = Prompts(sets, cfg, backbone.embed_dim, timm_bound(backbone))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        n = b.num_prefix_tokens
        prompts = self.prompts().expand(images.shape[0], -1, -1, -1)
        m = prompts.shape[2]
        x = b.norm_pre(b.patch_drop(b._pos_embed(b.patch_embed(images))))
        x = torch.cat([x[:, :n], prompts[:, 0], x[:, n:]], dim=1)
        for i, block in enumerate(b.blocks):
            if self.deep and i > 0:
                x = torch.cat([x[:, :n], prompts[:, i], x[:, n + m :]], dim=1)
            x = block(x)
        x = b.norm(x)
        return b.forward_head(torch.cat([x[:, :n], x[:, n + m :]], dim=1), pre_logits=True)


class PromptedWindowAttention(nn.Module):
    """timm's WindowAttention with a block's prompts as extra keys and values in every window."""

    def __init__(self, attn: WindowAttention, norm: nn.Module, prompts: Prompts) -> None:
        super().__init__()
        self.attn = attn
        self.norm = norm
        self.prompts = prompts

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn
        windows, n, _ = x.shape
        prompt_qkv = a.qkv(self.norm(self.prompts()[0]))  # the same m keys and values in every window
        m = prompt_qkv.shape[0]
        qkv = torch.cat([prompt_qkv.expand(windows, -1, -1), a.qkv(x)], dim=1)
        q, k, v = qkv.reshape(windows, m + n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = F.pad(a._get_rel_pos_bias(), (m, 0))  # prompts: zero bias, never masked
        if mask is not None:
            num_win = mask.shape[0]
            shift = F.pad(mask, (m, 0)).view(1, num_win, 1, n, m + n)
            bias = (bias.unsqueeze(1) + shift).expand(windows // num_win, -1, -1, -1, -1)
            bias = bias.reshape(windows, a.num_heads, n, m + n)
        dropout = a.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q[:, :, m:], k, v, attn_mask=bias, dropout_p=dropout)
        return a.proj_drop(a.proj(out.transpose(1, 2).reshape(windows, n, -1)))


class VPTSwin(LinearProbe):
    """A frozen timm SwinTransformer with deep VPT prompts in every block's window attention."""

    method = "vpt_deep"

    def __init__(self, backbone: nn.Module, info: BackboneInfo, cfg: VPTConfig, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        for stage in block_stages(backbone):
            for block in stage:
                prompts = Prompts(1, cfg, block_dim(block), timm_bound(backbone))
                block.attn = PromptedWindowAttention(block.attn, block.norm1, prompts)


class PromptedEfficientAttention(nn.Module):
    """Hugging Face SegFormer's efficient attention with a block's prompts as extra keys and values."""

    def __init__(self, attn: SegformerAttention, norm: nn.LayerNorm, prompts: Prompts) -> None:
        super().__init__()
        self.attn = attn
        self.norm = norm
        self.prompts = prompts

    def forward(self, hidden_states: torch.Tensor, height: int, width: int, **_: object) -> tuple[torch.Tensor, None]:
        a = self.attn
        batch, tokens, _ = hidden_states.shape
        prompts = self.norm(self.prompts()[0])
        keys = hidden_states
        if a.sequence_reduction_ratio > 1:
            keys = a.sequence_reduction(hidden_states, height, width)
            prompts = a.sequence_reduction.layer_norm(prompts)
        keys = torch.cat([prompts.expand(batch, -1, -1), keys], dim=1)
        q, k, v = (
            proj(x).view(batch, x.shape[1], -1, a.head_dim).transpose(1, 2)
            for proj, x in ((a.q_proj, hidden_states), (a.k_proj, keys), (a.v_proj, keys))
        )
        dropout = a.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=a.scaling)
        return a.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), None


SHALLOW_ON_SWIN = (
    "shallow VPT needs one token sequence through the whole network, which Swin's windows and patch "
    "merging do not have; use model.method=vpt_deep"
)
SHALLOW_ON_SEGFORMER = (
    "shallow VPT needs one token sequence through the whole network, which MiT's stages (each with "
    "its own patch embedding and width) do not have; use model.method=vpt_deep"
)


def build_shallow(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> VPTViT:
    return VPTViT(backbone, info, cfg.vpt, num_classes, deep=False)


def build_deep(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> VPTViT:
    return VPTViT(backbone, info, cfg.vpt, num_classes, deep=True)


def build_swin(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> VPTSwin:
    return VPTSwin(backbone, info, cfg.vpt, num_classes)


def build_segformer(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> AdaptedSegmenter:
    model = AdaptedSegmenter(backbone, info, num_classes, cfg.segformer.decoder, method="vpt_deep")
    for stage in block_stages(backbone):
        for block in stage:
            width = block_dim(block)
            prompts = Prompts(1, cfg.vpt, width, xavier_bound(MIT_PATCH_AREA, width))
            block.attention = PromptedEfficientAttention(block.attention, block.layernorm_before, prompts)
    return model
