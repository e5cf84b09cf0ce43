"""LoRA (Hu et al., 2021): a low-rank update W + (alpha / r) * B A beside frozen attention layers.

timm fuses the query, key and value maps into one ``qkv`` linear layer (ViT and Swin alike), so one
rank-r update on it adapts all three (LoRA's paper adapts W_q and W_v with separate updates);
``model.lora.targets`` adds the attention output ``proj``. A is initialised as nn.Linear's weights
(Kaiming-uniform) and B to zero, so training starts from the frozen model; ``merge()`` folds B A
into the frozen weights for inference.

The ``peft`` library implements this, but it is not in this project's pinned stack and these few
lines on timm's own layers keep adapters and merged models plain safetensors and timm modules.

Hugging Face's SegFormer keeps the query, key and value maps apart (``q_proj``, ``k_proj``,
``v_proj``; keys and values read the spatially reduced tokens), so there the "qkv" target puts
one update on each of the three, and "proj" on ``o_proj``.

Counts (r=8, 5 classes): a qkv update is r * d + 3d * r. CLIP ViT-B/16: 12 * 8 * 4 * 768 + 2,565 =
297,477; Swin-B: 32 * 12,032 + 5,125 = 390,149. SegFormer-B4 (three updates of 2 * r * C per
block), 2 classes: 48 * 11,392 (its 41 block widths summed) + 6,146 = 552,962 in the released
decoder layout. The paper has no LoRA baseline.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dvpt_core.config import LoRAConfig, ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.segmenter import AdaptedSegmenter
from dvpt_core.peft.layers import MergeableLayer, MergeableModel, swap_modules


class LoRALinear(MergeableLayer):
    """A frozen ``nn.Linear`` plus (alpha / r) * B A applied to its (dropped-out) input."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, base.in_features))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, cfg.rank))
        self.scaling = cfg.alpha / cfg.rank
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_a.T @ self.lora_b.T) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        module = copy.deepcopy(self.base)
        module.weight.add_(self.scaling * self.lora_b @ self.lora_a)
        return module


def add_lora(backbone: nn.Module, cfg: LoRAConfig) -> None:
    swap_modules(backbone, lambda name, m: LoRALinear(m, cfg) if _is_target(name, m, cfg.targets) else None)


class LoRAModel(MergeableModel):
    method = "lora"

    def __init__(self, backbone: nn.Module, info: BackboneInfo, cfg: LoRAConfig, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        add_lora(backbone, cfg)


# The attention layers each target names: timm's (ViT, Swin) and Hugging Face SegFormer's.
TARGET_LAYERS = {"qkv": {"qkv", "q_proj", "k_proj", "v_proj"}, "proj": {"proj", "o_proj"}}


def _is_target(name: str, module: nn.Module, targets: list[str]) -> bool:
    """``<...>.attn.qkv`` / ``<...>.attn.proj`` in timm ViT and Swin blocks,
    ``<...>.attention.{q,k,v,o}_proj`` in SegFormer's."""
    parent, _, leaf = name.rpartition(".")
    layers = set().union(*(TARGET_LAYERS[target] for target in targets))
    return isinstance(module, nn.Linear) and parent.endswith(("attn", "attention")) and leaf in layers


def build(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> LoRAModel:
    return LoRAModel(backbone, info, cfg.lora, num_classes)


def build_segformer(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> AdaptedSegmenter:
    model = AdaptedSegmenter(backbone, info, num_classes, cfg.segformer.decoder, method="lora")
    add_lora(backbone, cfg.lora)
    return model
