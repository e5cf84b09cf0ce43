"""Small configurations shared by the tests: a tiny randomly initialised ViT that runs in seconds."""

from __future__ import annotations

from pathlib import Path

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


def validated(cfg: ExperimentConfig, root: Path, out: Path) -> Path:
    """The validate step's report on ``root`` in ``out``: what the preprocess step reads from."""
    from dvpt_core.steps.validate import validate

    validate(cfg, root, out)
    return Path(out)
