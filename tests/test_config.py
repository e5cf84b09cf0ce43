"""The configuration schema: the defaults that carry the paper's settings or a safety margin, every
limit at its boundary (the last value accepted and the first refused), and how files, presets and
``KEY=VALUE`` overrides combine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from dvpt_core.config import (
    DDR_GRADES,
    DEFAULT_TRACKING_URI,
    RUN_PARAMETERS,
    ConfigError,
    ExperimentConfig,
    KubeflowConfig,
    apply_overrides,
    explicit_keys,
    load_config,
    parse_override,
    preset_path,
    read_yaml,
    setting_value,
    with_run_parameters,
    with_settings,
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
    ("model.normalise", True, "inputs normalised as the backbone was pretrained"),
    ("model.family", "auto", "decided from the backbone's name"),
    # augmentation beyond flips and crops: off (the ddr-paper-swin preset turns the released script's on)
    ("train.rotation", 0.0, ""), ("train.translate", 0.0, ""), ("train.color_jitter", (0.0, 0.0, 0.0, 0.0), ""),
    # DVPT on SegFormer and EVP, the released configurations
    ("model.segformer.decoder", "huggingface", "the Hugging Face decode head; 'released' is the authors'"),
    ("model.segformer.prompts", 10, "released SegFormer code"),
    ("model.segformer.hidden_dim", 10, "released SegFormer code"),
    ("model.segformer.share_every", 2, "released SegFormer code"),
    ("model.segformer.activation", "quick_gelu", "released SegFormer code"),
    ("model.segformer.prompt_init_std", 0.02, "released SegFormer code"),
    ("model.evp.scale_factor", 4, "EVP's released configurations; reproduces Tables 1 and 2"),
    ("model.evp.frequency_ratio", 0.25, "EVP's released configurations"),
    # the stand-in foundation model's pretraining (documented in README and DESIGN.md)
    ("pretrain.train", 1200, ""), ("pretrain.valid", 120, ""), ("pretrain.test", 120, ""),
    ("pretrain.epochs", 6, ""), ("pretrain.batch_size", 32, ""), ("pretrain.lr", 1e-3, ""),
    ("pretrain.weight_decay", 0.05, ""), ("pretrain.warmup_epochs", 1, ""), ("pretrain.seed", 0, ""),
    # every call to a tracking server is bounded (seconds, not MLflow's minutes)
    ("tracking.request_timeout_s", 10.0, "bounded requests"),
    ("tracking.request_retries", 2, "bounded requests"),
    ("tracking.sync_wait_s", 60.0, "how long a lost server is waited for before `dvpt sync`"),
    ("tracking.register_experiments", False, "`dvc exp run` leaves the registry alone"),
    # the promotion gate
    ("promotion.rule", "non_inferiority", ""),
    ("promotion.margin", 0.01, "kappa differences between methods are 0.003-0.03"),
    ("promotion.floor", 0.6, "a model must reach this metric to be promoted at all"),
    ("promotion.resamples", 2000, "paired bootstrap"),
    ("promotion.confidence", 0.95, "paired bootstrap"),
    ("promotion.seed", 0, ""),
    ("promotion.champion_alias", "champion", ""),
    ("promotion.allow_different_data", False, "versions evaluated on other data are refused"),
    ("promotion.lock_timeout_s", 60.0, "a crashed promotion's hold expires"),
    # the data gate's severities
    ("validation.class_missing_from_train", "error", "the model would never see the class"),
    ("validation.class_missing_from_eval", "warning", "a small split of a rare class can lack it honestly"),
    ("validation.single_class", "error", "nothing to learn"),
    ("validation.unlisted_files", "warning", "usually an incomplete list"),
]

# Deployment settings of `dvpt kfp compile` (not part of an experiment's configuration).
KUBEFLOW_DEFAULTS = [
    ("data_repo", None), ("data_path", "data"), ("data_revision", "HEAD"),
    ("gpus", 0), ("accelerator_type", "nvidia.com/gpu"), ("cpu", None), ("memory", None),
    ("retries", 3), ("backoff", "30s"), ("backoff_factor", 2.0), ("backoff_max", "10m"),
    ("parallelism", 4), ("train_launcher", "pod"), ("nodes", 1), ("processes_per_node", 1),
    ("shared_storage", "20Gi"), ("storage_class", None), ("job_timeout_s", 7 * 24 * 3600),
]


def get(cfg: BaseModel, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# (configuration, key, default, source) for the experiment's settings and the deployment's.
ALL_DEFAULTS = ([(DEFAULTS, *d) for d in PAPER_AND_SAFETY_DEFAULTS]
                + [(KubeflowConfig(), key, default, "deployment default") for key, default in KUBEFLOW_DEFAULTS])


@pytest.mark.parametrize(("cfg", "key", "default", "source"), ALL_DEFAULTS,
                         ids=[f"{type(d[0]).__name__}.{d[1]}" for d in ALL_DEFAULTS])
def test_defaults(cfg: BaseModel, key: str, default: Any, source: str) -> None:
    value = get(cfg, key)
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
    ("model.segformer.prompts", 0, -1),
    ("model.segformer.hidden_dim", 1, 0),
    ("model.segformer.share_every", 1, 0),
    ("model.segformer.prompt_init_std", 0.0, -1e-9),
    ("model.evp.scale_factor", 1, 0),
    ("model.evp.frequency_ratio", 1e-9, 0.0),
    ("model.evp.frequency_ratio", 1 - 1e-9, 1.0),
    ("train.rotation", 0.0, -1e-9),
    ("train.rotation", 180.0, 180 + 1e-9),
    ("train.translate", 0.0, -1e-9),
    ("train.translate", 1 - 1e-9, 1.0),
    ("pretrain.train", 8, 7), ("pretrain.valid", 8, 7), ("pretrain.test", 8, 7),
    ("pretrain.epochs", 1, 0),
    ("pretrain.batch_size", 1, 0),
    ("pretrain.lr", 1e-9, 0.0),
    ("pretrain.weight_decay", 0.0, -1e-9),
    ("pretrain.warmup_epochs", 0, -1),
    ("tracking.request_timeout_s", 1e-9, 0.0),
    ("tracking.request_retries", 0, -1),
    ("tracking.sync_wait_s", 0.0, -1e-9),
    ("promotion.margin", 0.0, -1e-9),
    ("promotion.resamples", 100, 99),
    ("promotion.confidence", 0.5 + 1e-9, 0.5),
    ("promotion.confidence", 1 - 1e-9, 1.0),
    ("promotion.lock_timeout_s", 1e-9, 0.0),
]

KUBEFLOW_BOUNDARIES = [
    ("gpus", 0, -1),
    ("accelerator_type", "x", ""),
    ("retries", 0, -1),
    ("backoff_factor", 1.0, 1 - 1e-9),
    ("parallelism", 1, 0),
    ("nodes", 1, 0),
    ("processes_per_node", 1, 0),
    ("job_timeout_s", 1, 0),
]


@pytest.mark.parametrize(("key", "accepted", "refused"), BOUNDARIES, ids=[f"{b[0]}={b[2]}" for b in BOUNDARIES])
def test_limits_at_their_boundary(key: str, accepted: Any, refused: Any) -> None:
    assert get(ExperimentConfig.model_validate(nested(key, accepted)), key) == accepted
    with pytest.raises(ValidationError):
        ExperimentConfig.model_validate(nested(key, refused))


@pytest.mark.parametrize(("key", "accepted", "refused"), KUBEFLOW_BOUNDARIES,
                         ids=[f"{b[0]}={b[2]}" for b in KUBEFLOW_BOUNDARIES])
def test_kubeflow_limits_at_their_boundary(key: str, accepted: Any, refused: Any) -> None:
    assert getattr(KubeflowConfig.model_validate({key: accepted}), key) == accepted
    with pytest.raises(ValidationError, match=key):
        KubeflowConfig.model_validate({key: refused})


def test_a_pytorchjob_gives_each_process_one_gpu() -> None:
    """Refused only for a PyTorchJob on GPUs whose node would run more processes than it has GPUs."""
    for settings in ({"train_launcher": "pytorchjob", "gpus": 2, "processes_per_node": 2},
                     {"train_launcher": "pytorchjob", "gpus": 2, "processes_per_node": 1},
                     {"train_launcher": "pytorchjob", "gpus": 0, "processes_per_node": 4},  # CPU processes
                     {"train_launcher": "pod", "gpus": 1, "processes_per_node": 2}):  # the pod runs one process
        assert KubeflowConfig.model_validate(settings).processes_per_node == settings["processes_per_node"]
    with pytest.raises(ValidationError, match="processes_per_node=3 exceeds gpus=2: torchrun gives each process one GPU"):
        KubeflowConfig.model_validate({"train_launcher": "pytorchjob", "gpus": 2, "processes_per_node": 3})


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


def test_a_weights_file_for_segformer_is_only_the_stand_in(tmp_path: Path) -> None:
    """SegFormer's pretrained weights are a save_pretrained folder or hub name, not a timm file."""
    weights = str(tmp_path / "w.safetensors")
    segformer = {"backbone": "nvidia/mit-b0", "weights_file": weights}
    with pytest.raises(ValidationError, match="model.weights_file is a timm checkpoint file, or for SegFormer only"):
        ExperimentConfig.model_validate({"model": segformer})
    with pytest.raises(ValidationError, match="model.weights_file is a timm checkpoint file"):
        ExperimentConfig.model_validate({"model": {**segformer, "weights": "random"}})
    assert ExperimentConfig.model_validate({"model": {**segformer, "weights": "stand-in"}}).model.weights == "stand-in"
    # A timm backbone named nothing like SegFormer takes a weights file, unless its family says SegFormer.
    assert ExperimentConfig.model_validate({"model": {"weights_file": weights}}).model.resolved_family == "timm"
    with pytest.raises(ValidationError, match="model.weights_file is a timm checkpoint file"):
        ExperimentConfig.model_validate({"model": {"weights_file": weights, "family": "segformer"}})


