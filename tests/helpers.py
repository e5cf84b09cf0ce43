"""Small configurations shared by the tests: a tiny randomly initialised ViT that runs in seconds."""

from __future__ import annotations

from dvpt_core.config import ExperimentConfig, load_config

TINY = [
    "model.backbone=vit_tiny_patch16_224",
    "model.weights=random",
    "model.image_size=32",
    "model.prompts=4",
    "model.hidden_dim=8",
    "train.epochs=1",
    "train.batch_size=8",
    "train.warmup_epochs=0",
    "train.lr=0.001",
    "synthetic.train=16",
    "synthetic.valid=8",
    "synthetic.test=8",
    "synthetic.image_size=48",
]


def tiny_config(*overrides: str) -> ExperimentConfig:
    return load_config(None, [*TINY, *overrides])

# A tiny randomly initialised SegFormer (MiT-B0's layout at widths 8-32, depths 1, 2, 3, 1) for
# 2-class segmentation at 64x64: its stages see 16x16, 8x8, 4x4 and 2x2 tokens. Builds in well
# under a second.
TINY_SEGFORMER = [
    "model.backbone=nvidia/segformer-b0-finetuned-ade-512-512",
    "model.backbone_kwargs={hidden_sizes: [8, 16, 24, 32], depths: [1, 2, 3, 1], "
    "num_attention_heads: [1, 1, 2, 2], decoder_hidden_size: 16}",
    "model.image_size=64",
    "model.segformer.prompts=3",
    "data.class_names=[background, polyp]",
]


def tiny_segformer_config(*overrides: str) -> ExperimentConfig:
    return tiny_config(*TINY_SEGFORMER, *overrides)
