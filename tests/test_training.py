"""The train step's optimisation settings and the lineage it records in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.optim import make_optimizer, make_scheduler, parameter_groups
from dvpt_core.peft import build_model
from dvpt_core.steps.evaluate import evaluate
from dvpt_core.steps.preprocess import preprocess
from dvpt_core.steps.train import train
from dvpt_core.steps.validate import validate
from tests.helpers import tiny_config

# --- learning-rate schedule and weight decay ------------------------------------------------------


@pytest.mark.parametrize(("epochs", "warmup", "steps"), [(8, 1, 15), (5, 2, 3), (80, 5, 91)])
def test_warmup_ends_exactly_at_the_peak_then_decays_to_zero(epochs: int, warmup: int, steps: int) -> None:
    peak = 0.008
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = make_scheduler(optimizer, peak, epochs, warmup, steps)
    lrs = []
    for step in range(epochs * steps + 1):
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    end_of_warmup = warmup * steps
    assert lrs[0] == pytest.approx(peak * 1e-3)
    assert all(a < b for a, b in zip(lrs[:end_of_warmup], lrs[1:end_of_warmup + 1]))
    assert lrs[end_of_warmup] == pytest.approx(peak, rel=1e-12)
    assert max(lrs) == pytest.approx(peak, rel=1e-12)
    # Cosine over the remaining steps: half-way through them the LR is half the peak.
    middle = end_of_warmup + (epochs * steps - end_of_warmup) // 2
    if (epochs * steps - end_of_warmup) % 2 == 0:
        assert lrs[middle] == pytest.approx(peak / 2, rel=1e-9)
    assert lrs[-1] == pytest.approx(0.0, abs=peak * 1e-6)


def test_no_warmup_starts_at_the_peak() -> None:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    scheduler = make_scheduler(optimizer, 0.01, 4, 0, 10)
    scheduler.step_update(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def _decayed_names(model: torch.nn.Module, on: str) -> set[str]:
    ids = {id(p) for g in parameter_groups(model, 0.05, on) if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_spares_biases_norms_gates_prompts_and_position_embeddings() -> None:
    model = build_model(tiny_config("model.method=dvpt"))
    decayed = _decayed_names(model, "weights")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in trainable if n.endswith(("down.weight", "up.weight")) or n == "classifier.weight"}
    assert decayed == expected and expected
    assert {"prompts", "prompt_pos"} <= trainable - decayed
    assert all(n.endswith(("bias", "gate")) for n in trainable - decayed - {"prompts", "prompt_pos"})
    assert _decayed_names(model, "all") == trainable


def test_full_fine_tuning_spares_cls_token_position_embedding_and_norms() -> None:
    model = build_model(tiny_config("model.method=full"))
    decayed = _decayed_names(model, "weights")
    assert "backbone.cls_token" not in decayed and "backbone.pos_embed" not in decayed
    assert not any("norm" in n for n in decayed)
    assert "backbone.blocks.0.attn.qkv.weight" in decayed and "backbone.patch_embed.proj.weight" in decayed


def test_optimizer_holds_every_trainable_tensor_once() -> None:
    model = build_model(tiny_config("model.method=dvpt"))
    optimizer = make_optimizer(model, 0.01, 1e-4)
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == sum(1 for p in model.parameters() if p.requires_grad)


# --- lineage in MLflow ----------------------------------------------------------------------------

DVC_MD5 = "0123456789abcdef0123456789abcdef.dir"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny DDR data with a DVC pointer beside it, validated and preprocessed once."""
    root = tmp_path_factory.mktemp("lineage")
    cfg = tiny_config()
    generate_dataset(root / "data", cfg)
    (root / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": DVC_MD5, "path": "data"}]}))
    validate(cfg, root / "data", root / "validation")
    preprocess(cfg, root / "data", root / "cache", root / "validation")
    return {"root": root, "data": root / "data", "validation": root / "validation", "cache": root / "cache"}


@pytest.mark.slow
def test_train_records_inputs_validation_names_and_the_logged_model(prepared: dict[str, Path], tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_config(f"tracking.tracking_uri={uri}", "train.epochs=2")
    first = train(cfg, prepared["cache"], tmp_path / "a", data_root=prepared["data"],
                  validation_dir=prepared["validation"])
    second = train(cfg, prepared["cache"], tmp_path / "b", data_root=prepared["data"])
    client = mlflow.MlflowClient(uri)
    run = client.get_run(first["run_id"])

    # Seeded alike, named apart; the name says what ran.
    assert first["run_name"] != second["run_name"]
    assert run.info.run_name.startswith("dvpt-vit_tiny_patch16_224-")

    inputs = {d.tags[0].value if d.tags else "": d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}
    assert {d.digest for d in inputs.values()} == {DVC_MD5}
    assert inputs["training"].name == "data:train" and str(prepared["data"]) in inputs["training"].source
    assert run.data.tags["data_dvc_md5"] == DVC_MD5 and run.data.tags["random_weights"] == "true"
    assert run.data.tags["stand_in_weights"] == "false" and "RANDOM WEIGHTS" in run.data.tags["WARNING"]

    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "validation")}
    assert artifacts == {"validation/validation.json", "validation/data_docs"}

    logged = client.get_logged_model(first["model_id"])
    assert logged.source_run_id == first["run_id"]
    assert {m.key for m in logged.metrics} >= {"best_val_kappa", "best_epoch"}

    evaluate(cfg, prepared["cache"], tmp_path / "a", tmp_path / "evaluation")
    logged = client.get_logged_model(first["model_id"])
    assert {m.key for m in logged.metrics} >= {"test_kappa", "test_accuracy"}


