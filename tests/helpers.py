"""Small configurations shared by the tests (a tiny randomly initialised ViT and SegFormer that run
in seconds) and checks more than one test file makes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

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
    # The legacy exporter: ten times faster; tests/test_export.py and test_segformer.py cover dynamo.
    "export.exporter=torchscript",
]


def tiny_config(*overrides: str) -> ExperimentConfig:
    return load_config(None, [*TINY, *overrides])


def params_tree(items: list[str]) -> dict:
    """``KEY=VALUE`` overrides as the nested mapping a params.yaml holds (values read as YAML)."""
    params: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = params
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    return params

# A tiny randomly initialised SegFormer (MiT-B0's layout at widths 8-32, depths 1, 2, 3, 1) for
# 2-class segmentation at 64x64: its stages see 16x16, 8x8, 4x4 and 2x2 tokens. Builds in well
# under a second.
TINY_SEGFORMER = [
    "model.backbone=nvidia/segformer-b0-finetuned-ade-512-512",
    "model.backbone_kwargs={hidden_sizes: [8, 16, 24, 32], depths: [1, 2, 3, 1], "
    "num_attention_heads: [1, 1, 2, 2], decoder_hidden_size: 16}",
    "model.image_size=64",
    "model.segformer.prompts=3",
    "data.format=kvasir",
]


def tiny_segformer_config(*overrides: str) -> ExperimentConfig:
    return tiny_config(*TINY_SEGFORMER, *overrides)


def assert_trains_exactly(model: torch.nn.Module, before: dict[str, torch.Tensor], own: Callable[[str], bool],
                          gradient_free: Callable[[str], bool] = lambda name: False) -> None:
    """After training from the parameters ``before``: what trains is the method's ``own`` tensors
    plus the classifier, every one of them changed, and no frozen tensor did.

    ``gradient_free``: trainable tensors whose gradient is zero in exact arithmetic (a shift added
    to every attention key leaves each softmax unchanged); they may move by rounding alone, so
    whether they change is not asserted."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if own(n) or n.startswith("classifier.")}
    for name, param in model.named_parameters():
        if name in trainable:
            assert gradient_free(name) or not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


def offline_hub_snapshot(hub: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in a Hugging Face cache at ``hub``, with ``main``
    pointing at it: fill it, and ``run_offline`` reads it as if downloaded."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    return snapshot


def run_offline(code: str, hub: Path) -> subprocess.CompletedProcess:
    """``python -c code`` with HF_HUB_OFFLINE=1 over the cache ``hub``: a fresh process, since
    huggingface_hub reads that variable at import."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])

def validated(cfg: ExperimentConfig, root: Path, out: Path) -> Path:
    """The validate step's report on ``root`` in ``out``: what the preprocess step reads from."""
    from dvpt_core.steps.validate import validate

    validate(cfg, root, out)
    return Path(out)


def prepared_dataset(cfg: ExperimentConfig, root: Path) -> dict[str, Path]:
    """The built-in dataset ``cfg`` describes, generated, validated and preprocessed under
    ``root``: the folders the train step reads (``data``, ``validation``, ``cache``)."""
    from dvpt_core.data.synthetic import generate_dataset
    from dvpt_core.steps.preprocess import preprocess

    generate_dataset(root / "data", cfg)
    validated(cfg, root / "data", root / "validation")
    preprocess(cfg, root / "data", root / "cache", root / "validation")
    return {"data": root / "data", "cache": root / "cache", "validation": root / "validation"}
