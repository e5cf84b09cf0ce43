"""Every PEFT method on tiny ViT and Swin backbones: what trains, adapters, merging, and the
paper's Table 1 parameter counts on ViT-B/16 and Swin-B."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch

import dvpt_core.peft
from dvpt_core.config import ExperimentConfig, ModelConfig
from dvpt_core.models.backbone import BackboneInfo, create_backbone
from dvpt_core.models.adapted import AdapterLayer
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import load_adapter, save_adapter
from dvpt_core.peft.layers import MergeableLayer
from dvpt_core.peft.lora import LoRALinear
from dvpt_core.peft.ssf import SSF
from dvpt_core.summary import summarize
from tests.helpers import assert_trains_exactly, tiny_config

# A Swin-T layout (depths 2, 2, 6, 2) at width 16: builds in a fraction of a second. At 64x64 its
# stages see 16x16, 8x8, 4x4 and 2x2 tokens, so windows are padded, shifted and clipped.
SWIN = [
    "model.backbone=swin_tiny_patch4_window7_224",
    "model.backbone_kwargs={embed_dim: 16, num_heads: [1, 2, 2, 4]}",
    "model.image_size=64",
    "model.swin.prompts=4",
]
ARCHS = {"vit": [], "swin": SWIN}

# Which trainable tensors belong to each method (besides the classifier every method trains).
OWN: dict[str, Callable[[str], bool]] = {
    "linear": lambda name: False,
    "full": lambda name: True,
    "vpt_shallow": lambda name: name.startswith("prompts."),
    "vpt_deep": lambda name: name.startswith("prompts.") or name.endswith(".attn.prompts.tokens"),
    "ssf": lambda name: name.endswith((".scale", ".shift")),
    "adaptformer": lambda name: ".adapter." in name,
    "lora": lambda name: name.endswith((".lora_a", ".lora_b")),
    "dvpt": lambda name: name.split(".")[0] in {"dvpt_modules", "prompts", "prompt_pos"},
    "evp": lambda name: name.startswith("evp."),
}
CASES = [(arch, method) for arch in ARCHS for method in OWN if (arch, method) != ("swin", "vpt_shallow")]


def method_config(arch: str, method: str, *overrides: str) -> ExperimentConfig:
    return tiny_config(*ARCHS[arch], f"model.method={method}", "model.vpt.prompts=3", *overrides)


def images_for(cfg: ExperimentConfig, n: int = 4) -> torch.Tensor:
    size = cfg.model.image_size
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def train_steps(model: AdaptedClassifier, images: torch.Tensor, steps: int = 4) -> None:
    """Adam without weight decay: a tensor changes only if a gradient reached it. Zero-initialised
    tensors (up-projections, LoRA's B, DVPT's gate) pass gradient on from the second step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.arange(len(images)) % model.classifier.out_features
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()


