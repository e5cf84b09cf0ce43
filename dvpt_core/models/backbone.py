"""Frozen backbones: weights, input size, normalisation and a fingerprint.

timm builds the classification backbones (ViT, Swin); Hugging Face ``transformers`` builds
SegFormer (``dvpt_core.models.segformer``); ``model.family`` picks the library. An adapter is only
meaningful over the exact frozen weights it was trained on, so every backbone carries a
fingerprint of its weights that adapters record and check on load, whatever built it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from torch import nn

from dvpt_core.config import ConfigError, ModelConfig
from dvpt_core.models import segformer

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: backbone {name} is randomly initialised (model.weights=random, seed {seed}); "
    "results say nothing about a pretrained model"
)
STAND_IN_WARNING = (
    "STAND-IN WEIGHTS: backbone {name} was pre-trained here on a synthetic source task ({file}), "
    "not a foundation model; results show the method works, not how it does on real weights"
)
# The safetensors metadata key the pretrain step writes: a weights file carrying it is a stand-in,
# whichever ``model.weights`` setting loads it.
STAND_IN_METADATA_KEY = "dvpt_stand_in"


class BackboneError(RuntimeError):
    """A backbone that cannot be built or loaded as configured."""


@dataclass(frozen=True)
class BackboneInfo:
    """What an adapter must record about the frozen backbone it was trained on."""

    name: str
    random_weights: bool
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    fingerprint: str
    frozen_projection: bool
    stand_in: bool = False

    @property
    def weights_label(self) -> str:
        """What every output shows beside its results: "" for real pretrained weights."""
        return "RANDOM WEIGHTS" if self.random_weights else "STAND-IN WEIGHTS" if self.stand_in else ""


def wants_frozen_projection(cfg: ModelConfig) -> bool:
    """CLIP image towers end in a contrastive projection (768 -> 512) that the paper keeps frozen."""
    if cfg.frozen_projection is not None:
        return cfg.frozen_projection
    return "clip" in cfg.backbone.lower()


def create_backbone(cfg: ModelConfig) -> tuple[nn.Module, BackboneInfo]:
    """Build the frozen backbone the config names, with its weights, at ``cfg.image_size``."""
    if cfg.weights == "random":
        log.warning(RANDOM_WEIGHTS_WARNING.format(name=cfg.backbone, seed=cfg.init_seed))
    if cfg.weights != "random" and cfg.weights_file is not None:
        _check_weights_file(cfg)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            if cfg.resolved_family == "segformer":
                model, mean, std, projection = _segformer(cfg)
            else:
                model, mean, std, projection = _timm(cfg)
    except ConfigError:
        raise
    except (RuntimeError, OSError, ValueError) as err:
        raise BackboneError(_load_failure(cfg, err)) from err
    if projection and not isinstance(getattr(model, "head", None), nn.Linear):
        raise BackboneError(
            f"model.frozen_projection is on but backbone {cfg.backbone} has no linear head to keep"
        )
    model.eval()
    model.requires_grad_(False)
    stand_in = cfg.weights != "random" and is_stand_in(cfg.weights_file)
    if stand_in:
        log.warning(STAND_IN_WARNING.format(name=cfg.backbone, file=cfg.weights_file))
    info = BackboneInfo(
        name=cfg.backbone,
        random_weights=cfg.weights == "random",
        image_size=cfg.image_size,
        mean=mean if cfg.normalise else (0.0, 0.0, 0.0),
        std=std if cfg.normalise else (1.0, 1.0, 1.0),
        fingerprint=fingerprint(model),
        frozen_projection=projection,
        stand_in=stand_in,
    )
    return model, info


def is_stand_in(weights_file: Path | None) -> bool:
    """Whether ``weights_file`` is the pretrain step's stand-in (its safetensors metadata says so)."""
    if weights_file is None or Path(weights_file).suffix != ".safetensors":
        return False
    with safe_open(str(weights_file), framework="pt") as handle:
        return STAND_IN_METADATA_KEY in (handle.metadata() or {})


def weights_warning(info: BackboneInfo, init_seed: int = 0, weights_file: Path | None = None) -> str | None:
    """The loud line for random or stand-in weights (None for real pretrained weights)."""
    if info.random_weights:
        return RANDOM_WEIGHTS_WARNING.format(name=info.name, seed=init_seed)
    if info.stand_in:
        return STAND_IN_WARNING.format(name=info.name, file=weights_file or "its weights file")
    return None


def _check_weights_file(cfg: ModelConfig) -> None:
    if not Path(cfg.weights_file).is_file():
        hint = " (run the pretrain step first: dvpt pretrain)" if cfg.weights == "stand-in" else ""
        raise BackboneError(f"model.weights_file {cfg.weights_file} does not exist{hint}")
    if cfg.weights == "stand-in" and not is_stand_in(cfg.weights_file):
        raise BackboneError(f"model.weights=stand-in but {cfg.weights_file} was not written by the pretrain step "
                            "(no stand-in marker in its metadata); use model.weights=pretrained for real weights")


Normalisation = tuple[float, float, float]


def _timm(cfg: ModelConfig) -> tuple[nn.Module, Normalisation, Normalisation, bool]:
    """timm resamples the absolute position embedding when pretrained weights meet another input
    size (e.g. 288 for DDR), so any size divisible by the patch size works."""
    projection = wants_frozen_projection(cfg)
    kwargs: dict = {**cfg.backbone_kwargs, "img_size": cfg.image_size}
    if not projection:
        kwargs["num_classes"] = 0
    if cfg.weights == "random":
        model = timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    elif cfg.weights_file is not None:
        model = timm.create_model(
            cfg.backbone,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(cfg.weights_file)},
            **kwargs,
        )
    else:
        model = timm.create_model(cfg.backbone, pretrained=True, **kwargs)
    pretrained_cfg = getattr(model, "pretrained_cfg", {}) or {}
    mean = tuple(float(v) for v in pretrained_cfg.get("mean", segformer.IMAGENET_MEAN))
    std = tuple(float(v) for v in pretrained_cfg.get("std", segformer.IMAGENET_STD))
    return model, mean, std, projection


def _segformer(cfg: ModelConfig) -> tuple[nn.Module, Normalisation, Normalisation, bool]:
    """SegFormer sees any input size (overlapping convolutions, no position embedding); it has no
    contrastive projection to keep."""
    build = {"random": segformer.random_segformer, "stand-in": segformer.stand_in_segformer,
             "pretrained": segformer.pretrained_segformer}[cfg.weights]
    model = build(cfg)
    mean, std = segformer.normalisation(cfg)
    return model, mean, std, False


def _load_failure(cfg: ModelConfig, err: Exception) -> str:
    if cfg.weights == "random":
        return f"could not build backbone {cfg.backbone!r} with model.backbone_kwargs={cfg.backbone_kwargs}: {err}"
    where = f"the local file {cfg.weights_file}" if cfg.weights_file else "the Hugging Face hub or its offline cache"
    local = (
        "Give a local save_pretrained folder as model.backbone=PATH"
        if cfg.resolved_family == "segformer"
        else "Give a local checkpoint with model.weights_file=PATH"
    )
    return (
        f"could not load pretrained weights for backbone {cfg.backbone!r} from {where}: {err}. "
        f"{local}, populate the Hugging Face cache "
        "(HF_HUB_OFFLINE=1 then reads it without network), or set model.weights=random for a smoke run."
    )


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
