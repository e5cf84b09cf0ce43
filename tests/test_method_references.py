"""Every method's forward pass against a step-by-step reference written here from the equations.

The references read the frozen weights from a plain copy of the backbone (same seed, same
fingerprint) and the method's trainable tensors by name, and compute the network with
``torch.nn.functional`` as the papers write it (DESIGN.md section 2; DVPT eqs. 7-13). Every
trainable tensor is moved off its initialisation first, so gates, scales, up-projections, LoRA's
B and the prompts are all non-zero: at initialisation most methods are the identity, and a test
there cannot tell where a branch is added or how it is scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dvpt_core.config import ExperimentConfig
from dvpt_core.models.backbone import create_backbone
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.peft import build_model
from tests.helpers import tiny_config

# vit_tiny at 32x32: 4 patches + cls, width 192, 3 heads; five blocks keep it quick and make
# ``share_every`` values that do not divide the depth possible.
VIT = ["model.backbone_kwargs={depth: 5}"]
# No cls token: the backbone averages its patch tokens (and has a LayerNorm after pooling).
VIT_AVG = ["model.backbone_kwargs={depth: 3, class_token: false, global_pool: avg}"]
# A CLIP image tower (pre-norm, frozen 64 -> 512 projection), shrunk.
CLIP = ["model.backbone=vit_base_patch16_clip_224.openai", "model.backbone_kwargs={depth: 2, embed_dim: 64, num_heads: 2}"]
# Swin-T layout at width 16 and 64x64: windows padded, shifted and clipped in every stage.
SWIN = ["model.backbone=swin_tiny_patch4_window7_224", "model.backbone_kwargs={embed_dim: 16, num_heads: [1, 2, 2, 4]}",
        "model.image_size=64"]
ATOL, RTOL = 1e-9, 1e-9


def build(*overrides: str) -> tuple[ExperimentConfig, AdaptedClassifier, nn.Module, torch.Tensor]:
    """The method's model with every trainable tensor moved, a plain backbone and two images, all
    in float64 so that the reference and the model agree to rounding far below any mutant's effect."""
    cfg = tiny_config(*overrides)
    model = build_model(cfg).eval().double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    plain, _ = create_backbone(cfg.model)
    size = cfg.model.image_size
    return cfg, model, plain.double(), torch.randn(2, 3, size, size, generator=generator, dtype=torch.float64)


def logits(model: AdaptedClassifier, pooled: torch.Tensor) -> torch.Tensor:
    """The trainable linear classifier on the pooled feature."""
    return F.linear(pooled, model.classifier.weight, model.classifier.bias)


