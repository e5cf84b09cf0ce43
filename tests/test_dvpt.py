"""DVPT's equations, freezing, sharing, parameter counts and adapter files."""

from __future__ import annotations

import json

import pytest
import torch

from dvpt_core.models.backbone import create_backbone, fingerprint
from dvpt_core.peft import build_model, count_parameters
from dvpt_core.peft.adapter import AdapterError, apply_adapter, load_adapter, save_adapter
from dvpt_core.peft.dvpt import DVPTModule
from dvpt_core.summary import summarize
from tests.helpers import offline_hub_snapshot, run_offline, tiny_config


def test_zero_gate_and_no_prompts_reproduce_the_frozen_backbone() -> None:
    cfg = tiny_config("model.prompts=0", "model.gate_init=0")
    model = build_model(cfg).eval()
    images = torch.randn(3, 3, 32, 32)
    backbone = model.backbone
    with torch.no_grad():
        reference = model.classifier(backbone.forward_head(backbone.forward_features(images)))
        torch.testing.assert_close(model(images), reference, atol=1e-5, rtol=0)


def test_cross_attention_matches_equation_10() -> None:
    torch.manual_seed(0)
    module = DVPTModule(dim=12, hidden_dim=4, activation="gelu", gate_init=1.0, cavpt=True)
    tokens = torch.randn(2, 7, 12)
    m = 3
    hidden = torch.nn.functional.gelu(module.down(tokens))
    p, t = hidden[:, :m], hidden[:, m:]
    p_new = torch.softmax(p @ t.transpose(1, 2) / 4**0.5, dim=-1) @ t
    expected = module.up(torch.cat([p_new, t], dim=1))
    torch.testing.assert_close(module(tokens, m), expected)
    module.cavpt = False
    torch.testing.assert_close(module(tokens, m), module.up(hidden))


def test_training_changes_only_trainable_tensors() -> None:
    cfg = tiny_config("model.share_every=2")
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trainable} == {"classifier", "dvpt_modules", "prompts", "prompt_pos"}
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def test_blocks_sharing_a_module_hold_the_same_object() -> None:
    model = build_model(tiny_config("model.share_every=5"))  # 12 blocks -> 3 modules
    assert len(model.dvpt_modules) == 3
    ids = [id(block.dvpt) for block in model.blocks]
    assert ids == [id(model.dvpt_modules[i // 5]) for i in range(12)]
    assert model.blocks[0].dvpt is model.blocks[4].dvpt is not model.blocks[5].dvpt


# The paper prints s=3 only as "205,3xx": the range it allows is 205,300-205,399.
@pytest.mark.parametrize(
    ("share_every", "low", "high"), [(1, 457_446, 457_446), (2, 268_414, 268_414), (3, 205_300, 205_399)]
)
def test_counts_match_the_paper_for_clip_vit_b16(share_every: int, low: int, high: int) -> None:
    cfg = tiny_config(
        "model.backbone=vit_base_patch16_clip_224.openai", "model.image_size=224",
        "model.prompts=50", "model.hidden_dim=20", f"model.share_every={share_every}",
    )
    cfg.data.class_names = list("abcde")
    summary = summarize(cfg)
    assert low - 30 <= summary["trainable"] <= high + 30
    assert summary["trainable_by_part"]["classifier"] == 512 * 5 + 5
    assert summary["trainable_by_part"]["prompts"] == summary["trainable_by_part"]["prompt_pos"] == 50 * 768
    assert summary["adapter_bytes"] < 0.006 * summary["total"] * 4


def test_adapter_round_trip_gives_identical_logits(tmp_path) -> None:
    cfg = tiny_config("model.gate_init=0.3")
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = save_adapter(model, cfg, tmp_path / "adapter")
    meta = json.loads((adapter / "adapter.json").read_text())
    assert meta["backbone_fingerprint"] == model.info.fingerprint and meta["random_weights"] is True
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter.json", "adapter.safetensors"]
    loaded = load_adapter(adapter)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_adapter_refuses_a_different_backbone(tmp_path) -> None:
    cfg = tiny_config()
    adapter = save_adapter(build_model(cfg), cfg, tmp_path / "adapter")
    other = build_model(tiny_config("model.init_seed=1"))
    with pytest.raises(AdapterError, match="refusing to load"):
        apply_adapter(other, adapter)


def test_local_weights_file_loads_those_weights(tmp_path) -> None:
    from safetensors.torch import save_file

    source, _ = create_backbone(tiny_config("model.init_seed=7").model)
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded, info = create_backbone(
        tiny_config("model.weights=pretrained", f"model.weights_file={path}").model
    )
    assert not info.random_weights
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.slow
def test_offline_hugging_face_cache_loads_without_network(tmp_path) -> None:
    """timm's hub loading reads a populated cache with HF_HUB_OFFLINE=1."""
    from safetensors.torch import save_file

    source, _ = create_backbone(tiny_config("model.init_seed=3", "model.image_size=224").model)
    snapshot = offline_hub_snapshot(tmp_path / "hub", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    code = (
        "from dvpt_core.models.backbone import create_backbone, fingerprint;"
        "from tests.helpers import tiny_config;"
        "m, info = create_backbone(tiny_config('model.weights=pretrained', 'model.image_size=224').model);"
        "print(info.fingerprint)"
    )
    out = run_offline(code, tmp_path / "hub")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == fingerprint(source)


@pytest.mark.slow
def test_missing_pretrained_weights_name_the_fix(tmp_path) -> None:
    code = (
        "from dvpt_core.models.backbone import create_backbone, fingerprint;"
        "from tests.helpers import tiny_config;"
        "create_backbone(tiny_config('model.weights=pretrained').model)"
    )
    out = run_offline(code, tmp_path / "empty")
    assert out.returncode != 0
    assert "model.weights_file=PATH" in out.stderr and "vit_tiny_patch16_224" in out.stderr


def test_any_input_size_resamples_position_embedding() -> None:
    model = build_model(tiny_config("model.image_size=48"))
    assert model.backbone.pos_embed.shape[1] == 1 + 9
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
    assert count_parameters(model)["trainable"] > 0
