"""Trainable parameter counts against the papers' formulas, on tiny backbones (fast).

The formulas are the ones DESIGN.md section 2 and each method's docstring derive (DVPT: one
module has 2 d d' + d + d' weights plus its gate; prompts and their position embedding 2 m d; the
head c K + K). The paper's own ViT-B/16 and Swin-B totals are checked in test_dvpt.py and
test_methods.py on the full-size backbones.
"""

from __future__ import annotations

import math

import pytest

from dvpt_core.peft import build_model, count_parameters
from tests.helpers import tiny_config

D, L, K = 192, 12, 5  # vit_tiny: width, depth; DDR's 5 grades
HEAD = D * K + K
SWIN = ["model.backbone=swin_tiny_patch4_window7_224", "model.backbone_kwargs={embed_dim: 16, num_heads: [1, 2, 2, 4]}",
        "model.image_size=64"]
SWIN_WIDTHS, SWIN_DEPTHS = (16, 32, 64, 128), (2, 2, 6, 2)
SWIN_BLOCK_WIDTHS = sum(w * n for w, n in zip(SWIN_WIDTHS, SWIN_DEPTHS))  # 512
SWIN_HEAD = 128 * K + K


def trainable(*overrides: str) -> int:
    return count_parameters(build_model(tiny_config(*overrides)))["trainable"]


def dvpt_module(d: int, hidden: int) -> int:
    """f_down and f_up with biases (2 d d' + d + d') and the scalar gate g."""
    return 2 * d * hidden + d + hidden + 1


def test_the_formula_gives_designs_figures_for_clip_vit_b16() -> None:
    """DESIGN.md: one module 31,508 (+1 gate); 2 m d = 76,800; the head on CLIP's 512 features 2,565;
    457,473 at s=1."""
    assert dvpt_module(768, 20) - 1 == 31_508
    assert 2 * 50 * 768 == 76_800 and 512 * 5 + 5 == 2_565
    assert 12 * dvpt_module(768, 20) + 76_800 + 2_565 == 457_473


@pytest.mark.parametrize(("share_every", "prompts", "hidden", "pos"), [
    (1, 4, 8, True), (2, 4, 8, True), (5, 3, 6, True), (12, 1, 2, True), (13, 2, 4, True), (1, 4, 8, False), (3, 0, 8, True),
])
def test_dvpt_vit_counts(share_every: int, prompts: int, hidden: int, pos: bool) -> None:
    expected = math.ceil(L / share_every) * dvpt_module(D, hidden) + prompts * D * (2 if pos else 1) + HEAD
    overrides = [f"model.share_every={share_every}", f"model.prompts={prompts}", f"model.hidden_dim={hidden}",
                 f"model.prompt_pos_embed={str(pos).lower()}"]
    assert trainable(*overrides) == expected


@pytest.mark.parametrize(("share_every", "prompts"), [(3, 4), (2, 4), (1, 0), (6, 2)])
def test_dvpt_swin_counts(share_every: int, prompts: int) -> None:
    modules = sum(math.ceil(n / share_every) * dvpt_module(w, 10) for w, n in zip(SWIN_WIDTHS, SWIN_DEPTHS))
    expected = prompts * SWIN_BLOCK_WIDTHS + modules + SWIN_HEAD
    assert trainable("model.method=dvpt", *SWIN, f"model.swin.share_every={share_every}", f"model.swin.prompts={prompts}") == expected


@pytest.mark.parametrize(("method", "arch", "expected"), [
    ("vpt_deep", "vit", L * 3 * D + HEAD),
    ("vpt_shallow", "vit", 3 * D + HEAD),
    ("vpt_deep", "swin", 3 * SWIN_BLOCK_WIDTHS + SWIN_HEAD),
    # 22 d per block (qkv 3d, proj d, fc1 4d, fc2 d, two norms d each, scale and shift), the patch
    # embedding and the final norm
    ("ssf", "vit", L * 22 * D + 2 * D + 2 * D + HEAD),
    # Swin: blocks, patch embedding conv and its norm, final norm, each merge's 4C norm and 2C reduction
    ("ssf", "swin", 22 * SWIN_BLOCK_WIDTHS + 2 * (16 + 16 + 128) + 12 * (16 + 32 + 64) + SWIN_HEAD),
    ("adaptformer", "vit", L * (2 * 64 * D + 64 + D) + HEAD),
    ("adaptformer", "swin", sum(n * (2 * 64 * w + 64 + w) for w, n in zip(SWIN_WIDTHS, SWIN_DEPTHS)) + SWIN_HEAD),
    ("lora", "vit", L * 8 * (D + 3 * D) + HEAD),
    ("lora", "swin", 8 * 4 * SWIN_BLOCK_WIDTHS + SWIN_HEAD),
    ("linear", "vit", HEAD),
    ("linear", "swin", SWIN_HEAD),
])
def test_baseline_counts(method: str, arch: str, expected: int) -> None:
    arch_overrides = SWIN if arch == "swin" else []
    assert trainable(f"model.method={method}", *arch_overrides, "model.vpt.prompts=3") == expected


def test_options_that_change_the_counts() -> None:
    assert trainable("model.method=adaptformer", "model.adaptformer.layer_norm=true", "model.adaptformer.bottleneck=7") == \
        L * (2 * 7 * D + 7 + D + 2 * D) + HEAD
    assert trainable("model.method=lora", "model.lora.rank=2", "model.lora.targets=[qkv, proj]") == \
        L * 2 * (D + 3 * D + D + D) + HEAD


def test_full_fine_tuning_trains_everything() -> None:
    counts = count_parameters(build_model(tiny_config("model.method=full")))
    assert counts["trainable"] == counts["total"] > 5_000_000
    linear = count_parameters(build_model(tiny_config("model.method=linear")))
    assert linear["total"] == counts["total"] and linear["trainable"] == HEAD