def assert_matches(model: AdaptedClassifier, images: torch.Tensor, expected: torch.Tensor) -> None:
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ReferenceViT:
    """A timm VisionTransformer written out from its weights: conv patch embedding, cls token and
    absolute position embedding, pre-norm blocks (multi-head softmax attention, GELU MLP), final
    norm, pooling. ``post(name, input, output)`` lets a method change any layer's output."""

    def __init__(self, vit: nn.Module, post: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        self.vit = vit
        self.post = post or (lambda name, x, y: y)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = self.vit.get_submodule(name)
        return self.post(name, x, F.linear(x, layer.weight, layer.bias))

    def norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layer = self.vit.get_submodule(name)
        if isinstance(layer, nn.Identity):
            return x
        return self.post(name, x, layer_norm(x, layer))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens, the cls token in front, plus the position embedding (no pre-norm yet)."""
        conv = self.vit.patch_embed.proj
        x = self.post("patch_embed.proj", images, F.conv2d(images, conv.weight, conv.bias, stride=conv.stride))
        x = x.flatten(2).transpose(1, 2)
        if self.vit.cls_token is not None:
            x = torch.cat([self.vit.cls_token.expand(len(x), -1, -1), x], dim=1)
        return x + self.vit.pos_embed

    def attention(self, l: int, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        heads = self.vit.blocks[l].attn.num_heads
        qkv = self.linear(f"blocks.{l}.attn.qkv", x).reshape(batch, tokens, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        return self.linear(f"blocks.{l}.attn.proj", (weights @ v).transpose(1, 2).reshape(batch, tokens, width))

    def attention_residual(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """E~ = E + MHSA(LN(E)) (eq. 7)."""
        return x + self.attention(l, self.norm(f"blocks.{l}.norm1", x))

    def ffn(self, l: int, x: torch.Tensor) -> torch.Tensor:
        """FFN(LN(E~)), without the residual."""
        hidden = F.gelu(self.linear(f"blocks.{l}.mlp.fc1", self.norm(f"blocks.{l}.norm2", x)))
        return self.linear(f"blocks.{l}.mlp.fc2", hidden)

    def block(self, l: int, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_residual(l, x)
        return x + self.ffn(l, x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's own pooled feature of a ``[prefix, patches]`` sequence after its final norm."""
        x = self.norm("norm", x)
        pooled = x[:, 0] if self.vit.global_pool == "token" else x[:, self.vit.num_prefix_tokens :].mean(dim=1)
        return self.norm("fc_norm", pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.norm("norm_pre", self.embed(images))
        for l in range(len(self.vit.blocks)):
            x = self.block(l, x)
        return self.pool(x)


# --- DVPT on ViT (paper eqs. 7-13) -----------------------------------------------------------

ACTIVATION = {"gelu": F.gelu, "quick_gelu": quick_gelu, "relu": F.relu}


def dvpt_branch(module: nn.Module, e: torch.Tensor, m: int, cavpt: bool, activation: str) -> torch.Tensor:
    """D = g * f_up(H') with H = act(f_down(E~)) (eqs. 8-12)."""
    h = ACTIVATION[activation](F.linear(e, module.down.weight, module.down.bias))
    if cavpt and m:
        p, t = h[:, :m], h[:, m:]
        d_hidden = module.down.out_features
        p = torch.softmax(p @ t.transpose(1, 2) / math.sqrt(d_hidden), dim=-1) @ t  # eq. 10
        h = torch.cat([p, t], dim=1)  # eq. 11
    return module.gate * F.linear(h, module.up.weight, module.up.bias)


def dvpt_reference(cfg: ExperimentConfig, model: AdaptedClassifier, plain: nn.Module, images: torch.Tensor) -> torch.Tensor:
    ref = ReferenceViT(plain)
    c = cfg.model
    m, s = c.prompts, c.share_every
    x = ref.embed(images)
    if m:
        prompts = model.prompts + (model.prompt_pos if c.prompt_pos_embed else 0)
        x = torch.cat([prompts.expand(len(x), -1, -1), x], dim=1)  # [P, cls, patches]
    x = ref.norm("norm_pre", x)
    for l in range(len(plain.blocks)):
        e = ref.attention_residual(l, x)  # eq. 7
        d = dvpt_branch(model.dvpt_modules[l // s], e, m, c.cavpt, c.activation)
        x = ref.ffn(l, e) + e + d  # eq. 13: beside the FFN, both fed E~
    x = ref.norm("norm", x)
    if plain.cls_token is not None:
        pooled = x[:, : m + 1].mean(dim=1)  # mean over the m prompts and cls
    else:
        pooled = torch.cat([x[:, :m], x[:, m:].mean(dim=1, keepdim=True)], dim=1).mean(dim=1)
    pooled = ref.norm("fc_norm", pooled)
    if model.info.frozen_projection:
        pooled = F.linear(pooled, plain.head.weight, plain.head.bias)  # CLIP's frozen projection
    return logits(model, pooled)


DVPT_CASES = {
    "s=2 over 5 blocks": [*VIT, "model.share_every=2", "model.prompts=3"],
    "s=1, quick_gelu, one prompt": [*VIT, "model.activation=quick_gelu", "model.prompts=1"],
    "s=3, relu, no prompt position": [*VIT, "model.share_every=3", "model.activation=relu", "model.prompt_pos_embed=false"],
    "w/o CAVPT": [*VIT, "model.cavpt=false", "model.share_every=5"],
    "no prompts": [*VIT, "model.prompts=0"],
    "no cls token (avg pool)": [*VIT_AVG, "model.prompts=2"],
    "CLIP projection": [*CLIP, "model.prompts=2"],
}


@pytest.mark.parametrize("case", list(DVPT_CASES))
def test_dvpt_vit_matches_equations_7_to_13(case: str) -> None:
    cfg, model, plain, images = build("model.method=dvpt", *DVPT_CASES[case])
    assert all(module.gate.item() != 0 for module in model.dvpt_modules)
    with torch.no_grad():
        expected = dvpt_reference(cfg, model, plain, images)
    assert_matches(model, images, expected)


def test_dvpt_output_is_added_beside_the_ffn_not_before_it() -> None:
    """The bug class the issue names: D fed into the FFN (E = E~ + D + FFN(LN(E~ + D))) differs."""
    cfg, model, plain, images = build("model.method=dvpt", *VIT)
    ref = ReferenceViT(plain)
    with torch.no_grad():
        x = torch.cat([(model.prompts + model.prompt_pos).expand(2, -1, -1), ref.embed(images)], dim=1)
        for l in range(5):
            e = ref.attention_residual(l, x)
            e = e + dvpt_branch(model.dvpt_modules[l], e, cfg.model.prompts, True, cfg.model.activation)
            x = e + ref.ffn(l, e)
        wrong = logits(model, ref.norm("norm", x)[:, : cfg.model.prompts + 1].mean(dim=1))
        assert (model(images) - wrong).abs().max() > 1e-3


def test_dvpt_module_scales_attention_by_the_hidden_width() -> None:
    """eq. 10 divides by sqrt(d'), the bottleneck width, with the softmax over the tokens T."""
    torch.manual_seed(0)
    cfg, model, _, _ = build("model.method=dvpt", *VIT, "model.hidden_dim=9")
    module = model.dvpt_modules[0]
    tokens = torch.randn(2, 6, 192, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(tokens, 2), dvpt_branch(module, tokens, 2, True, "gelu"))


def test_dvpt_prompts_and_position_embedding_initialisation() -> None:
    """Released values: prompts N(0, 1), their position embedding N(0, d^-1/2), gates 0."""
    model = build_model(tiny_config("model.prompts=50"))
    assert model.prompts.shape == model.prompt_pos.shape == (1, 50, 192)
    assert float(model.prompts.std()) == pytest.approx(1.0, rel=0.05)
    assert float(model.prompt_pos.std()) == pytest.approx(192**-0.5, rel=0.05)
    assert all(float(module.gate) == 0.0 for module in model.dvpt_modules)
    set_std = build_model(tiny_config("model.prompts=50", "model.prompt_init_std=0.1", "model.prompt_pos_init_std=0.5",
                                      "model.gate_init=0.25"))
    assert float(set_std.prompts.std()) == pytest.approx(0.1, rel=0.05)
    assert float(set_std.prompt_pos.std()) == pytest.approx(0.5, rel=0.05)
    assert all(float(module.gate) == 0.25 for module in set_std.dvpt_modules)
    assert build_model(tiny_config("model.prompt_pos_embed=false")).prompt_pos is None
    without = build_model(tiny_config("model.prompts=0"))
    assert without.prompts is None and without.prompt_pos is None


def test_dvpt_refuses_blocks_and_pooling_it_cannot_wrap() -> None:
    with pytest.raises(TypeError, match="attention pooling"):
        build_model(tiny_config("model.backbone_kwargs={depth: 1, class_token: false, global_pool: map}"))


# --- DVPT on Swin (the released Swin-B structure) ---------------------------------------------


def swin_stages(plain: nn.Module, images: torch.Tensor, block: Callable[[int, int, nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """timm's Swin forward with ``block(stage, index, frozen_block, x)`` for each block; mean pool."""
    x = plain.patch_embed(images)
    for s, stage in enumerate(plain.layers):
        x = stage.downsample(x)
        for i, frozen in enumerate(stage.blocks):
            x = block(s, i, frozen, x)
    return plain.norm(x).mean(dim=(1, 2))


def test_dvpt_swin_matches_the_released_block() -> None:
    """A = W-MSA(LN(E)); P' = softmax(P A^T / sqrt(C)) A on the first m positions; E~ = E + A + [P'; 0];
    E = E~ + FFN(LN(E~)) + g f_up(act(f_down(E~))), one module per ``share_every`` blocks of a stage."""
    cfg, model, plain, images = build("model.method=dvpt", *SWIN, "model.swin.prompts=3", "model.swin.share_every=2")
    m, s = 3, 2
    starts = [0, 1, 2, 5]  # ceil(depth / 2) = 1, 1, 3, 1 modules for depths 2, 2, 6, 2

    def block(stage: int, i: int, frozen: nn.Module, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        attn = frozen._attn(frozen.norm1(x))
        prompts = model.stages[stage][i].prompts[0]
        tokens = attn.reshape(batch, height * width, channels)
        cross = torch.softmax(prompts @ tokens.transpose(1, 2) / math.sqrt(channels), dim=-1) @ tokens
        tokens = tokens.clone()
        tokens[:, :m] += cross
        e = x + tokens.reshape(batch, height, width, channels)
        module = model.dvpt_modules[starts[stage] + i // s]
        d = module.gate * F.linear(quick_gelu(F.linear(e, module.down.weight, module.down.bias)),
                                   module.up.weight, module.up.bias)
        return e + frozen.mlp(frozen.norm2(e)) + d

    with torch.no_grad():
        expected = logits(model, swin_stages(plain, images, block))
    assert len(model.dvpt_modules) == 6
    assert_matches(model, images, expected)


def test_dvpt_swin_prompts_are_drawn_from_a_truncated_normal() -> None:
    model = build_model(tiny_config("model.method=dvpt", *SWIN, "model.swin.prompts=4"))
    values = torch.cat([p.flatten() for p in model.prompts])
    assert float(values.std()) == pytest.approx(0.02, rel=0.1)
    assert float(values.abs().max()) <= 2.0
    # The truncation is at +-2 absolute (as the released code): visible once the std is 1.
    wide = build_model(tiny_config("model.method=dvpt", *SWIN, "model.swin.prompts=4", "model.swin.prompt_init_std=1"))
    wide_values = torch.cat([p.flatten() for p in wide.prompts])
    assert float(wide_values.abs().max()) <= 2.0 and float(wide_values.std()) > 0.8
    assert all(float(module.gate) == 0.0 for module in model.dvpt_modules)


def test_dvpt_swin_prompts_fill_exactly_the_smallest_stage() -> None:
    """At 64x64 the last stage has 2x2 = 4 tokens: 4 prompts fit (5 are refused: test_swin.py)."""
    assert len(build_model(tiny_config("model.method=dvpt", *SWIN, "model.swin.prompts=4")).prompts) == 12


def test_dvpt_swin_names_the_smallest_stage_too_small_for_its_prompts() -> None:
    """Depths 2, 2, 2, 1 at 64x64: stages of 16x16, 8x8, 4x4 and 2x2 tokens; 17 prompts overflow the
    last two, and the error names the smallest (the one-block last stage)."""
    from dvpt_core.config import ConfigError

    swin = [SWIN[0], "model.backbone_kwargs={embed_dim: 16, depths: [2, 2, 2, 1], num_heads: [1, 2, 2, 4]}", SWIN[2]]
    with pytest.raises(ConfigError, match=r"model.swin.prompts=17 exceeds the 4 tokens of a \(2, 2\) Swin stage "
                                          r"at model.image_size=64; use fewer prompts or larger images"):
        build_model(tiny_config("model.method=dvpt", *swin, "model.swin.prompts=17"))
    model = build_model(tiny_config("model.method=dvpt", *swin, "model.swin.prompts=4", "model.swin.share_every=2"))
    assert [m.down.in_features for m in model.dvpt_modules] == [16, 32, 64, 128]


# --- VPT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True])
@pytest.mark.parametrize("backbone", ["cls token", "avg pool", "CLIP"])
def test_vpt_vit_matches_prompts_after_cls(deep: bool, backbone: str) -> None:
    """[cls, P, patches] after the embedding (and pre-norm); deep VPT overwrites P before every
    block after the first with that block's own set; pooling ignores the prompt outputs; CLIP's
    frozen projection comes once, before the classifier."""
    arch = {"cls token": VIT, "avg pool": VIT_AVG, "CLIP": CLIP}[backbone]
    cfg, model, plain, images = build(f"model.method={'vpt_deep' if deep else 'vpt_shallow'}", *arch, "model.vpt.prompts=3")
    ref = ReferenceViT(plain)
    n, m = plain.num_prefix_tokens, 3
    tokens = model.prompts.tokens
    with torch.no_grad():
        x = ref.norm("norm_pre", ref.embed(images))
        x = torch.cat([x[:, :n], tokens[0].expand(2, -1, -1), x[:, n:]], dim=1)
        for l in range(len(plain.blocks)):
            if deep and l > 0:
                x = torch.cat([x[:, :n], tokens[l].expand(2, -1, -1), x[:, n + m :]], dim=1)
            x = ref.block(l, x)
        pooled = ref.pool(torch.cat([x[:, :n], x[:, n + m :]], dim=1))
        if backbone == "CLIP":
            pooled = F.linear(pooled, plain.head.weight, plain.head.bias)
        expected = logits(model, pooled)
    assert tokens.shape == (len(plain.blocks) if deep else 1, m, plain.embed_dim)
    assert_matches(model, images, expected)


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_vpt_prompts_are_uniform_within_the_xavier_bound(arch: str) -> None:
    """+-sqrt(6 / (3 p^2 + d)) with patch size p and embedding width d (Swin: its first stage's)."""
    if arch == "vit":
        tokens = build_model(tiny_config("model.method=vpt_deep", "model.vpt.prompts=50")).prompts.tokens
        bound = math.sqrt(6 / (3 * 16 * 16 + 192))
    else:
        model = build_model(tiny_config("model.method=vpt_deep", *SWIN, "model.vpt.prompts=50"))
        tokens = torch.cat([b.attn.prompts.tokens.flatten() for s in model.backbone.layers for b in s.blocks])
        bound = math.sqrt(6 / (3 * 4 * 4 + 16))
    assert -bound <= float(tokens.min()) < -0.99 * bound
    assert 0.99 * bound < float(tokens.max()) <= bound


def test_vpt_swin_window_prompts_without_a_shift_mask() -> None:
    """Block 0 of a stage is not shifted: every window sees the m prompt keys and values, zero bias.
    The backbone's attention dropout (0.5 here) stays off in evaluation."""
    swin = [*SWIN[:1], "model.backbone_kwargs={embed_dim: 16, num_heads: [1, 2, 2, 4], attn_drop_rate: 0.5}", SWIN[2]]
    cfg, model, _, _ = build("model.method=vpt_deep", *swin, "model.vpt.prompts=2")
    block = model.backbone.layers[1].blocks[0]  # 8x8 tokens of width 32, 2 heads
    wrapper = block.attn
    attn = wrapper.attn
    assert block.attn_mask is None
    x = torch.randn(3, 49, 32, dtype=torch.float64)
    with torch.no_grad():
        got = wrapper(x)
        prompts = layer_norm(wrapper.prompts.tokens[0], block.norm1)
        table, index = attn.relative_position_bias_table, attn.relative_position_index
        bias = table[index.view(-1)].view(49, 49, -1).permute(2, 0, 1)
        heads, m = attn.num_heads, 2
        for i in range(3):
            q, k, v = F.linear(torch.cat([prompts, x[i]]), attn.qkv.weight, attn.qkv.bias).reshape(m + 49, 3, heads, -1).permute(1, 2, 0, 3)
            scores = q[:, m:] @ k.transpose(1, 2) / math.sqrt(32 // heads)
            scores[:, :, m:] += bias
            out = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(49, -1)
            torch.testing.assert_close(got[i], F.linear(out, attn.proj.weight, attn.proj.bias), atol=ATOL, rtol=0)


def test_vpt_swin_window_prompts_with_the_shift_mask() -> None:
    """Block 1 of a stage is shifted: each window's image keys carry that window's shift mask
    (timm's -100 between regions that were not neighbours before the roll), the prompt keys none."""
    cfg, model, _, _ = build("model.method=vpt_deep", *SWIN, "model.vpt.prompts=2")
    block = model.backbone.layers[1].blocks[1]  # 8x8 tokens padded to two windows a side, shifted by 3
    wrapper, attn, mask = block.attn, block.attn.attn, block.attn_mask
    assert mask is not None and bool((mask != 0).any())
    num_win, heads, m = mask.shape[0], attn.num_heads, 2
    x = torch.randn(2 * num_win, 49, 32, dtype=torch.float64)
    with torch.no_grad():
        got = wrapper(x, mask=mask)
        prompts = layer_norm(wrapper.prompts.tokens[0], block.norm1)
        table, index = attn.relative_position_bias_table, attn.relative_position_index
        bias = table[index.view(-1)].view(49, 49, -1).permute(2, 0, 1)
        for i in range(2 * num_win):
            q, k, v = F.linear(torch.cat([prompts, x[i]]), attn.qkv.weight, attn.qkv.bias).reshape(m + 49, 3, heads, -1).permute(1, 2, 0, 3)
            scores = q[:, m:] @ k.transpose(1, 2) / math.sqrt(32 // heads)
            scores[:, :, m:] += bias + mask[i % num_win]
            out = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(49, -1)
            torch.testing.assert_close(got[i], F.linear(out, attn.proj.weight, attn.proj.bias), atol=ATOL, rtol=0)


# --- SSF, LoRA, AdaptFormer, linear probing ----------------------------------------------------


def test_ssf_scales_and_shifts_every_layer_output() -> None:
    """y = gamma * x + beta after every linear, norm and convolution (channel axis 1 for the conv)."""
    cfg, model, plain, images = build("model.method=ssf", "model.backbone_kwargs={depth: 3, qkv_bias: false}")

    def post(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ssf = model.backbone.get_submodule(name)
        shape = (-1, 1, 1) if name == "patch_embed.proj" else (-1,)
        return y * ssf.scale.view(shape) + ssf.shift.view(shape)

    with torch.no_grad():
        expected = logits(model, ReferenceViT(plain, post).forward(images))
    assert_matches(model, images, expected)


def test_ssf_merge_folds_gamma_and_beta_into_the_weights() -> None:
    """W' = diag(gamma) W and b' = gamma * b + beta; a layer without bias gets b' = beta."""
    cfg, model, plain, images = build("model.method=ssf", "model.backbone_kwargs={depth: 2, qkv_bias: false}")
    merged = model.merge()
    for name in ["blocks.0.attn.qkv", "blocks.1.mlp.fc1", "blocks.0.norm2", "norm", "patch_embed.proj"]:
        ssf, layer, base = model.backbone.get_submodule(name), merged.backbone.get_submodule(name), plain.get_submodule(name)
        gamma = ssf.scale.view(-1, *([1] * (base.weight.dim() - 1)))
        bias = base.bias if base.bias is not None else torch.zeros_like(ssf.shift)
        torch.testing.assert_close(layer.weight, base.weight * gamma, atol=0, rtol=0)
        torch.testing.assert_close(layer.bias, bias * ssf.scale + ssf.shift, atol=0, rtol=0)
        assert type(layer) is type(base) and not layer.weight.requires_grad and not layer.bias.requires_grad
    assert model.backbone.blocks[0].attn.qkv.base.bias is None
    with torch.no_grad():  # the merged classifier is rebuilt in float32: compare at its precision
        torch.testing.assert_close(merged.eval().double()(images), model(images), atol=1e-5, rtol=1e-5)


def test_ssf_initialisation_and_frozen_merged_layers() -> None:
    """gamma ~ N(1, 0.02) and beta ~ N(0, 0.02), as SSF's code; a merged layer is frozen."""
    model = build_model(tiny_config("model.method=ssf", *VIT))
    wrapped = [m for m in model.backbone.modules() if hasattr(m, "shift")]
    scale = torch.cat([m.scale.detach() for m in wrapped])
    shift = torch.cat([m.shift.detach() for m in wrapped])
    assert float(scale.mean()) == pytest.approx(1.0, abs=0.002) and float(scale.std()) == pytest.approx(0.02, rel=0.05)
    assert float(shift.mean()) == pytest.approx(0.0, abs=0.002) and float(shift.std()) == pytest.approx(0.02, rel=0.05)
    merged = wrapped[0].merged()
    assert not any(p.requires_grad for p in merged.parameters())


@pytest.mark.parametrize("targets", [["qkv"], ["qkv", "proj"]])
def test_lora_adds_scaled_low_rank_update(targets: list[str]) -> None:
    """W x + (alpha / r) B A x on the chosen attention layers, nowhere else."""
    cfg, model, plain, images = build("model.method=lora", *VIT, "model.lora.rank=4", "model.lora.alpha=16",
                                      f"model.lora.targets=[{', '.join(targets)}]")

    def post(name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name.rsplit(".", 1)[-1] not in targets or ".attn." not in name:
            return y
        lora = model.backbone.get_submodule(name)
        return y + (16 / 4) * (x @ lora.lora_a.T @ lora.lora_b.T)

    with torch.no_grad():
        expected = logits(model, ReferenceViT(plain, post).forward(images))
    assert_matches(model, images, expected)
    merged = model.merge()
    name = "blocks.2.attn.qkv"
    lora = model.backbone.get_submodule(name)
    torch.testing.assert_close(merged.backbone.get_submodule(name).weight,
                               plain.get_submodule(name).weight + 4 * lora.lora_b @ lora.lora_a, atol=1e-6, rtol=0)


def test_lora_initialisation_starts_from_the_frozen_model() -> None:
    """B = 0 and A as nn.Linear's Kaiming-uniform: |A| <= 1 / sqrt(fan_in)."""
    model = build_model(tiny_config("model.method=lora", *VIT, "model.lora.rank=4"))
    lora = model.backbone.blocks[0].attn.qkv
    assert lora.lora_a.shape == (4, 192) and lora.lora_b.shape == (576, 4)
    assert not lora.lora_b.any()
    # 768 draws: the largest lies within 3% of the bound (a = sqrt(6) would give a bound of 0.926)
    assert 0.97 / math.sqrt(192) < float(lora.lora_a.abs().max()) <= 1 / math.sqrt(192)


@pytest.mark.parametrize("layer_norm_in", [False, True])
def test_adaptformer_adds_a_scaled_bottleneck_beside_the_ffn(layer_norm_in: bool) -> None:
    """E = E~ + FFN(LN(E~)) + s * Up(ReLU(Down(LN?(E~)))) with s = 0.3 here."""
    cfg, model, plain, images = build("model.method=adaptformer", *VIT, "model.adaptformer.scale=0.3",
                                      "model.adaptformer.bottleneck=6", f"model.adaptformer.layer_norm={str(layer_norm_in).lower()}")
    ref = ReferenceViT(plain)
    with torch.no_grad():
        x = ref.embed(images)
        for l in range(5):
            e = ref.attention_residual(l, x)
            branch = model.backbone.blocks[l].adapter
            inner = layer_norm(e, branch.norm) if layer_norm_in else e
            down = F.relu(F.linear(inner, branch.down.weight, branch.down.bias))
            x = e + ref.ffn(l, e) + 0.3 * F.linear(down, branch.up.weight, branch.up.bias)
        expected = logits(model, ref.pool(x))
    assert_matches(model, images, expected)


def test_adaptformer_swin_feeds_the_attention_residual_to_the_branch() -> None:
    cfg, model, plain, images = build("model.method=adaptformer", *SWIN, "model.adaptformer.bottleneck=4")

    def block(stage: int, i: int, frozen: nn.Module, x: torch.Tensor) -> torch.Tensor:
        e = x + frozen._attn(frozen.norm1(x))
        branch = model.backbone.layers[stage].blocks[i].adapter
        down = F.relu(F.linear(e, branch.down.weight, branch.down.bias))
        return e + frozen.mlp(frozen.norm2(e)) + 0.1 * F.linear(down, branch.up.weight, branch.up.bias)

    with torch.no_grad():
        expected = logits(model, swin_stages(plain, images, block))
    assert_matches(model, images, expected)


def test_adaptformer_initialisation() -> None:
    """Up is zero (training starts from the frozen model), Down's bias zero, its weight not."""
    model = build_model(tiny_config("model.method=adaptformer", *VIT))
    branch = model.backbone.blocks[0].adapter
    assert branch.down.weight.shape == (64, 192) and branch.scale == 0.1 and branch.dropout.p == 0.1
    assert not branch.up.weight.any() and not branch.up.bias.any() and not branch.down.bias.any()
    assert branch.down.weight.abs().min() < branch.down.weight.abs().max()
    assert isinstance(branch.norm, nn.Identity)


# --- EVP (Liu et al., 2023; evp.py's docstring) -----------------------------------------------


def highpass(images: torch.Tensor, ratio: float) -> torch.Tensor:
    """|IFFT((1 - M) FFT(x))| with numpy: M the centred square of side 2 * (sqrt(ratio H W) // 2)."""
    height, width = images.shape[-2:]
    spectrum = np.fft.fftshift(np.fft.fft2(images.numpy(), norm="forward"), axes=(-2, -1))
    half = int(math.sqrt(height * width * ratio) // 2)
    spectrum[..., height // 2 - half : height // 2 + half, width // 2 - half : width // 2 + half] = 0
    return torch.from_numpy(np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)), norm="forward").real))


def evp_prompt(evp: nn.Module, stage: int, block: int, feature: torch.Tensor) -> torch.Tensor:
    """P_{k,i} = shared_k(GELU(lightweight_{k,i}(F_k)))."""
    light, shared = evp.lightweight[stage][block][0], evp.shared[stage]
    return F.linear(F.gelu(F.linear(feature, light.weight, light.bias)), shared.weight, shared.bias)


def evp_feature(evp: nn.Module, stage: int, handcrafted: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """F_k = H_k + Linear_{C_k -> c_k}(E_k), both channels last."""
    embedding = evp.embedding[stage]
    return handcrafted + F.linear(tokens, embedding.weight, embedding.bias)


@pytest.mark.parametrize("backbone", ["cls token", "CLIP"])
def test_evp_vit_adds_explicit_prompts_to_every_blocks_patch_tokens(backbone: str) -> None:
    """H = conv_{p x p / p}(F_hfc) (no padding, no norm), F = H + Linear(E) with E the frozen
    patch embedding, block l reads [cls, patches + P_l]; CLIP's frozen projection comes once,
    before the classifier."""
    arch = {"cls token": VIT, "CLIP": CLIP}[backbone]
    cfg, model, plain, images = build("model.method=evp", *arch, "model.evp.frequency_ratio=0.3")
    ref, evp = ReferenceViT(plain), model.evp
    conv, patch = evp.handcrafted[0].proj, plain.patch_embed.proj
    with torch.no_grad():
        handcrafted = F.conv2d(highpass(images, 0.3), conv.weight, conv.bias, stride=16).flatten(2).transpose(1, 2)
        tokens = F.conv2d(images, patch.weight, patch.bias, stride=16).flatten(2).transpose(1, 2)
        feature = evp_feature(evp, 0, handcrafted, tokens)
        x = ref.norm("norm_pre", ref.embed(images))
        for l in range(len(plain.blocks)):
            x = ref.block(l, torch.cat([x[:, :1], x[:, 1:] + evp_prompt(evp, 0, l, feature)], dim=1))
        pooled = ref.pool(x)
        if backbone == "CLIP":
            pooled = F.linear(pooled, plain.head.weight, plain.head.bias)
        expected = logits(model, pooled)
    assert evp.handcrafted[0].proj.out_channels == plain.embed_dim // 4 and len(evp.lightweight[0]) == len(plain.blocks)
    assert_matches(model, images, expected)


def test_evp_swin_builds_each_stages_prompts_from_the_previous_handcrafted_map() -> None:
    """H_1 = LN(conv_{7x7/4, pad 3}(F_hfc)), H_k = LN(conv_{3x3/2, pad 1}(H_{k-1})), channels
    C_k / r; each stage's F_k from its input tokens (after patch merging); block i of stage k reads
    E + P_{k,i}."""
    cfg, model, plain, images = build("model.method=evp", *SWIN, "model.evp.scale_factor=2")
    evp = model.evp
    with torch.no_grad():
        x, maps = highpass(images, 0.25), []
        for generator, (kernel, stride) in zip(evp.handcrafted, [(7, 4), (3, 2), (3, 2), (3, 2)]):
            conv = generator.proj
            x = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=kernel // 2)
            x = layer_norm(x.permute(0, 2, 3, 1), generator.norm).permute(0, 3, 1, 2)
            maps.append(x.permute(0, 2, 3, 1))
        features = {}

        def block(stage: int, i: int, frozen: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if i == 0:
                features[stage] = evp_feature(evp, stage, maps[stage], x)
            return frozen(x + evp_prompt(evp, stage, i, features[stage]))

        expected = logits(model, swin_stages(plain, images, block))
    assert [g.proj.out_channels for g in evp.handcrafted] == [8, 16, 32, 64]
    assert_matches(model, images, expected)


def test_evp_swin_refuses_an_image_size_its_maps_cannot_follow() -> None:
    """EVP's padded convolutions give ceil(n / 4), then ceil(n / 2) per stage; Swin's patch
    embedding floor(n / 4): at 72 both give 18, 9, 5, 3; at 66 the maps are 17, 9, 5, 3 and the
    stages 16, 8, 4, 2."""
    from dvpt_core.config import ConfigError

    build_model(tiny_config("model.method=evp", *SWIN[:2], "model.image_size=72"))
    # A one-block last stage: each stage's size is read from its first block.
    build_model(tiny_config("model.method=evp", SWIN[0], "model.image_size=64",
                            "model.backbone_kwargs={embed_dim: 16, depths: [2, 2, 2, 1], num_heads: [1, 2, 2, 4]}"))
    with pytest.raises(ConfigError, match=r"EVP's handcrafted maps \[\(17, 17\), \(9, 9\), \(5, 5\), \(3, 3\)\] do not "
                                          r"match Swin's stages \[\(16, 16\), \(8, 8\), \(4, 4\), \(2, 2\)\] at "
                                          r"model.image_size=66; use a multiple of 32"):
        build_model(tiny_config("model.method=evp", *SWIN[:2], "model.image_size=66"))


def test_evp_initialisation_and_scale_factor_limit() -> None:
    """EVP's code: linear layers truncated normal (std 0.02, cut at +-2), convolutions He-normal
    over fan-out (k^2 out_channels), every bias 0; a scale factor wider than a stage is refused."""
    from dvpt_core.config import ConfigError

    evp = build_model(tiny_config("model.method=evp", *VIT)).evp
    linear = torch.cat([m.weight.flatten() for m in evp.modules() if isinstance(m, nn.Linear)])
    assert float(linear.std()) == pytest.approx(0.02, rel=0.05) and float(linear.abs().max()) <= 2.0
    assert float(linear.mean()) == pytest.approx(0.0, abs=0.001)
    conv = evp.handcrafted[0].proj
    assert float(conv.weight.std()) == pytest.approx(math.sqrt(2.0 / (16 * 16 * 48)), rel=0.05)
    assert float(conv.weight.mean()) == pytest.approx(0.0, abs=0.001)
    assert all(float(m.bias.abs().max()) == 0.0 for m in evp.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    wide = build_model(tiny_config("model.method=evp", *VIT, "model.evp.scale_factor=2")).evp
    assert wide.embedding[0].out_features == 96
    assert build_model(tiny_config("model.method=evp", *VIT, "model.evp.scale_factor=192")).evp.embedding[0].out_features == 1
    with pytest.raises(ConfigError, match="model.evp.scale_factor=193 exceeds the narrowest stage width 192"):
        build_model(tiny_config("model.method=evp", *VIT, "model.evp.scale_factor=193"))


@pytest.mark.parametrize("method", ["linear", "full"])
def test_linear_probe_and_full_fine_tuning_read_the_backbones_own_feature(method: str) -> None:
    cfg, model, plain, images = build(f"model.method={method}", *VIT_AVG)
    if method == "full":  # the backbone itself moved: the reference reads its weights
        plain = model.backbone
    with torch.no_grad():
        expected = logits(model, ReferenceViT(plain).forward(images))
    assert_matches(model, images, expected)


def test_clip_keeps_its_frozen_projection_before_the_classifier() -> None:
    cfg, model, plain, images = build("model.method=linear", *CLIP)
    assert model.info.frozen_projection and model.classifier.in_features == 512
    assert not any(p.requires_grad for p in model.projection.parameters())
    with torch.no_grad():
        pooled = ReferenceViT(plain).forward(images)
        expected = logits(model, F.linear(pooled, plain.head.weight, plain.head.bias))
    assert_matches(model, images, expected)
    no_projection = build_model(tiny_config("model.method=linear", *CLIP, "model.frozen_projection=false"))
    assert no_projection.classifier.in_features == 64 and isinstance(no_projection.projection, nn.Identity)


def test_unsupported_backbones_and_blocks_are_refused_by_name() -> None:
    """Methods rewire timm's pre-norm Block and SwinTransformerBlock only; anything else is named."""
    from dvpt_core.config import ConfigError
    from dvpt_core.models.blocks import architecture, block_stages

    with pytest.raises(ConfigError, match="model.backbone builds a Linear; the methods support timm VisionTransformer"):
        architecture(nn.Linear(2, 2))
    cfg = tiny_config(*VIT)
    backbone, info = create_backbone(cfg.model)
    assert [len(stage) for stage in block_stages(backbone)] == [5]
    backbone.blocks[1] = nn.Identity()
    with pytest.raises(ConfigError, match=r"only timm's pre-norm Block, SwinTransformerBlock and Hugging Face SegformerLayer are supported, not \[.Identity.\]"):
        block_stages(backbone)
    from dvpt_core.peft import dvpt

    with pytest.raises(TypeError, match=r"DVPT wraps timm's pre-norm Block; this backbone has \['Identity'\] blocks"):
        dvpt.build(backbone, info, cfg.model, 5)
    swin, _ = create_backbone(tiny_config(*SWIN).model)
    assert [len(stage) for stage in block_stages(swin)] == [2, 2, 6, 2]
