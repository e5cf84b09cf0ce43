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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS_DIR = Path(__file__).parent / "presets"
DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


class ConfigError(ValueError):
    """A configuration file, key or value a user must fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DDR_GRADES = ["no DR", "mild", "moderate", "severe", "proliferative"]

# What an on-disk format implies for the other data settings; applied when a configuration is
# parsed, to keys it does not set itself. Segmentation class 0 is always the background. Synapse's
# classes are the 8 organs TransUNet evaluates, in TransUNet's order (see formats/synapse.py).
FORMAT_DEFAULTS: dict[str, dict[str, Any]] = {
    "ddr": {"task": "classification", "class_names": DDR_GRADES},
    # No official split: the paper reports 5-fold cross-validation.
    "kvasir": {"task": "segmentation", "class_names": ["background", "polyp"], "folds": 5},
    "isic2016": {"task": "segmentation", "class_names": ["background", "lesion"]},
    # The paper's 70 / 10 / 20 patient split is the default val/test fractions.
    "acdc": {"task": "segmentation", "class_names": ["background", "RV", "MYO", "LV"]},
    "synapse": {
        "task": "segmentation",
        "class_names": ["background", "aorta", "gallbladder", "kidney_left", "kidney_right",
                        "liver", "pancreas", "spleen", "stomach"],
    },
}
DataFormat = Literal["auto", "ddr", "kvasir", "isic2016", "acdc", "synapse", "folder", "csv"]


class DataConfig(_Strict):
    """Where the dataset lives, what its labels mean and how it is split.

    ``format`` names the on-disk layout (``auto``: detected from the files, see
    ``dvpt_core.data.formats``); choosing a format also sets ``task``, ``class_names`` (and for
    Kvasir-SEG ``folds``) unless the configuration sets them itself. Splits the dataset does not
    ship are carved by patient (or image) with ``split_seed``: ``test_fraction`` and
    ``val_fraction`` of the pool, or with ``folds`` > 1, fold ``fold`` as the held-out split.
    ``label_ratio`` keeps that share of the training split (nested: a smaller ratio's subset lies
    inside a larger one's for the same seed), for the paper's data-efficiency study (Table 4),
    drawn with ``label_seed`` (None: ``split_seed``). The subset is taken when training reads the
    preprocessed cache, which always holds the whole training split, so one cache serves every
    ratio and every labelled-subset seed.
    """

    format: DataFormat = "ddr"
    # What every step trains, scores, exports and serves (``dvpt_core.tasks``); set by ``format``.
    task: Literal["classification", "segmentation"] = "classification"
    class_names: list[str] = Field(default_factory=lambda: list(DDR_GRADES), min_length=2)
    # Images larger than this are refused before decoding (decompression bombs).
    max_pixels: int = Field(default=40_000_000, gt=0)
    split_seed: int = 0
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    # 1: a hold-out split. k > 1: k folds; fold ``fold`` is the test split, or the validation split
    # when the dataset ships its own test split.
    folds: int = Field(default=1, ge=1)
    fold: int = Field(default=0, ge=0)
    label_ratio: float = Field(default=1.0, gt=0, le=1)
    label_seed: int | None = None
    # Binary masks: a pixel at or above this value is foreground (JPEG masks are lossy, so never
    # exactly 0/255). Masks already holding 0/1 are taken as they are.
    mask_threshold: int = Field(default=128, ge=1, le=255)
    # The ``csv`` format: the table (relative to the dataset root) naming images and labels or masks.
    csv_file: str = "dataset.csv"
    # Synapse label values: "transunet8" = TransUNet's released files (0-8, already the 8 organs);
    # "btcv13" = the raw 13-organ labels, mapped to the 8 organs on reading.
    synapse_labels: Literal["transunet8", "btcv13"] = "transunet8"
    # Validation refuses files that resolve outside the dataset root (``..``, symlinks); these
    # directories are trusted too, e.g. the DVC cache when DVC checks data out as symlinks.
    link_roots: list[Path] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _format_defaults(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("format") in FORMAT_DEFAULTS:
            return {**FORMAT_DEFAULTS[raw["format"]], **raw}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> "DataConfig":
        if self.fold >= self.folds:
            raise ValueError(f"data.fold={self.fold} must be below data.folds={self.folds}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction} "
                "leaves nothing to train on"
            )
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class SyntheticConfig(_Strict):
    """The built-in datasets: DR grading (``train``/``valid``/``test`` images, DDR layout),
    polyp-like segmentation (``seg_images``, Kvasir-SEG layout) and cardiac-like MRI
    (``volumes`` patients of ``slices`` slices, ACDC layout); raw image size and seed for all."""

    train: int = Field(default=240, ge=1)
    valid: int = Field(default=60, ge=1)
    test: int = Field(default=100, ge=1)
    seg_images: int = Field(default=100, ge=5)
    volumes: int = Field(default=10, ge=3)
    slices: int = Field(default=8, ge=2)
    image_size: int = Field(default=160, ge=32)
    seed: int = 0


class VPTConfig(_Strict):
    """VPT (Jia et al., 2022): ``prompts`` tokens after cls, at the input (shallow) or a fresh set
    before every block (deep). VPT tunes the length per task over {1, 5, 10, 50, 100, 200}; 50 is
    the value this project compares at. Its prompt dropout is 0."""

    prompts: int = Field(default=50, ge=1)
    dropout: float = Field(default=0.0, ge=0, lt=1)


class AdaptFormerConfig(_Strict):
    """AdaptFormer (Chen et al., 2022), the official code's image defaults: bottleneck 64, scale 0.1,
    dropout 0.1, no LayerNorm in the branch. ``layer_norm=True`` is its "in" option, which the DVPT
    authors' baseline uses (their Table 1 counts it)."""

    bottleneck: int = Field(default=64, ge=1)
    scale: float = 0.1
    dropout: float = Field(default=0.1, ge=0, lt=1)
    layer_norm: bool = False


class LoRAConfig(_Strict):
    """LoRA (Hu et al., 2021): W + (alpha / rank) * B A on the attention's linear layers."""

    rank: int = Field(default=8, ge=1)
    alpha: float = Field(default=8.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: list[Literal["qkv", "proj"]] = Field(default_factory=lambda: ["qkv"], min_length=1)


class SwinDVPTConfig(_Strict):
    """DVPT on Swin backbones, as the authors' released Swin-B code sets it: 10 prompts per block,
    a bottleneck of d'=10 shared by every 3 consecutive blocks of a stage, QuickGELU, prompts from
    a normal of std 0.02. ``prompts=0`` drops the prompt cross-attention (CAVPT)."""

    prompts: int = Field(default=10, ge=0)
    hidden_dim: int = Field(default=10, ge=1)
    share_every: int = Field(default=3, ge=1)
    activation: Literal["gelu", "quick_gelu", "relu"] = "quick_gelu"
    prompt_init_std: float = Field(default=0.02, ge=0)


class SegFormerConfig(_Strict):
    """SegFormer backbones (``model.family=segformer``): the decoder layout every method predicts
    with, and DVPT as the authors' released SegFormer code sets it.

    ``decoder``: "huggingface" keeps the checkpoint's decoder as Hugging Face builds it (the four
    per-stage projections to E channels, then its pretrained fuse layer, a 1x1 convolution with
    BatchNorm and ReLU from 4E to E) and trains a new 1x1 classifier from E channels; "released" is
    the DVPT authors' model (Table 2): no fuse layer, the trained 1x1 classifier reads the 4E
    concatenated channels directly. DVPT: ``prompts`` per block (0 drops the prompt
    cross-attention), a bottleneck of ``hidden_dim`` beside each Mix-FFN shared by every
    ``share_every`` blocks of a stage and beside each decoder projection, ``activation``, prompts
    from a normal of std ``prompt_init_std`` truncated at +-2 (released: 10, 10, 2, QuickGELU, 0.02).
    """

    decoder: Literal["huggingface", "released"] = "huggingface"
    prompts: int = Field(default=10, ge=0)
    hidden_dim: int = Field(default=10, ge=1)
    share_every: int = Field(default=2, ge=1)
    activation: Literal["gelu", "quick_gelu", "relu"] = "quick_gelu"
    prompt_init_std: float = Field(default=0.02, ge=0)


class EVPConfig(_Strict):
    """EVP (Liu et al., 2023), with the settings of its released SegFormer configurations:
    explicit prompts of width C / ``scale_factor`` from the frozen patch embedding plus the
    input's high-frequency components, the central ``frequency_ratio`` of the (shifted) spectrum
    being removed; the DVPT authors' counts (Tables 1 and 2) are reproduced with 4 everywhere."""

    scale_factor: int = Field(default=4, ge=1)
    frequency_ratio: float = Field(default=0.25, gt=0, lt=1)


# Set by create_backbone itself; everything else in model.backbone_kwargs goes to timm.create_model
# (or, for SegFormer, to the Hugging Face model configuration).
RESERVED_BACKBONE_KWARGS = frozenset({"img_size", "num_classes", "pretrained", "pretrained_cfg_overlay", "num_labels"})

# Names that select the SegFormer family when ``model.family`` is "auto" (Hugging Face's
# ``nvidia/segformer-b4-finetuned-ade-512-512``, ``nvidia/mit-b4``, or a folder so named).
SEGFORMER_NAME_MARKERS = ("segformer", "mit-b", "mit_b")


class ModelConfig(_Strict):
    """Backbone, weights and the PEFT method with its settings.

    DVPT's settings for ViTs sit at this level (``model.prompts`` = m, ``model.hidden_dim`` = d',
    ``model.share_every`` = s); defaults are the paper's (section 4.3: m=50, d'=20, s=1). On Swin
    backbones DVPT reads ``model.swin`` instead, on SegFormer ``model.segformer``;
    ``model.gate_init`` applies to all three. The baselines read their own sub-sections
    (``model.vpt``, ``model.adaptformer``, ``model.lora``, ``model.evp``); linear probing, full
    fine-tuning and SSF have no settings.

    ``family`` says which library builds ``backbone``: "timm" (ViT and Swin classifiers) or
    "segformer" (Hugging Face ``SegformerForSemanticSegmentation``, for segmentation). "auto"
    picks "segformer" when the name contains "segformer" or "mit-b" (any case), else "timm"; a
    local ``save_pretrained`` folder named otherwise needs ``model.family=segformer``.
    """

    # OpenAI's CLIP ViT-B/16 (the paper's backbone) with its native QuickGELU activation.
    backbone: str = "vit_base_patch16_clip_quickgelu_224.openai"
    family: Literal["auto", "timm", "segformer"] = "auto"
    # Extra timm.create_model arguments (e.g. a smaller Swin for tests: embed_dim, depths, num_heads);
    # for SegFormer, Hugging Face SegformerConfig fields (e.g. hidden_sizes, depths for a tiny MiT).
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    # "pretrained": timm's hub weights, or ``weights_file`` when given (no network needed); for
    # SegFormer, ``backbone`` names a hub model, a local save_pretrained folder or a cached model.
    # "stand-in": the architecture pre-trained here on a synthetic source task by the pretrain
    # step (``dvpt pretrain``; SegFormer on a segmentation one), read from ``weights_file``; a
    # stand-in for a foundation model where none can be downloaded, and every output says so.
    # "random": random initialisation, for tests and smoke runs only; every output says so.
    weights: Literal["pretrained", "stand-in", "random"] = "pretrained"
    # Checked when the backbone is built, not here: the pretrain step may not have written it yet.
    weights_file: Path | None = None
    # Seed of a random initialisation, so the same "random" backbone can be rebuilt to load an adapter.
    init_seed: int = 0
    image_size: int = Field(default=224, ge=16)
    method: Literal["dvpt", "linear", "full", "vpt_shallow", "vpt_deep", "ssf", "adaptformer", "lora", "evp"] = "dvpt"
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
    # Normalise inputs with the backbone's pretraining mean/std. False feeds [0, 1] pixels, as the
    # authors' released Swin training script does (it only applies ToTensor).
    normalise: bool = True
    # Keep the backbone's own frozen head as a projection before the classifier
    # (CLIP: 768 -> 512). None decides from the backbone: True for CLIP image towers.
    frozen_projection: bool | None = None
    swin: SwinDVPTConfig = Field(default_factory=SwinDVPTConfig)
    segformer: SegFormerConfig = Field(default_factory=SegFormerConfig)
    vpt: VPTConfig = Field(default_factory=VPTConfig)
    adaptformer: AdaptFormerConfig = Field(default_factory=AdaptFormerConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    evp: EVPConfig = Field(default_factory=EVPConfig)

    @model_validator(mode="after")
    def _stand_in_has_a_file(self) -> "ModelConfig":
        if self.weights == "stand-in" and self.weights_file is None:
            raise ValueError("model.weights=stand-in needs model.weights_file: where the pretrain step writes "
                             "the backbone (e.g. outputs/pretrain/backbone.safetensors)")
        return self

    @field_validator("backbone_kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted(RESERVED_BACKBONE_KWARGS & set(value))
        if reserved:
            raise ValueError(
                f"set {reserved} through model.image_size / model.weights / data.class_names, "
                "not model.backbone_kwargs"
            )
        return value

    @model_validator(mode="after")
    def _weights_file_is_for_timm(self) -> "ModelConfig":
        if self.resolved_family == "segformer" and self.weights_file is not None and self.weights != "stand-in":
            raise ValueError(
                "model.weights_file is a timm checkpoint file, or for SegFormer only the pretrain step's "
                "stand-in (model.weights=stand-in); for pretrained SegFormer weights give a save_pretrained "
                f"folder (or a hub name) as model.backbone instead (got model.backbone={self.backbone!r})"
            )
        return self

    @property
    def resolved_family(self) -> Literal["timm", "segformer"]:
        """``family``, with "auto" decided from the backbone's name (see the class docstring)."""
        if self.family != "auto":
            return self.family
        name = self.backbone.lower()
        return "segformer" if any(marker in name for marker in SEGFORMER_NAME_MARKERS) else "timm"


class TrainConfig(_Strict):
    """Optimisation. Defaults follow the paper's DDR setting (section 4.1.3) where it gives one.

    The learning rate warms up linearly over ``warmup_epochs`` (per step) to exactly ``lr``, then
    follows a cosine to zero over the remaining steps. ``weight_decay_on``: "weights" (default)
    decays only matrices and convolution kernels, never biases, norms, gates, prompts or position
    embeddings (decaying a prompt or a zero-initialised gate pulls it towards "no adaptation");
    "all" decays every trainable tensor, as the authors' released code does.
    """

    epochs: int = Field(default=80, ge=1)
    # The global batch: under torchrun each of the N processes takes batch_size / N of it
    # (``dvpt_core.distributed``), and training is one process's up to rounding.
    batch_size: int = Field(default=70, ge=1)
    lr: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    weight_decay_on: Literal["weights", "all"] = "weights"
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
    # Further augmentation, off by default; the authors' released Swin script uses rotations of up
    # to 180 degrees, translations of 10% and colour jitter (brightness, contrast, saturation, hue)
    # of (0.2, 0.2, 0.1, 0.1): see the ddr-paper-swin preset.
    rotation: float = Field(default=0.0, ge=0, le=180)
    translate: float = Field(default=0.0, ge=0, lt=1)
    color_jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    # Stop after this many optimiser steps per epoch (None: the whole split). For smoke runs.
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    # Under torchrun: how long a process waits in a collective (for a peer that died or hangs,
    # or for rank 0's validation and MLflow calls) before it fails instead of waiting for ever.
    process_group_timeout_s: float = Field(default=1800.0, gt=0)


class PretrainConfig(_Strict):
    """The stand-in foundation model (``model.weights=stand-in``): ``model``'s architecture
    (backbone, backbone_kwargs, image_size) trained from scratch (initialised with ``seed``), fully, on a
    synthetic SOURCE task (a different domain and task from the target): for timm classifiers
    ``dvpt_core.data.synthetic.source`` (coloured dots on cluttered scenes, 8 classes), for SegFormer
    ``dvpt_core.data.synthetic.source_segmentation`` (discs, squares and triangles on the same
    scenes, 4 classes with the background). Sizes are images per split (class-balanced for
    classification); the optimisation mirrors ``train``'s. Deterministic for given settings, so the step's
    output is cached by them (DVC's run cache, the KFP cache, and the step's own key)."""

    train: int = Field(default=1200, ge=8)
    valid: int = Field(default=120, ge=8)
    test: int = Field(default=120, ge=8)
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: int = Field(default=1, ge=0)
    seed: int = 0


class TrackingConfig(_Strict):
    """MLflow. ``tracking_uri`` None means $MLFLOW_TRACKING_URI, else a local SQLite file."""

    tracking_uri: str | None = None
    experiment: str = "dvpt"
    registered_model: str = "dvpt-adapter"
    alias: str = "challenger"
    # Every call to a tracking server is bounded (seconds, not MLflow's default of minutes): a
    # request waits at most ``request_timeout_s`` and is retried ``request_retries`` times. A run
    # whose server went away during training is finished locally, then synced for up to
    # ``sync_wait_s`` before the step fails with the command that syncs it later (`dvpt sync`).
    request_timeout_s: float = Field(default=10.0, gt=0)
    request_retries: int = Field(default=2, ge=0)
    sync_wait_s: float = Field(default=60.0, ge=0)
    # Inside `dvc exp run` the register step records the run but creates no model version (and
    # moves no alias) unless this is true: trying settings should not touch the registry.
    register_experiments: bool = False

    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


Severity = Literal["error", "warning", "ignore"]


class ValidationConfig(_Strict):
    """What the data gate (``dvpt validate``) makes of findings that may be intended.

    "error" fails validation (nothing downstream runs), "warning" passes it but reports the
    finding in ``validation.json`` (``warnings``), the Data Docs and the log, "ignore" skips the
    check. Each finding names the split, class or file at fault.
    """

    # A class with no sample in the training split (classification: no label; segmentation: no
    # mask showing it): the model never sees it.
    class_missing_from_train: Severity = "error"
    # A class absent from the validation or test split: its metrics are undefined there, but a
    # small split of a rare class can lack it honestly.
    class_missing_from_eval: Severity = "warning"
    # Every sample of the dataset in one class (segmentation: every mask empty): nothing to learn.
    single_class: Severity = "error"
    # Image files in a split folder that the dataset's lists do not name (DDR's ``<split>.txt``, a
    # ``csv`` table): they are never read, which is usually an incomplete list.
    unlisted_files: Severity = "warning"
class PromotionConfig(_Strict):
    """The quality gate that moves the ``champion`` alias (``dvpt promote``).

    The challenger is compared with the current champion of the same registered model on the
    same test samples by the task's primary metric (quadratic kappa for classification, mean
    Dice for segmentation), with a paired bootstrap confidence interval of the difference
    (challenger minus champion): ``resamples`` resamples of the test samples, seeded with
    ``seed``, percentile interval at ``confidence``. ``rule``: "non_inferiority" promotes when
    the interval's lower bound is above ``-margin``; "superiority" when it is above 0. Either way
    the challenger's own metric must reach ``floor``, which is also all a first version (no
    champion yet) must clear. A backbone on RANDOM WEIGHTS is never promoted. Versions evaluated
    on other data (DVC hash) or other test samples are refused unless ``allow_different_data``,
    and are then compared unpaired (each model resampled on its own test set).
    """

    rule: Literal["non_inferiority", "superiority"] = "non_inferiority"
    # In metric units: kappa differences between the compared methods are about 0.003-0.03.
    margin: float = Field(default=0.01, ge=0)
    floor: float = 0.6
    resamples: int = Field(default=2000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1)
    seed: int = 0
    champion_alias: str = "champion"
    allow_different_data: bool = False
    # How long another promotion's hold on the registry counts before it is taken as crashed.
    lock_timeout_s: float = Field(default=60.0, gt=0)


class ExportConfig(_Strict):
    opset: int = Field(default=18, ge=13)
    parity_atol: float = Field(default=1e-4, gt=0)
    # dynamo: torch.export, PyTorch's maintained exporter; torchscript: the legacy tracer, about ten
    # times faster on these models (the end-to-end tests use it), deprecated by PyTorch. The parity
    # check holds either way.
    exporter: Literal["dynamo", "torchscript"] = "dynamo"


class ExperimentConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        return _validate(json.loads(text), source="JSON configuration")


# The settings a Kubeflow run overrides by name (its typed parameters), and the key each sets. Their
# types and compiled defaults come from the fields above, never from the pipelines.
RUN_PARAMETERS: dict[str, str] = {
    "method": "model.method",
    "epochs": "train.epochs",
    "learning_rate": "train.lr",
    "label_ratio": "data.label_ratio",
    "seed": "train.seed",
}

# A Kubernetes resource quantity ("8", "500m", "16Gi") and a Go duration as Argo reads it ("30s", "10m").
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
DURATION_PATTERN = r"^[0-9]+(s|m|h)$"


class KubeflowConfig(_Strict):
    """How ``dvpt kfp compile`` wires the pipelines into a cluster: where the data comes from, what
    the train step asks the cluster for, how transient steps retry, how wide the comparison fans
    out, and whether training launches as a Training Operator PyTorchJob.

    Settings of a deployment, not of an experiment: not part of :class:`ExperimentConfig` (so never
    in a run's parameters or a checkpoint's key); each is a ``dvpt kfp compile`` flag of its name.
    """

    data_repo: str | None = Field(default=None, description=(
        "git URL of the repository whose DVC remote holds the data: the pipeline parameter data_repo's "
        "default (none: give it when submitting)"))
    data_path: str = Field(default="data", description="the DVC-tracked dataset folder in that repository")
    data_revision: str = Field(default="HEAD", description=(
        "git revision (branch, tag or commit) the data is fetched at unless the run names another"))
    gpus: int = Field(default=0, ge=0, description="accelerators the train step requests (per node of a PyTorchJob)")
    accelerator_type: str = Field(default="nvidia.com/gpu", min_length=1, description=(
        "the accelerator's extended resource name; its NoSchedule taint is tolerated"))
    cpu: str | None = Field(default=None, pattern=QUANTITY_PATTERN, description="CPU request and limit of training")
    memory: str | None = Field(default=None, pattern=QUANTITY_PATTERN,
                               description="memory request and limit of training, e.g. 32Gi")
    retries: int = Field(default=3, ge=0, description=(
        "retries of the steps that fail transiently (the data fetch, the MLflow and registry steps)"))
    backoff: str = Field(default="30s", pattern=DURATION_PATTERN, description="wait before the first retry")
    backoff_factor: float = Field(default=2.0, ge=1, description="each further wait is this much longer")
    backoff_max: str = Field(default="10m", pattern=DURATION_PATTERN, description="the longest wait between retries")
    parallelism: int = Field(default=4, ge=1, description="comparison cells that run at once")
    train_launcher: Literal["pod", "pytorchjob"] = Field(default="pod", description=(
        "pod: train in the pipeline's own pod; pytorchjob: launch torchrun as a Training Operator PyTorchJob"))
    nodes: int = Field(default=1, ge=1, description="PyTorchJob replicas: one Master and nodes - 1 Workers")
    processes_per_node: int = Field(default=1, ge=1, description="torchrun --nproc-per-node (one per GPU)")
    shared_storage: str = Field(default="20Gi", pattern=QUANTITY_PATTERN, description=(
        "size of the ReadWriteMany volume that carries the inputs and the adapter between the pipeline and "
        "the PyTorchJob"))
    storage_class: str | None = Field(default=None, description=(
        "its StorageClass (one that offers ReadWriteMany; none: the cluster's default)"))
    job_timeout_s: int = Field(default=7 * 24 * 3600, gt=0, description="how long the PyTorchJob may run")

    @model_validator(mode="after")
    def _one_gpu_per_process(self) -> "KubeflowConfig":
        if self.train_launcher == "pytorchjob" and self.gpus and self.processes_per_node > self.gpus:
            raise ValueError(f"processes_per_node={self.processes_per_node} exceeds gpus={self.gpus}: torchrun "
                             "gives each process one GPU of its node")
        return self


def with_settings(cfg: ExperimentConfig, settings: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with each dotted key of ``settings`` set to its value, validated as a whole."""
    raw = cfg.model_dump(mode="json")
    for key, value in settings.items():
        _set(raw, key.split("."), value, key)
    return _validate(raw, source=", ".join(f"{key}={value!r}" for key, value in settings.items()))


def with_run_parameters(cfg: ExperimentConfig, **values: Any) -> ExperimentConfig:
    """``cfg`` with the given :data:`RUN_PARAMETERS` (by parameter name) set."""
    unknown = sorted(set(values) - set(RUN_PARAMETERS))
    if unknown:
        raise ConfigError(f"unknown run parameter(s) {unknown}; known: {sorted(RUN_PARAMETERS)}")
    return with_settings(cfg, {RUN_PARAMETERS[name]: value for name, value in values.items()})


def explicit_keys(section: BaseModel, prefix: str = "") -> set[str]:
    """Dotted keys of the settings given explicitly (by a preset, a params file, ``--set`` or a
    JSON configuration) rather than left at the schema's defaults.

    Pydantic records which fields an input set; a step uses this to refuse a setting it would
    otherwise ignore (see ``peft.adapter.check_against_adapter``). A configuration parsed from
    JSON (a Kubeflow task's) sets every key.
    """
    keys: set[str] = set()
    for name in section.model_fields_set:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            keys |= explicit_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def setting_value(cfg: BaseModel, key: str) -> Any:
    """The JSON form of the setting at dotted ``key`` (so a Path compares as its string)."""
    value: Any = cfg.model_dump(mode="json")
    for part in key.split("."):
        value = value[part]
    return value


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
        _set(raw, path, value, item)
    return raw


def _set(raw: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    """``raw`` with the setting at ``path`` (sections created as needed); ``item`` names it in errors."""
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[path[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
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