# --- the stand-in foundation model ----------------------------------------------------------------

STAND_IN = ["pretrain.train=16", "pretrain.valid=8", "pretrain.test=8", "pretrain.epochs=1",
            "pretrain.batch_size=8", "model.image_size=32"]


def test_pretrain_is_deterministic_cached_and_loads_as_a_loud_stand_in(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from dvpt_core.models.backbone import BackboneError, create_backbone
    from dvpt_core.steps.pretrain import BACKBONE_FILE, pretrain

    cfg = tiny_config(*STAND_IN)
    first = pretrain(cfg, tmp_path / "a")
    stamp = (tmp_path / "a" / BACKBONE_FILE).stat().st_mtime_ns
    again = pretrain(cfg, tmp_path / "a")
    assert again == first and (tmp_path / "a" / BACKBONE_FILE).stat().st_mtime_ns == stamp
    pretrain(cfg, tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / BACKBONE_FILE)), load_file(str(tmp_path / "b" / BACKBONE_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert 0.0 <= first["source_test_accuracy"] <= 1.0 and first["stand_in"] is True

    model_cfg = cfg.model.model_copy(update={"weights": "stand-in", "weights_file": tmp_path / "a" / BACKBONE_FILE})
    backbone, info = create_backbone(model_cfg)
    assert info.stand_in and not info.random_weights and info.weights_label == "STAND-IN WEIGHTS"
    state = backbone.state_dict()
    assert all(torch.equal(state[k], a[k]) for k in a)

    # Changed settings train a new stand-in; an ordinary checkpoint is no stand-in.
    other = pretrain(tiny_config(*STAND_IN, "pretrain.seed=1"), tmp_path / "a")
    assert other["settings_key"] != first["settings_key"]
    plain = tmp_path / "plain.safetensors"
    save_file(dict(b), str(plain))
    with pytest.raises(BackboneError, match="not written by the pretrain step"):
        create_backbone(model_cfg.model_copy(update={"weights_file": plain}))
    with pytest.raises(BackboneError, match="run the pretrain step first"):
        create_backbone(model_cfg.model_copy(update={"weights_file": tmp_path / "missing.safetensors"}))
    assert not create_backbone(model_cfg.model_copy(update={"weights": "pretrained", "weights_file": plain}))[1].stand_in


def test_stand_in_needs_a_weights_file() -> None:
    from dvpt_core.config import ConfigError

    with pytest.raises(ConfigError, match="model.weights=stand-in needs model.weights_file"):
        tiny_config("model.weights=stand-in")


# --- the released Swin script's choices, as settings ------------------------------------------------


def test_frozen_stochastic_depth_follows_the_model_mode_and_nothing_else_does() -> None:
    from timm.layers import DropPath

    model = build_model(tiny_config("model.method=dvpt", "model.backbone_kwargs={drop_path_rate: 0.5}"))
    model.train()
    drop_paths = [m for m in model.backbone.modules() if isinstance(m, DropPath)]
    assert drop_paths and all(m.training for m in drop_paths)
    assert not model.backbone.norm.training and not model.backbone.blocks[0].attn.training
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    first = model(x)
    torch.manual_seed(1)
    assert not torch.equal(first, model(x))
    model.eval()
    assert not any(m.training for m in drop_paths) and torch.equal(model(x), model(x))


def test_unnormalised_inputs_and_the_released_augmentations() -> None:
    from dvpt_core.data.transforms import apply, build_transform

    cfg = tiny_config("model.normalise=false", "train.rotation=180", "train.translate=0.1",
                      "train.color_jitter=[0.2, 0.2, 0.1, 0.1]", "train.crop_scale=[1.0, 1.0]")
    info = build_model(cfg).info
    assert info.mean == (0.0, 0.0, 0.0) and info.std == (1.0, 1.0, 1.0)
    transform = build_transform(32, info.mean, info.std, cfg.train)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :8, :8] = 255
    mask = (image[0] > 0).to(torch.uint8)
    torch.manual_seed(3)
    out, moved = apply(transform, image, mask)
    # The square moved (rotated/translated) and the mask moved with it, nearest-neighbour.
    assert not torch.equal(moved, mask.long()) and set(moved.unique().tolist()) <= {0, 1}
    inside = out[0][moved.bool()]
    assert inside.numel() and inside.mean() > 0.5 > out[0][~moved.bool()].mean()
