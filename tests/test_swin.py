"""DVPT and VPT on Swin: the released block structure, sharing, and the window-attention prompts.

Training, adapters and merging of every method on Swin are in test_methods.py (parametrised over
both architectures); this file checks what only Swin has.
"""

from __future__ import annotations

import pytest
import torch

from dvpt_core.config import ConfigError
from dvpt_core.peft import build_model
from dvpt_core.peft.dvpt_swin import DVPTSwinBlock
from dvpt_core.peft.vpt import PromptedWindowAttention
from tests.test_methods import images_for, method_config


def test_modules_are_shared_by_three_blocks_within_a_stage() -> None:
    model = build_model(method_config("swin", "dvpt"))  # depths 2, 2, 6, 2
    assert [len(stage) for stage in model.stages] == [2, 2, 6, 2]
    assert len(model.dvpt_modules) == 1 + 1 + 2 + 1
    third = model.stages[2]
    assert third[0].dvpt is third[1].dvpt is third[2].dvpt is not third[3].dvpt
    assert third[3].dvpt is third[4].dvpt is third[5].dvpt
    firsts = [stage[0].dvpt for stage in model.stages]
    assert len({id(m) for m in firsts}) == 4  # never shared across stages (widths differ)
    assert [m.down.in_features for m in model.dvpt_modules] == [16, 32, 64, 64, 128]
    assert [tuple(p.shape) for p in model.prompts] == [(1, 4, w) for w in [16] * 2 + [32] * 2 + [64] * 6 + [128] * 2]


def test_zero_gate_without_prompts_reproduces_the_frozen_backbone() -> None:
    cfg = method_config("swin", "dvpt", "model.swin.prompts=0", "model.gate_init=0")
    model = build_model(cfg).eval()
    assert len(model.prompts) == 0
    backbone, images = model.backbone, images_for(cfg, 3)
    with torch.no_grad():
        frozen = model.classifier(backbone.forward_head(backbone.forward_features(images), pre_logits=True))
        torch.testing.assert_close(model(images), frozen, atol=1e-5, rtol=0)


def test_prompt_cross_attention_lands_on_the_first_m_positions() -> None:
    model = build_model(method_config("swin", "dvpt", "model.gate_init=0"))
    block: DVPTSwinBlock = model.stages[1][1]  # shifted windows, 8x8 tokens of width 32
    attn = torch.randn(2, 8, 8, 32)
    tokens = attn.reshape(2, 64, 32)
    expected = torch.softmax(block.prompts @ tokens.transpose(1, 2) / 32**0.5, dim=-1) @ tokens
    added = block.cross_attention(attn).reshape(2, 64, 32)
    torch.testing.assert_close(added[:, :4], expected)
    assert torch.equal(added[:, 4:], torch.zeros(2, 60, 32))


def test_too_many_prompts_for_the_last_stage_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"model.swin.prompts=5 exceeds the 4 tokens"):
        build_model(method_config("swin", "dvpt", "model.swin.prompts=5"))


def test_vpt_shallow_is_refused_on_swin_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="vpt_shallow is not available for swin backbones: .*use model.method=vpt_deep"):
        build_model(method_config("swin", "vpt_shallow"))


def test_window_prompts_are_extra_keys_and_values_in_every_window() -> None:
    """Against a window-by-window reference on a shifted, padded block (shift mask present)."""
    model = build_model(method_config("swin", "vpt_deep")).eval()
    block = model.backbone.layers[0].blocks[1]
    wrapper: PromptedWindowAttention = block.attn
    attn, mask = wrapper.attn, block.attn_mask  # 9 windows of 7x7 over the padded 21x21 grid
    assert mask is not None and mask.shape == (9, 49, 49)
    x = torch.randn(2 * 9, 49, 16)
    with torch.no_grad():
        got = wrapper(x, mask)
        prompts = block.norm1(wrapper.prompts.tokens[0])
        bias = attn._get_rel_pos_bias()[0]
        heads, m = attn.num_heads, prompts.shape[0]
        for i in range(len(x)):
            q, k, v = attn.qkv(torch.cat([prompts, x[i]])).reshape(m + 49, 3, heads, -1).permute(1, 2, 0, 3)
            scores = q[:, m:] @ k.transpose(1, 2) * attn.scale
            scores[:, :, m:] += bias + mask[i % 9]
            out = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(49, -1)
            torch.testing.assert_close(got[i], attn.proj(out), atol=1e-5, rtol=0)
