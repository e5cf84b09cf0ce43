"""EVP (Liu et al., CVPR 2023, "Explicit Visual Prompting"): prompts made explicitly from the image,
added to every block's input, as EVP's released code builds them (NiFangBaAGe/Explicit-Visual-Prompt,
``vit_evp.py`` and ``mix_transformer_evp.py``; settings in ``model.evp``).

For each stage k of width C_k (one stage on a ViT), with c_k = C_k / r (r = ``scale_factor``):

    F_hfc    = |IFFT((1 - M) FFT(x))|           the input's high-frequency components: M is the
                                                centred square of the shifted spectrum covering
                                                ``frequency_ratio`` of it (0.25)
    H_k      = handcrafted_k(H_{k-1}), H_0 = F_hfc   a strided convolution to c_k channels (ViT: the
                                                patch embedding's p x p grid; hierarchical backbones:
                                                EVP's overlapping 7x7/4 then 3x3/2 convolutions, each
                                                followed by a LayerNorm)
    F_k      = H_k + Linear_{C_k -> c_k}(E_k)   plus the frozen patch embedding E_k of the stage
                                                (the stage's input tokens), projected down
    P_{k,i}  = shared_k(GELU(lightweight_{k,i}(F_k)))   per block i its own c_k x c_k "lightweight
                                                MLP", one up-projection c_k -> C_k per stage
    block i of stage k reads E + P_{k,i}        (on a ViT the patch tokens only, not cls)

The DVPT authors' Swin EVP is this hierarchical generator on Swin's stages (its count, below,
matches Table 1 to the weight). Everything of EVP trains (its convolutions, LayerNorms and linear
layers, initialised as in EVP's code) with the classifier; nothing starts at zero, so unlike
DVPT the model does not start as the frozen one.

Trainable parameters per stage: embedding C_k c_k + c_k, lightweight L_k (c_k^2 + c_k), shared
c_k C_k + C_k, handcrafted i_k a_k c_k + c_k (+ 2 c_k with the LayerNorm), i_k its input channels
(3, then c_{k-1}) and a_k its kernel area. With r = 4:

- CLIP ViT-B/16 (C=768, L=12, c=192, 16x16 kernel): 147,648 + 444,672 + 148,224 + 147,648 =
  888,192; with the 5-class head 890,757. Table 1's 0.8907M is 888,192 + 2,560 (its bias-free
  head) = 890,752.
- Swin-B (C = 128, 256, 512, 1024; L = 2, 2, 18, 2; c = 32, 64, 128, 256): embedding 348,640,
  lightweight 439,232, shared 350,080, handcrafted 393,216: 1,531,168; with the head 1,536,293.
  Table 1's 1.5362M is 1,531,168 + 5,120 = 1,536,288.
- SegFormer-B4 (C = 64, 128, 320, 512; L = 3, 8, 27, 3; c = 16, 32, 80, 128): 96,512 + 233,760 +
  97,280 + 122,928 = 550,480; with the released decoder's 2-class classifier 556,626, Table 2's
  0.5566M (Hugging Face's decoder layout: 552,018).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import SegformerForSemanticSegmentation

from dvpt_core.config import ConfigError, EVPConfig, ModelConfig
from dvpt_core.models.backbone import BackboneInfo
from dvpt_core.models.blocks import block_dim, block_stages
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.models.segmenter import AdaptedSegmenter, token_map

# EVP's handcrafted generators on hierarchical backbones: MiT's overlapping patch embeddings
# (kernel, stride), the first on the image, the others on the previous stage's map.
HIERARCHICAL_KERNELS = [(7, 4), (3, 2), (3, 2), (3, 2)]


def fft_highpass(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """|IFFT((1 - M) FFT(x))| per channel, M the centred square of the shifted spectrum whose side
    is sqrt(ratio * H * W) (EVP's ``fft`` with ``prompt_type='highpass'``)."""
    height, width = images.shape[-2:]
    half = int(math.sqrt(height * width * ratio) // 2)
    keep = torch.ones(height, width, device=images.device)
    keep[height // 2 - half : height // 2 + half, width // 2 - half : width // 2 + half] = 0
    spectrum = torch.fft.fftshift(torch.fft.fft2(images, norm="forward"), dim=(-2, -1))
    filtered = torch.fft.ifftshift(spectrum * keep, dim=(-2, -1))
    return torch.fft.ifft2(filtered, norm="forward").real.abs()


class PatchProjection(nn.Module):
    """A strided convolution, optionally followed by a LayerNorm over channels; NCHW in and out."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, norm: bool) -> None:
        super().__init__()
        padding = kernel // 2 if norm else 0  # EVP's OverlapPatchEmbed pads, its ViT PatchEmbed does not
        self.proj = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
        self.norm = nn.LayerNorm(out_channels) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class EVPPrompts(nn.Module):
    """EVP's prompt generator for stages of ``widths`` and ``depths``."""

    def __init__(
        self, widths: Sequence[int], depths: Sequence[int], kernels: Sequence[tuple[int, int]], norm: bool, cfg: EVPConfig
    ) -> None:
        super().__init__()
        reduced = [width // cfg.scale_factor for width in widths]
        if min(reduced) < 1:
            raise ConfigError(f"model.evp.scale_factor={cfg.scale_factor} exceeds the narrowest stage width {min(widths)}")
        self.ratio = cfg.frequency_ratio
        inputs = [3, *reduced[:-1]]
        self.handcrafted = nn.ModuleList(
            PatchProjection(i, c, kernel, stride, norm) for i, c, (kernel, stride) in zip(inputs, reduced, kernels)
        )
        self.embedding = nn.ModuleList(nn.Linear(w, c) for w, c in zip(widths, reduced))
        self.lightweight = nn.ModuleList(
            nn.ModuleList(nn.Sequential(nn.Linear(c, c), nn.GELU()) for _ in range(depth))
            for c, depth in zip(reduced, depths)
        )
        self.shared = nn.ModuleList(nn.Linear(c, w) for w, c in zip(widths, reduced))
        self.apply(_init_weights)

    def handcrafted_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """H_k for every stage, as (N, c_k, h_k, w_k) maps."""
        x, maps = fft_highpass(images, self.ratio), []
        for generator in self.handcrafted:
            x = generator(x)
            maps.append(x)
        return maps

    def stage_feature(self, stage: int, handcrafted: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """F_k; ``handcrafted`` and ``tokens`` in the same layout, channels last."""
        return handcrafted + self.embedding[stage](tokens)

    def prompt(self, stage: int, block: int, feature: torch.Tensor) -> torch.Tensor:
        return self.shared[stage](self.lightweight[stage][block](feature))


def _init_weights(module: nn.Module) -> None:
    """EVP's initialisation: truncated-normal linear layers, He-normal convolutions, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = math.prod(module.kernel_size) * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        nn.init.zeros_(module.bias)


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C), row-major like patch tokens."""
    return feature_map.flatten(2).transpose(1, 2)


class EVPViT(AdaptedClassifier):
    method = "evp"

    def __init__(self, backbone: VisionTransformer, info: BackboneInfo, cfg: EVPConfig, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        patch = backbone.patch_embed.patch_size[0]
        self.evp = EVPPrompts([backbone.embed_dim], [len(block_stages(backbone)[0])], [(patch, patch)], False, cfg)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        patches = b.patch_embed(images)
        feature = self.evp.stage_feature(0, _tokens(self.evp.handcrafted_maps(images)[0]), patches)
        x = b.norm_pre(b.patch_drop(b._pos_embed(patches)))
        n = b.num_prefix_tokens
        for i, block in enumerate(b.blocks):
            x = block(torch.cat([x[:, :n], x[:, n:] + self.evp.prompt(0, i, feature)], dim=1))
        return b.forward_head(b.norm(x), pre_logits=True)


class EVPSwin(AdaptedClassifier):
    method = "evp"

    def __init__(self, backbone: SwinTransformer, info: BackboneInfo, cfg: EVPConfig, num_classes: int) -> None:
        super().__init__(backbone, info, num_classes)
        stages = block_stages(backbone)
        self.evp = EVPPrompts([block_dim(s[0]) for s in stages], [len(s) for s in stages], HIERARCHICAL_KERNELS, True, cfg)
        expected = [tuple(s[0].input_resolution) for s in stages]
        got, size = [], info.image_size
        for kernel, stride in HIERARCHICAL_KERNELS:
            size = (size + 2 * (kernel // 2) - kernel) // stride + 1
            got.append((size, size))
        if got != expected:
            raise ConfigError(
                f"EVP's handcrafted maps {got} do not match Swin's stages {expected} at "
                f"model.image_size={info.image_size}; use a multiple of 32"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        handcrafted = self.evp.handcrafted_maps(images)
        x = b.patch_embed(images)
        for k, stage in enumerate(b.layers):
            x = stage.downsample(x)
            feature = self.evp.stage_feature(k, handcrafted[k].permute(0, 2, 3, 1), x)
            for i, block in enumerate(stage.blocks):
                x = block(x + self.evp.prompt(k, i, feature))
        return b.forward_head(b.norm(x), pre_logits=True)


class EVPSegformer(AdaptedSegmenter):
    def __init__(
        self, backbone: SegformerForSemanticSegmentation, info: BackboneInfo, cfg: ModelConfig, num_classes: int
    ) -> None:
        super().__init__(backbone, info, num_classes, cfg.segformer.decoder, method="evp")
        stages = block_stages(backbone)
        convs = [stage.patch_embeddings.proj for stage in backbone.segformer.stages]
        kernels = [(conv.kernel_size[0], conv.stride[0]) for conv in convs]
        self.evp = EVPPrompts([block_dim(s[0]) for s in stages], [len(s) for s in stages], kernels, True, cfg.evp)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """SegformerModel's stages with EVP's prompt added before every block."""
        handcrafted = self.evp.handcrafted_maps(images)
        features, x = [], images
        for k, stage in enumerate(self.backbone.segformer.stages):
            tokens, height, width = stage.patch_embeddings(x)
            feature = self.evp.stage_feature(k, _tokens(handcrafted[k]), tokens)
            for i, block in enumerate(stage.blocks):
                tokens = block(tokens + self.evp.prompt(k, i, feature), height, width)
            x = token_map(stage.layer_norm(tokens), height, width)
            features.append(x)
        return features


def build_vit(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> EVPViT:
    return EVPViT(backbone, info, cfg.evp, num_classes)


def build_swin(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> EVPSwin:
    return EVPSwin(backbone, info, cfg.evp, num_classes)


def build_segformer(backbone: nn.Module, info: BackboneInfo, cfg: ModelConfig, num_classes: int) -> EVPSegformer:
    return EVPSegformer(backbone, info, cfg, num_classes)
