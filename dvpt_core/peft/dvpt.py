"""DVPT on timm VisionTransformers, as the paper writes it (section 3.3, eqs. 7-13).

Tokens are ordered ``[P (m prompts), cls, patches]``. In block l:

    E~ = MHSA(LN(E)) + E                                   (7)
    H  = act(f_down(E~))                                   (8)
    P, T = H[:, :m], H[:, m:]                              (9)
    P' = softmax(P T^T / sqrt(d')) T                       (10)  CAVPT: prompts as dynamic queries
    H' = [P', T]                                           (11)
    D  = g * f_up(H')                                      (12)
    E  = FFN(LN(E~)) + E~ + D                              (13)

One module (f_down, f_up, g) serves ``share_every`` consecutive blocks. ``cavpt=False`` skips
eqs. 10-11, which is the paper's "w/o CAVPT" ablation and what the authors' released ViT does
(it computes the cross-attention and discards it).

Trainable parameters, for a d-wide backbone with L blocks and a K-class head on c features::

    modules    ceil(L / s) * (2 * d * d' + d + d' + 1)     # f_down and f_up with biases, gate g
    prompts    m * d + m * d                               # prompts and their position embedding
    head       c * K + K

For CLIP ViT-B/16 (d=768, L=12, c=512 after the frozen projection), K=5, m=50, d'=20 this is
378,108 + 76,800 + 2,565 = 457,473 at s=1, 268,419 at s=2 and 205,401 at s=3. The paper
reports 457,446, 268,414 and 205,3xx: its figures match the same formula without the gates to
within 15 parameters (457,461, 268,413, 205,397), a gap the paper does not explain. Its
"w/o CAVPT" row (380,661) is the modules and head alone, i.e. ``cavpt=False, prompts=0``.
"""

from __future__ import annotations

import math

import torch
from timm.layers import QuickGELU
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from dvpt_core.config import ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.classifier import AdaptedClassifier

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "relu": nn.ReLU}


class DVPTModule(nn.Module):
    """The gated bottleneck with prompt cross-attention (eqs. 8-12), shared by ``s`` blocks.
    ``out_dim`` (default ``dim``) lets the bottleneck change width, as beside SegFormer's decoder
    projections."""

    def __init__(
        self, dim: int, hidden_dim: int, activation: str, gate_init: float, cavpt: bool, out_dim: int | None = None
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, hidden_dim)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(hidden_dim, out_dim or dim)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))
        self.cavpt = cavpt
        self.scale = 1.0 / math.sqrt(hidden_dim)

    def forward(self, tokens: torch.Tensor, num_prompts: int) -> torch.Tensor:
        hidden = self.act(self.down(tokens))
        if self.cavpt and num_prompts > 0:
            prompts, rest = hidden[:, :num_prompts], hidden[:, num_prompts:]
            attn = torch.softmax(prompts @ rest.transpose(1, 2) * self.scale, dim=-1)
            hidden = torch.cat([attn @ rest, rest], dim=1)
        return self.gate * self.up(hidden)


class DVPTBlock(nn.Module):
    """A frozen timm ``Block`` with a DVPT module beside its FFN (eq. 13)."""

    def __init__(self, block: Block, module: DVPTModule, num_prompts: int) -> None:
        super().__init__()
        self.block = block
        self.dvpt = module
        self.num_prompts = num_prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.dvpt(x, self.num_prompts)


class DVPTViT(AdaptedClassifier):
    """A frozen timm VisionTransformer adapted with DVPT, ending in a linear classifier."""

    method = "dvpt"

    def __init__(self, backbone: VisionTransformer, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        _check_supported(backbone)
        dim = backbone.embed_dim
        depth = len(backbone.blocks)
        m = cfg.prompts
        # Registered before the blocks so every module's canonical name is dvpt_modules.<i>.
        self.dvpt_modules = nn.ModuleList(
            DVPTModule(dim, cfg.hidden_dim, cfg.activation, cfg.gate_init, cfg.cavpt)
            for _ in range(math.ceil(depth / cfg.share_every))
        )
        self.blocks = nn.ModuleList(
            DVPTBlock(block, self.dvpt_modules[i // cfg.share_every], m)
            for i, block in enumerate(backbone.blocks)
        )
        self.num_prompts = m
        self.prompts = nn.Parameter(torch.randn(1, m, dim) * cfg.prompt_init_std) if m else None
        pos_std = cfg.prompt_pos_init_std if cfg.prompt_pos_init_std is not None else dim**-0.5
        self.prompt_pos = (
            nn.Parameter(torch.randn(1, m, dim) * pos_std) if m and cfg.prompt_pos_embed else None
        )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch and position embedding, then the prompts in front: ``[P, cls, patches]``."""
        b = self.backbone
        x = b.patch_drop(b._pos_embed(b.patch_embed(images)))
        if self.prompts is not None:
            prompts = self.prompts if self.prompt_pos is None else self.prompts + self.prompt_pos
            x = torch.cat([prompts.expand(x.shape[0], -1, -1), x], dim=1)
        return b.norm_pre(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean over the prompts and the cls token after the final norm (paper section 3.2)."""
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        x = self.backbone.norm(x)
        m = self.num_prompts
        if self.backbone.cls_token is not None:
            pooled = x[:, : m + 1].mean(dim=1)
        else:
            # No cls token: the backbone's own pooling of its tokens stands in for it.
            own = self.backbone.pool(x[:, m:]).unsqueeze(1)
            pooled = torch.cat([x[:, :m], own], dim=1).mean(dim=1)
        return self.backbone.head_drop(self.backbone.fc_norm(pooled))


def _check_supported(backbone: nn.Module) -> None:
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(
            f"DVPT for ViT needs a timm VisionTransformer, got {type(backbone).__name__}"
        )
    odd = {type(b).__name__ for b in backbone.blocks if type(b) is not Block}
    if odd:
        raise TypeError(f"DVPT wraps timm's pre-norm Block; this backbone has {sorted(odd)} blocks")
    if backbone.attn_pool is not None:
        raise TypeError("DVPT pools prompts and cls itself; backbones with attention pooling are not supported")


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> DVPTViT:
    return DVPTViT(backbone, info, cfg, num_classes)
