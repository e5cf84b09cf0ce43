"""The configuration schema: the defaults that carry the paper's settings or a safety margin, every
limit at its boundary (the last value accepted and the first refused), and how files, presets and
``KEY=VALUE`` overrides combine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dvpt_core.config import (
    DDR_GRADES,
    DEFAULT_TRACKING_URI,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_config,
    parse_override,
    preset_path,
    read_yaml,
)

DEFAULTS = ExperimentConfig()

# (section.field, default, where the value comes from)
PAPER_AND_SAFETY_DEFAULTS = [
    # DVPT, paper section 4.3 and DESIGN.md section 2
    ("model.prompts", 50, "m = 50"),
    ("model.hidden_dim", 20, "d' = 20"),
    ("model.share_every", 1, "s = 1"),
    ("model.gate_init", 0.0, "g starts at 0: each module adds nothing at initialisation"),
    ("model.cavpt", True, "the paper's method; False is the 'w/o CAVPT' ablation"),
    ("model.prompt_pos_embed", True, "prompts carry their own position embedding"),
    ("model.prompt_init_std", 1.0, "released code: randn"),
    ("model.prompt_pos_init_std", None, "released code: d^-0.5 randn"),
    ("model.backbone", "vit_base_patch16_clip_quickgelu_224.openai", "the paper's CLIP ViT-B/16"),
    ("model.frozen_projection", None, "decided by the backbone: CLIP keeps its projection"),
    ("model.weights", "pretrained", "random weights only when asked for"),
    ("model.method", "dvpt", ""),
    ("model.swin.prompts", 10, "released Swin code"),
    ("model.swin.hidden_dim", 10, "released Swin code"),
    ("model.swin.share_every", 3, "released Swin code"),
    ("model.swin.activation", "quick_gelu", "released Swin code"),
    ("model.swin.prompt_init_std", 0.02, "released Swin code"),
    # baselines at their own papers' defaults
    ("model.vpt.prompts", 50, "VPT's compared length"),
    ("model.vpt.dropout", 0.0, "VPT"),
    ("model.adaptformer.bottleneck", 64, "AdaptFormer"),
    ("model.adaptformer.scale", 0.1, "AdaptFormer"),
    ("model.adaptformer.dropout", 0.1, "AdaptFormer"),
    ("model.adaptformer.layer_norm", False, "AdaptFormer's default (the DVPT authors' baseline adds it)"),
    ("model.lora.rank", 8, "LoRA"),
    ("model.lora.alpha", 8.0, "LoRA"),
    ("model.lora.dropout", 0.0, "LoRA"),
    ("model.lora.targets", ["qkv"], "LoRA adapts the attention's query, key and value maps"),
    # optimisation, paper section 4.1.3 (DDR) and the released code
    ("train.epochs", 80, "80 epochs"),
    ("train.batch_size", 70, "batch 70"),
    ("train.lr", 0.01, "initial learning rate 0.01"),
    ("train.weight_decay", 1e-4, "released code"),
    ("train.warmup_epochs", 5, "released code: 5 warm-up epochs"),
    ("train.grad_clip", 1.0, "released code: clipping at 1.0"),
    ("train.amp", True, "released code"),
    ("train.hflip", True, "horizontal flips"),
    ("train.vflip", True, "vertical flips"),
    ("train.crop_scale", (0.8, 1.0), "random crops"),
    ("train.max_steps_per_epoch", None, "the whole split"),
    # data: DDR's five grades, split fractions (ACDC 70 / 10 / 20), safety limits
    ("data.format", "ddr", "the paper's classification dataset"),
    ("data.task", "classification", ""),
    ("data.class_names", DDR_GRADES, "DDR's 5 grades"),
    ("data.max_pixels", 40_000_000, "decompression bombs are refused before decoding"),
    ("data.val_fraction", 0.1, "70 / 10 / 20"),
    ("data.test_fraction", 0.2, "70 / 10 / 20"),
    ("data.folds", 1, "a hold-out split"),
    ("data.fold", 0, ""),
    ("data.label_ratio", 1.0, "every training label"),
    ("data.mask_threshold", 128, "half of 255"),
    ("data.split_seed", 0, ""),
    ("data.synapse_labels", "transunet8", "TransUNet's released files"),
    ("data.link_roots", [], "nothing outside the dataset root is trusted"),
    ("data.csv_file", "dataset.csv", ""),
    # export: ONNX must reproduce PyTorch within 1e-4
    ("export.parity_atol", 1e-4, "parity tolerance"),
    ("export.opset", 18, ""),
    # tracking: new versions are challengers until promoted
    ("tracking.alias", "challenger", "never champion without a promotion"),
    ("tracking.registered_model", "dvpt-adapter", ""),
    ("tracking.experiment", "dvpt", ""),
    ("tracking.tracking_uri", None, "$MLFLOW_TRACKING_URI, else SQLite"),
    # the built-in synthetic data set
    ("synthetic.train", 240, ""), ("synthetic.valid", 60, ""), ("synthetic.test", 100, ""),
    ("synthetic.seg_images", 100, ""), ("synthetic.volumes", 10, ""), ("synthetic.slices", 8, ""),
    ("synthetic.image_size", 160, ""), ("synthetic.seed", 0, ""),
    ("model.image_size", 224, ""), ("model.init_seed", 0, ""), ("model.activation", "gelu", ""),
    ("train.num_workers", 0, ""), ("train.seed", 0, ""), ("train.device", "auto", ""),
    ("train.process_group_timeout_s", 1800.0, "torch's own default for a process group"),
]


def get(cfg: ExperimentConfig, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("key", "default", "source"), PAPER_AND_SAFETY_DEFAULTS, ids=[d[0] for d in PAPER_AND_SAFETY_DEFAULTS])
def test_defaults(key: str, default: Any, source: str) -> None:
    value = get(DEFAULTS, key)
    assert value == default and type(value) is type(default), source


def test_defaults_are_fresh_objects_per_config() -> None:
    a, b = ExperimentConfig(), ExperimentConfig()
    a.data.class_names.append("extra")
    a.model.lora.targets.append("proj")
    assert b.data.class_names == DDR_GRADES and b.model.lora.targets == ["qkv"]


def nested(dotted: str, value: Any) -> dict:
    section, *path = dotted.split(".")
    node: dict = {path[-1]: value}
    for part in reversed(path[:-1]):
        node = {part: node}
    return {section: node}


# (key, last value accepted, first value refused), for each limit
BOUNDARIES = [
    ("data.class_names", ["a", "b"], ["a"]),
    ("data.max_pixels", 1, 0),
    ("data.val_fraction", 1e-9, 0.0),
    ("data.test_fraction", 1e-9, 0.0),
    ("data.folds", 1, 0),
    ("data.fold", 0, -1),
    ("data.label_ratio", 1e-9, 0.0),
    ("data.label_ratio", 1.0, 1.0 + 1e-9),
    ("data.mask_threshold", 1, 0),
    ("data.mask_threshold", 255, 256),
    ("synthetic.train", 1, 0), ("synthetic.valid", 1, 0), ("synthetic.test", 1, 0),
    ("synthetic.seg_images", 5, 4), ("synthetic.volumes", 3, 2), ("synthetic.slices", 2, 1),
    ("synthetic.image_size", 32, 31),
    ("model.image_size", 16, 15),
    ("model.prompts", 0, -1),
    ("model.hidden_dim", 1, 0),
    ("model.share_every", 1, 0),
    ("model.prompt_init_std", 0.0, -1e-9),
    ("model.prompt_pos_init_std", 0.0, -1e-9),
    ("model.swin.prompts", 0, -1),
    ("model.swin.hidden_dim", 1, 0),
    ("model.swin.share_every", 1, 0),
    ("model.swin.prompt_init_std", 0.0, -1e-9),
    ("model.vpt.prompts", 1, 0),
    ("model.vpt.dropout", 0.0, -1e-9),
    ("model.vpt.dropout", 1 - 1e-9, 1.0),
    ("model.adaptformer.bottleneck", 1, 0),
    ("model.adaptformer.dropout", 0.0, -1e-9),
    ("model.adaptformer.dropout", 1 - 1e-9, 1.0),
    ("model.lora.rank", 1, 0),
    ("model.lora.alpha", 1e-9, 0.0),
    ("model.lora.dropout", 0.0, -1e-9),
    ("model.lora.dropout", 1 - 1e-9, 1.0),
    ("model.lora.targets", ["proj"], []),
    ("train.epochs", 1, 0),
    ("train.batch_size", 1, 0),
    ("train.lr", 1e-9, 0.0),
    ("train.weight_decay", 0.0, -1e-9),
    ("train.warmup_epochs", 0, -1),
    ("train.grad_clip", 1e-9, 0.0),
    ("train.num_workers", 0, -1),
    ("train.max_steps_per_epoch", 1, 0),
    ("train.process_group_timeout_s", 1e-9, 0.0),
    ("export.opset", 13, 12),
    ("export.parity_atol", 1e-12, 0.0),
]


@pytest.mark.parametrize(("key", "accepted", "refused"), BOUNDARIES, ids=[f"{b[0]}={b[2]}" for b in BOUNDARIES])
def test_limits_at_their_boundary(key: str, accepted: Any, refused: Any) -> None:
    assert get(ExperimentConfig.model_validate(nested(key, accepted)), key) == accepted
    with pytest.raises(ValidationError):
        ExperimentConfig.model_validate(nested(key, refused))


def test_fractions_must_leave_something_to_train_on() -> None:
    ExperimentConfig.model_validate({"data": {"val_fraction": 0.79, "test_fraction": 0.2}})
    for val, test, total in [(0.8, 0.2, "1.0"), (0.5, 0.6, "1.1")]:
        with pytest.raises(ValidationError, match=f"data.val_fraction \\+ data.test_fraction = {total} leaves nothing to train on"):
            ExperimentConfig.model_validate({"data": {"val_fraction": val, "test_fraction": test}})


@pytest.mark.parametrize(("key", "value", "message"), [
    ("data.val_fraction", 1.0, "less than 1"),
    ("data.test_fraction", 1.0, "less than 1"),
    ("data.folds", 0, "greater than or equal to 1"),
])
def test_a_value_outside_its_own_limit_is_blamed_on_its_field(key: str, value: object, message: str) -> None:
    """Not on a rule combining fields (fractions summing to 1, fold below folds) that also refuses it."""
    with pytest.raises(ConfigError, match=rf"{key}: Input should be {message} \(got {value}\)"):
        load_config(None, [f"{key}={value}"])


def test_fold_must_be_below_folds() -> None:
    assert ExperimentConfig.model_validate({"data": {"folds": 5, "fold": 4}}).data.fold == 4
    for fold in (5, 6):
        with pytest.raises(ValidationError, match=rf"data.fold={fold} must be below data.folds=5"):
            ExperimentConfig.model_validate({"data": {"folds": 5, "fold": fold}})
    with pytest.raises(ValidationError, match=r"data.fold=1 must be below data.folds=1"):
        ExperimentConfig.model_validate({"data": {"fold": 1}})


def test_a_format_sets_its_task_classes_and_folds_unless_given() -> None:
    kvasir = ExperimentConfig.model_validate({"data": {"format": "kvasir"}}).data
    assert (kvasir.task, kvasir.class_names, kvasir.folds, kvasir.num_classes) == ("segmentation", ["background", "polyp"], 5, 2)
    own = ExperimentConfig.model_validate({"data": {"format": "kvasir", "folds": 1, "class_names": ["bg", "a", "b"]}}).data
    assert (own.folds, own.class_names, own.task) == (1, ["bg", "a", "b"], "segmentation")
    assert ExperimentConfig.model_validate({"data": {"format": "acdc"}}).data.num_classes == 4
    assert ExperimentConfig.model_validate({"data": {"format": "synapse"}}).data.num_classes == 9
    isic = ExperimentConfig.model_validate({"data": {"format": "isic2016"}}).data
    assert (isic.task, isic.folds) == ("segmentation", 1)
    folder = ExperimentConfig.model_validate({"data": {"format": "folder"}}).data
    assert (folder.task, folder.class_names) == ("classification", DDR_GRADES)


def test_unknown_keys_and_assignments_are_validated() -> None:
    with pytest.raises(ValidationError):
        ExperimentConfig.model_validate({"model": {"promts": 3}})
    cfg = ExperimentConfig()
    with pytest.raises(ValidationError):
        cfg.train.epochs = 0


def test_weights_file_is_checked_on_load_and_reserved_backbone_kwargs_are_refused(tmp_path: Path) -> None:
    from dvpt_core.models.backbone import BackboneError, create_backbone

    # A weights file the pretrain step has not written yet parses; building the backbone refuses it.
    weights = tmp_path / "w.safetensors"
    cfg = ExperimentConfig.model_validate({"model": {"weights_file": str(weights), "backbone": "vit_tiny_patch16_224",
                                                     "image_size": 32}})
    assert cfg.model.weights_file == weights
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone(cfg.model)
    with pytest.raises(ValidationError, match="model.weights=stand-in needs model.weights_file"):
        ExperimentConfig.model_validate({"model": {"weights": "stand-in"}})
    with pytest.raises(ValidationError, match=r"\['img_size', 'num_classes'\] through model.image_size"):
        ExperimentConfig.model_validate({"model": {"backbone_kwargs": {"num_classes": 3, "img_size": 9, "depth": 2}}})
    assert ExperimentConfig.model_validate({"model": {"backbone_kwargs": {"depth": 2}}}).model.backbone_kwargs == {"depth": 2}


def test_tracking_uri_explicit_then_environment_then_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert ExperimentConfig().tracking.resolved_uri() == DEFAULT_TRACKING_URI == "sqlite:///mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert ExperimentConfig().tracking.resolved_uri() == "http://env:5000"
    explicit = ExperimentConfig.model_validate({"tracking": {"tracking_uri": "http://set:1"}})
    assert explicit.tracking.resolved_uri() == "http://set:1"


def test_json_round_trip() -> None:
    cfg = load_config(None, ["model.prompts=7", "data.format=kvasir"])
    assert ExperimentConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match=r"invalid configuration in JSON configuration: model.prompts: .* \(got -1\)"):
        ExperimentConfig.from_json('{"model": {"prompts": -1}}')


def test_overrides_are_yaml_values_on_dotted_keys() -> None:
    assert parse_override("model.prompts=10") == (["model", "prompts"], 10)
    assert parse_override(" train.lr =0.001") == (["train", "lr"], 0.001)
    assert parse_override("a=b=c") == (["a"], "b=c")
    assert parse_override("model.lora.targets=[qkv, proj]") == (["model", "lora", "targets"], ["qkv", "proj"])
    for bad, message in [("model.prompts", "is not KEY=VALUE"), ("=3", "has an empty key"), (" =3", "has an empty key")]:
        with pytest.raises(ConfigError, match=message):
            parse_override(bad)
    raw = apply_overrides({"model": {"prompts": 1}, "x": 3}, ["model.hidden_dim=4", "a.b.c=true"])
    assert raw == {"model": {"prompts": 1, "hidden_dim": 4}, "x": 3, "a": {"b": {"c": True}}}
    with pytest.raises(ConfigError, match="x is not a section"):
        apply_overrides({"x": 3}, ["x.y=1"])


def test_schema_then_preset_then_file_then_overrides(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  prompts: 7\n  hidden_dim: 9\ntrain:\n  epochs: 3\n")
    cfg = load_config(params, ["model.prompts=11"], preset="ddr-paper")
    assert cfg.model.prompts == 11  # override over file
    assert cfg.model.hidden_dim == 9 and cfg.train.epochs == 3  # file over preset
    assert cfg.model.image_size == 288 and cfg.train.batch_size == 70  # preset over schema
    assert cfg.model.share_every == 1 and cfg.model.gate_init == 0.0  # schema
    assert load_config() == ExperimentConfig()
    with pytest.raises(ConfigError, match=rf"invalid configuration in preset ddr-paper, {params}, --set model.prompts=-2: "
                                          r"model.prompts: .* \(got -2\)"):
        load_config(params, ["model.prompts=-2"], preset="ddr-paper")


def test_preset_files_and_yaml_errors_name_the_file(tmp_path: Path) -> None:
    assert preset_path("ddr-paper").is_file()
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; known presets: acdc-paper, ddr-paper, ddr-paper-swin, "):
        preset_path("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{bad} is not valid YAML"):
        read_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, not list"):
        read_yaml(listing)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty) == {}


def test_nested_sections_merge_key_by_key(tmp_path: Path) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("model:\n  swin:\n    prompts: 3\n")
    cfg = load_config(params, preset="ddr-paper-swin")
    assert cfg.model.swin.prompts == 3 and cfg.model.backbone.startswith("swin_base")
    assert cfg.model.swin.share_every == 3
