"""The segmenter every PEFT method builds on a frozen Hugging Face SegFormer: MiT encoder -> all-MLP
decoder -> a trained 1x1 classifier, logits upsampled to the input's size.

The frozen model's forward is re-run here stage by stage (patch embedding, blocks, norm) so that a
method can adapt blocks in place or hand its own (``stage_blocks``, ``projections``). The decoder
comes in two layouts (``model.segformer.decoder``):

- "huggingface": the four per-stage projections (C_i -> E), upsampled to the H/4 map, concatenated
  (stage 4 first), then Hugging Face's frozen fuse (1x1 conv 4E -> E, BatchNorm, ReLU, dropout)
  and a new 1x1 classifier E -> K (E * K + K weights).
- "released": the DVPT authors' ``code/Our_segformer.py``: no fuse layer; the new 1x1 classifier
  reads the 4E concatenated channels (4E * K + K; 6,146 for SegFormer-B4, K=2: Table 2's linear
  probe, 0.0061M).

Either way the logits (N, K, H/4, W/4) are upsampled bilinearly to the input's (H, W), so that
losses, metrics, ONNX and served models all see full-size masks. The frozen model's own classifier
(ADE20K's 150 classes), and in the released layout its fuse layer, are dropped after the backbone
was fingerprinted: nothing uses them, and full fine-tuning would otherwise count them as trained.
With the "released" layout and 2 classes, full fine-tuning of SegFormer-B4 trains 61,638,338
weights: Table 2's 61.6383M.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from transformers import SegformerForSemanticSegmentation

from dvpt_core.models.adapted import AdaptedModel
from dvpt_core.models.backbone import BackboneInfo

DecoderLayout = Literal["huggingface", "released"]


def token_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, H*W, C) tokens in row-major order -> an (N, C, H, W) map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, height, width)


def stage_sizes(backbone: SegformerForSemanticSegmentation, image_size: int) -> list[tuple[int, int]]:
    """Each stage's token map (height, width) for a square input, from its patch convolutions."""
    sizes, size = [], image_size
    for stage in backbone.segformer.stages:
        conv = stage.patch_embeddings.proj
        size = (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        sizes.append((size, size))
    return sizes


class AdaptedSegmenter(AdaptedModel):
    """A frozen SegFormer with a new classifier; as it stands, the linear probe of Table 2."""

    def __init__(
        self,
        backbone: SegformerForSemanticSegmentation,
        info: BackboneInfo,
        num_classes: int,
        decoder: DecoderLayout,
        method: str = "linear",
    ) -> None:
        super().__init__(backbone, info)
        self.method = method
        self.decoder = decoder
        head = backbone.decode_head
        width = backbone.config.decoder_hidden_size
        head.classifier = None
        if decoder == "released":
            head.linear_fuse = head.batch_norm = None
            width *= len(head.linear_projections)
        self.classifier = nn.Conv2d(width, num_classes, kernel_size=1)

    def stage_blocks(self) -> Sequence[Sequence[nn.Module]]:
        """The blocks each stage runs, called as ``block(tokens, height, width)``."""
        return [stage.blocks for stage in self.backbone.segformer.stages]

    def projections(self) -> Sequence[nn.Module]:
        """The decoder's per-stage projections, called on an (N, C_i, h, w) map, giving (N, h*w, E)."""
        return self.backbone.decode_head.linear_projections

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The four stages' normed (N, C_i, H_i, W_i) maps, as SegformerModel computes them."""
        features, x = [], images
        for stage, blocks in zip(self.backbone.segformer.stages, self.stage_blocks()):
            tokens, height, width = stage.patch_embeddings(x)
            for block in blocks:
                tokens = block(tokens, height, width)
            x = token_map(stage.layer_norm(tokens), height, width)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits at the first stage's resolution (H/4), as SegformerDecodeHead computes them."""
        size = features[0].shape[2:]
        maps = [
            F.interpolate(token_map(project(feature), *feature.shape[2:]), size=size, mode="bilinear", align_corners=False)
            for feature, project in zip(features, self.projections())
        ]
        x = torch.cat(maps[::-1], dim=1)
        if self.decoder == "huggingface":
            head = self.backbone.decode_head
            x = head.dropout(head.activation(head.batch_norm(head.linear_fuse(x))))
        return self.classifier(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.decode(self.encode(images))
        return F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