def perturb_trainable(model: AdaptedClassifier) -> None:
    """Move every trainable tensor off its initialisation, zero-initialised ones included."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_training_changes_exactly_the_methods_own_tensors(arch: str, method: str) -> None:
    cfg = method_config(arch, method)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, images_for(cfg))
    assert_trains_exactly(model, before, OWN[method])


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_adapter_round_trip_gives_identical_logits(arch: str, method: str, tmp_path) -> None:
    cfg = method_config(arch, method)
    model = build_model(cfg).eval()
    perturb_trainable(model)
    loaded = load_adapter(save_adapter(model, cfg, tmp_path / "adapter"))
    assert type(loaded) is type(model) and loaded.method == method
    images = images_for(cfg, 2)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_adapter_layers_follow_the_classifier_mode_inside_a_frozen_backbone() -> None:
    model = build_model(method_config("vit", "adaptformer")).train()
    adapters = [m for m in model.backbone.modules() if isinstance(m, AdapterLayer)]
    assert len(adapters) == 12 and all(a.training and a.dropout.training for a in adapters)
    inside = {id(m) for a in adapters for m in a.modules()}
    assert not any(m.training for m in model.backbone.modules() if id(m) not in inside)
    assert not any(a.training for a in model.eval().backbone.modules() if isinstance(a, AdapterLayer))


def test_full_fine_tuning_trains_the_backbone_in_training_mode() -> None:
    model = build_model(method_config("swin", "full")).train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_ssf_merged_model_is_a_plain_backbone_with_the_same_logits(arch: str) -> None:
    cfg = method_config(arch, "ssf")
    model = build_model(cfg).eval()
    perturb_trainable(model)
    merged = model.merge().eval()
    plain, _ = create_backbone(cfg.model)
    assert [type(m) for m in merged.backbone.modules()] == [type(m) for m in plain.modules()]
    assert not any(isinstance(m, MergeableLayer) for m in merged.modules())
    images = images_for(cfg, 2)
    with torch.no_grad():
        torch.testing.assert_close(merged(images), model(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_merges_into_base_plus_scaled_b_times_a(arch: str) -> None:
    cfg = method_config(arch, "lora", "model.lora.targets=[qkv, proj]", "model.lora.alpha=16")
    model = build_model(cfg).eval()
    perturb_trainable(model)
    merged = model.merge().eval()
    wrapped = {n: m for n, m in model.backbone.named_modules() if isinstance(m, LoRALinear)}
    assert {n.rsplit(".", 1)[-1] for n in wrapped} == {"qkv", "proj"}
    for name, lora in wrapped.items():
        expected = lora.base.weight + (16 / 8) * lora.lora_b @ lora.lora_a
        torch.testing.assert_close(merged.backbone.get_submodule(name).weight, expected, atol=0, rtol=0)
    assert not any(isinstance(m, MergeableLayer) for m in merged.modules())
    images = images_for(cfg, 2)
    with torch.no_grad():
        torch.testing.assert_close(merged(images), model(images), atol=1e-5, rtol=0)


def test_ssf_wraps_every_linear_norm_and_convolution_but_the_head() -> None:
    model = build_model(method_config("vit", "ssf", "model.backbone=vit_base_patch16_clip_224.openai",
                                      "model.backbone_kwargs={depth: 1}"))
    wrapped = sorted(n for n, m in model.backbone.named_modules() if isinstance(m, SSF))
    assert wrapped == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2",
                       "blocks.0.norm1", "blocks.0.norm2", "norm", "norm_pre", "patch_embed.proj"]


@pytest.mark.parametrize("deep", [True, False])
def test_vpt_prompts_follow_cls_and_deep_replaces_them_before_every_block(deep: bool) -> None:
    cfg = method_config("vit", "vpt_deep" if deep else "vpt_shallow")
    model = build_model(cfg).eval()
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, 1:4])) for b in model.backbone.blocks]
    with torch.no_grad():
        model(images_for(cfg, 2))
    for hook in hooks:
        hook.remove()
    tokens = model.prompts.tokens
    assert tokens.shape == ((12 if deep else 1), 3, 192) and len(seen) == 12
    for i, entering in enumerate(seen):
        own = tokens[i if deep else 0].expand(2, -1, -1)
        assert torch.equal(entering, own) is (deep or i == 0), f"block {i}"


# Table 1 (#Params, M), ViT-B/16 = CLIP at the paper's 288 input, Swin-B in22k at 224, 5 classes.
# ``ours`` is our exact count, derived in each method's module docstring. Where the paper's figure
# is reproduced, ``ours - bias`` truncated to four decimals (as the paper prints) equals it: our
# classifier has 5 biases the authors' has not, and timm gives CLIP's projection 512 more.
VIT = ["model.backbone=vit_base_patch16_clip_224.openai", "model.image_size=288"]
SWIN_B = ["model.backbone=swin_base_patch4_window7_224.ms_in22k", "model.image_size=224"]
REPRODUCED = [
    ("vit linear", VIT, "linear", [], 2_565, 5, 0.0025),
    ("vit full", VIT, "full", [], 86_294_021, 517, 86.2935),
    ("vit vpt deep", VIT, "vpt_deep", [], 463_365, 5, 0.4633),
    ("vit adaptformer with LN", VIT, "adaptformer", ["model.adaptformer.layer_norm=true"], 1_210_629, 5, 1.2106),
    ("swin linear", SWIN_B, "linear", [], 5_125, 5, 0.0051),
    ("swin adaptformer with LN", SWIN_B, "adaptformer", ["model.adaptformer.layer_norm=true"], 1_582_853, 5, 1.5828),
    ("swin dvpt s=3 (paper row s=1)", SWIN_B, "dvpt", [], 219_624, 5, 0.2196),
    ("vit evp", VIT, "evp", [], 890_757, 5, 0.8907),
    ("swin evp", SWIN_B, "evp", [], 1_536_293, 5, 1.5362),
]
# Not reproduced; the module docstrings say why (paper figure in the comment).
DIFFERENT = [
    ("vit vpt shallow", VIT, "vpt_shallow", [], 40_965),  # no paper figure
    ("vit ssf", VIT, "ssf", [], 209_925),  # 0.3824
    ("vit adaptformer", VIT, "adaptformer", [], 1_192_197),  # 1.2106: no LN in AdaptFormer's default
    ("vit lora", VIT, "lora", [], 297_477),  # no paper figure
    ("swin full", SWIN_B, "full", [], 86_748_349),  # 86.7934, within 0.06%
    ("swin vpt deep", SWIN_B, "vpt_deep", [], 606_725),  # 0.3254
    ("swin ssf", SWIN_B, "ssf", [], 283_141),  # 0.3790
    ("swin adaptformer", SWIN_B, "adaptformer", [], 1_558_789),  # 1.5828: no LN in AdaptFormer's default
    ("swin lora", SWIN_B, "lora", [], 390_149),  # no paper figure
    ("swin dvpt s=2", SWIN_B, "dvpt", ["model.swin.share_every=2"], 251_913),  # 0.1327
    ("swin dvpt s=1", SWIN_B, "dvpt", ["model.swin.share_every=1"], 378_381),  # 0.2196 on the s=1 row
]


@pytest.fixture(scope="module")
def shared_backbone() -> Callable[[ModelConfig], tuple[torch.nn.Module, BackboneInfo]]:
    """create_backbone once per backbone (ViT-B and Swin-B take seconds), a fresh copy per model."""
    built: dict[tuple[str, int], tuple[torch.nn.Module, BackboneInfo]] = {}

    def create(cfg: ModelConfig) -> tuple[torch.nn.Module, BackboneInfo]:
        key = (cfg.backbone, cfg.image_size)
        if key not in built:
            built[key] = create_backbone(cfg)
        backbone, info = built[key]
        return copy.deepcopy(backbone), info

    return create


def big_summary(base: list[str], method: str, extra: list[str], shared_backbone, monkeypatch) -> dict:
    monkeypatch.setattr(dvpt_core.peft, "create_backbone", shared_backbone)
    cfg = tiny_config(*base, f"model.method={method}", *extra)
    assert cfg.data.num_classes == 5
    return summarize(cfg)


@pytest.mark.parametrize(("row", "base", "method", "extra", "ours", "bias", "paper"), REPRODUCED, ids=[r[0] for r in REPRODUCED])
def test_table1_counts_reproduced(row, base, method, extra, ours, bias, paper, shared_backbone, monkeypatch) -> None:
    summary = big_summary(base, method, extra, shared_backbone, monkeypatch)
    assert summary["trainable"] == ours
    assert math.floor((ours - bias) / 100) == round(paper * 10_000)


@pytest.mark.parametrize(("row", "base", "method", "extra", "ours"), DIFFERENT, ids=[r[0] for r in DIFFERENT])
def test_table1_counts_that_differ_are_the_derived_ones(row, base, method, extra, ours, shared_backbone, monkeypatch) -> None:
    assert big_summary(base, method, extra, shared_backbone, monkeypatch)["trainable"] == ours