@pytest.mark.parametrize(("backbone", "family", "resolved"), [
    ("nvidia/segformer-b0-finetuned-ade-512-512", "auto", "segformer"),
    ("nvidia/MiT-B2", "auto", "segformer"),
    ("/models/mit_b0", "auto", "segformer"),
    ("vit_base_patch16_224", "auto", "timm"),
    ("vit_base_patch16_224", "segformer", "segformer"),
    ("/models/segformer-export", "timm", "timm"),
])
def test_the_family_is_given_or_read_from_the_backbone_name(backbone: str, family: str, resolved: str) -> None:
    model = ExperimentConfig.model_validate({"model": {"backbone": backbone, "family": family}}).model
    assert model.resolved_family == resolved


def test_settings_and_run_parameters_set_dotted_keys_and_name_what_is_unknown() -> None:
    cfg = with_settings(ExperimentConfig(), {"train.epochs": 3, "model.lora.rank": 4})
    assert (cfg.train.epochs, cfg.model.lora.rank, cfg.train.lr) == (3, 4, 0.01)
    assert setting_value(cfg, "model.lora.rank") == 4 and setting_value(cfg, "data.link_roots") == []
    with pytest.raises(ConfigError, match=r"invalid configuration in train.epochs=0: train.epochs: .* \(got 0\)"):
        with_settings(cfg, {"train.epochs": 0})
    run = with_run_parameters(ExperimentConfig(), method="lora", epochs=2, learning_rate=0.5, label_ratio=0.5, seed=7)
    assert [setting_value(run, RUN_PARAMETERS[name]) for name in ("method", "epochs", "learning_rate",
                                                                   "label_ratio", "seed")] == ["lora", 2, 0.5, 0.5, 7]
    assert with_run_parameters(ExperimentConfig()) == ExperimentConfig()
    with pytest.raises(ConfigError, match=r"unknown run parameter\(s\) \['lr', 'zeta'\]; known: \['epochs', "):
        with_run_parameters(ExperimentConfig(), epochs=2, lr=0.1, zeta=1)


def test_explicit_keys_are_those_given_however_deep() -> None:
    assert explicit_keys(ExperimentConfig()) == set()
    given = load_config(None, ["model.lora.rank=4", "train.epochs=3", "model.prompts=50"])
    assert explicit_keys(given) == {"model.lora.rank", "train.epochs", "model.prompts"}
    assert explicit_keys(ExperimentConfig.from_json(given.to_json())) >= {"model.lora.rank", "data.format", "train.lr"}


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
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  backbone: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin} is not UTF-8 text \\(byte 22: invalid continuation byte\\)"):
        read_yaml(latin)


def test_nested_sections_merge_key_by_key(tmp_path: Path) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("model:\n  swin:\n    prompts: 3\n")
    cfg = load_config(params, preset="ddr-paper-swin")
    assert cfg.model.swin.prompts == 3 and cfg.model.backbone.startswith("swin_base")
    assert cfg.model.swin.share_every == 3
