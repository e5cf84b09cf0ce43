"""The one configuration schema.

The CLI, DVC (``params.yaml``) and the Kubeflow components all parse this schema, so defaults live
here and nowhere else: ``params.yaml`` holds only what the default experiment changes, and presets
under ``dvpt_core/presets/`` hold what a published setting changes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


class ConfigError(ValueError):
    """A configuration file, key or value a user must fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the dataset lives and what its labels mean."""

    format: Literal["ddr"] = "ddr"
    class_names: list[str] = Field(
        default_factory=lambda: ["no DR", "mild", "moderate", "severe", "proliferative"]
    )
    # Images larger than this are refused before decoding (decompression bombs).
    max_pixels: int = Field(default=40_000_000, gt=0)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class SyntheticConfig(_Strict):
    """The built-in DR-like dataset: sizes per split, raw image size and seed."""

    train: int = Field(default=240, ge=1)
    valid: int = Field(default=60, ge=1)
    test: int = Field(default=100, ge=1)
    image_size: int = Field(default=160, ge=32)
    seed: int = 0


class ModelConfig(_Strict):
    """Backbone, weights and the PEFT method with its settings.

    DVPT's settings sit at this level (``model.prompts`` = m, ``model.hidden_dim`` = d',
    ``model.share_every`` = s); defaults are the paper's (section 4.3: m=50, d'=20, s=1).
    """

    backbone: str = "vit_base_patch16_clip_224.openai"
    # "pretrained": timm's hub weights, or ``weights_file`` when given (no network needed).
    # "random": random initialisation, for tests and smoke runs only; every output says so.
    weights: Literal["pretrained", "random"] = "pretrained"
    weights_file: Path | None = None
    # Seed of a random initialisation, so the same "random" backbone can be rebuilt to load an adapter.
    init_seed: int = 0
    image_size: int = Field(default=224, ge=16)
    method: Literal["dvpt"] = "dvpt"
    prompts: int = Field(default=50, ge=0)
    hidden_dim: int = Field(default=20, ge=1)
    share_every: int = Field(default=1, ge=1)
    activation: Literal["gelu", "quick_gelu", "relu"] = "gelu"
    gate_init: float = 0.0
    # False is the paper's "w/o CAVPT" ablation, which is also the authors' released ViT behaviour.
    cavpt: bool = True
    prompt_pos_embed: bool = True
    # The paper only says "initialized randomly"; these are the authors' released values.
    prompt_init_std: float = Field(default=1.0, ge=0)
    prompt_pos_init_std: float | None = Field(default=None, ge=0, description="None: d ** -0.5")
    # Keep the backbone's own frozen head as a projection before the classifier
    # (CLIP: 768 -> 512). None decides from the backbone: True for CLIP image towers.
    frozen_projection: bool | None = None

    @field_validator("weights_file")
    @classmethod
    def _weights_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"model.weights_file {value} does not exist")
        return value


class TrainConfig(_Strict):
    """Optimisation. Defaults follow the paper's DDR setting (section 4.1.3) where it gives one."""

    epochs: int = Field(default=80, ge=1)
    batch_size: int = Field(default=70, ge=1)
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: int = Field(default=5, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    amp: bool = True
    num_workers: int = Field(default=0, ge=0)
    seed: int = 0
    device: str = "auto"
    hflip: bool = True
    vflip: bool = True
    # Random-resized-crop scale range; (1, 1) disables cropping.
    crop_scale: tuple[float, float] = (0.8, 1.0)
    # Stop after this many optimiser steps per epoch (None: the whole split). For smoke runs.
    max_steps_per_epoch: int | None = Field(default=None, ge=1)


class TrackingConfig(_Strict):
    """MLflow. ``tracking_uri`` None means $MLFLOW_TRACKING_URI, else a local SQLite file."""

    tracking_uri: str | None = None
    experiment: str = "dvpt"
    registered_model: str = "dvpt-adapter"
    alias: str = "challenger"

    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class ExportConfig(_Strict):
    opset: int = Field(default=18, ge=13)
    parity_atol: float = Field(default=1e-4, gt=0)


class ExperimentConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return _validate(json.loads(text), source="JSON configuration")


def _validate(raw: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in err.errors()
        )
        raise ConfigError(f"invalid configuration in {source}: {problems}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``KEY=VALUE`` with a dotted key; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. model.prompts=10)")
    key, value = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(raw).__name__}")
    return raw


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name!r}; known presets: {known}")
    return path


def load_config(
    params: Path | None = None, overrides: list[str] | None = None, preset: str | None = None
) -> ExperimentConfig:
    """Schema defaults, then a preset, then a params file, then ``KEY=VALUE`` overrides."""
    raw: dict[str, Any] = {}
    sources = []
    if preset:
        raw = _deep_merge(raw, read_yaml(preset_path(preset)))
        sources.append(f"preset {preset}")
    if params is not None:
        raw = _deep_merge(raw, read_yaml(params))
        sources.append(str(params))
    raw = apply_overrides(raw, overrides or [])
    if overrides:
        sources.append("--set " + " ".join(overrides))
    return _validate(raw, source=", ".join(sources) or "defaults")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
