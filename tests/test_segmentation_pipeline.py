"""Segmentation through every step and driver: a tiny random SegFormer trained, evaluated, exported
and registered on tiny synthetic Kvasir data by the step functions; 3D evaluation of synthetic
ACDC volumes (restacked, scored per volume, written as NIfTI); the validation Dice that selects
the best epoch; and, marked slow, `dvc repro` and the local Kubeflow run end to end. Scores are
checked against medpy on the predictions, never against the code under test."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import mlflow
import nibabel
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from PIL import Image

from dvpt_core.config import ConfigError, load_config
from dvpt_core.data.dataset import CachedSplit, make_loader
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import AdapterError, config_for_adapter, load_adapter, save_adapter
from dvpt_core.runtime import seed_everything
from dvpt_core.steps.compare import rank, summarise
from dvpt_core.steps.evaluate import evaluate
from dvpt_core.steps.export import export
from dvpt_core.steps.predict import predict
from dvpt_core.steps.preprocess import preprocess
from dvpt_core.steps.register import register
from dvpt_core.steps.train import train
from dvpt_core.tasks import Prediction, get_task
from dvpt_core.tasks.classification import ClassificationTask
from dvpt_core.tasks.segmentation import SegmentationTask
from tests.helpers import TINY, TINY_SEGFORMER, tiny_config, tiny_segformer_config, validated
from tests.test_segmentation_metrics import transunet_reference

KVASIR = ["data.format=kvasir", "synthetic.seg_images=20", "synthetic.image_size=64", "train.epochs=3",
          "train.lr=0.01", "data.fold=1"]
ACDC = ["data.format=acdc", "data.class_names=[background, RV, MYO, LV]", "synthetic.volumes=5",
        "synthetic.slices=3", "synthetic.image_size=48"]


def _prepared(root: Path, *overrides: str) -> Path:
    """Synthetic data of the configuration, validated and preprocessed into ``root / cache``."""
    cfg = tiny_segformer_config(*overrides)
    root.mkdir(parents=True, exist_ok=True)
    generate_dataset(root / "data", cfg)
    preprocess(cfg, root / "data", root / "cache", validated(cfg, root / "data", root / "validation"))
    return root


def _argmax(model: torch.nn.Module, split: CachedSplit) -> np.ndarray:
    """The model's label maps for a whole (small) cached split, in cache order, as one batch: as
    the steps' loaders batch it (8 at a time), so the arithmetic is the same."""
    with torch.no_grad():
        return model(torch.stack([split[i][0] for i in range(len(split))])).argmax(1).numpy()


def _random_head(model: torch.nn.Module) -> torch.nn.Module:
    """An untrained model whose classifier is random (a new one starts at zero: all background),
    so its label maps hold every class in patches, as a trained one's would."""
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    return model


def _mean_dice(preds: np.ndarray, truths: np.ndarray, num_classes: int) -> float:
    """Mean over cases and foreground classes of medpy's Dice with the published empty-mask rules."""
    return float(np.mean([[transunet_reference(p == k, t == k, None)[0] for k in range(1, num_classes)]
                          for p, t in zip(preds, truths)]))


@pytest.fixture(scope="module")
def kvasir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny SegFormer trained on fold 1 of tiny synthetic Kvasir, then evaluated and exported."""
    root = _prepared(tmp_path_factory.mktemp("kvasir"), *KVASIR)
    cfg = tiny_segformer_config(*KVASIR, f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
                                "tracking.registered_model=seg-tiny")
    summary = train(cfg, root / "cache", root / "train", data_root=root / "data", validation_dir=root / "validation")
    report = evaluate(cfg, root / "cache", root / "train", root / "evaluation")
    exported = export(cfg, root / "cache", root / "train", root / "export")
    return {"root": root, "cfg": cfg, "summary": summary, "report": report, "export": exported,
            "model": load_adapter(root / "train" / "adapter")}


def test_train_keeps_the_epoch_of_best_validation_dice(kvasir: dict) -> None:
    root, summary, model = kvasir["root"], kvasir["summary"], kvasir["model"]
    with (root / "train" / "history.csv").open(newline="") as handle:
        history = list(csv.DictReader(handle))
    assert list(history[0]) == ["epoch", "train_loss", "lr", "val_loss", "val_iou", "val_dice"]
    dice = [float(row["val_dice"]) for row in history]
    assert summary["best_epoch"] == 1 + int(np.argmax(dice)) and summary["best_val_dice"] == max(dice)
    assert summary["task"] == "segmentation" and summary["selection_metric"] == "dice"
    # The adapter kept is the best epoch's: its validation Dice, recomputed with medpy, is that epoch's.
    valid = CachedSplit(root / "cache" / "valid", model.info.mean, model.info.std)
    assert _mean_dice(_argmax(model, valid), valid.masks, 2) == pytest.approx(max(dice), abs=1e-9)
    logged = mlflow.MlflowClient(kvasir["cfg"].tracking.tracking_uri).get_logged_model(summary["model_id"])
    assert {m.key for m in logged.metrics} >= {"best_val_dice", "best_epoch", "test_dice", "test_hd95_polyp"}


class _ScriptedDice(SegmentationTask):
    """The segmentation task with its validation Dice replaced by a script, recording the trainable
    tensors each epoch ended with: the selection, not the model, is under test."""

    def __init__(self, script: list[float]) -> None:
        self.script, self.states = list(script), []

    def validate(self, run: Prediction) -> dict[str, float]:
        self.states.append({k: v.clone() for k, v in run.model.trainable_state_dict().items()})
        return {**super().validate(run), "val_dice": self.script.pop(0)}


def test_the_adapter_is_the_epoch_of_best_validation_dice_not_the_last(kvasir: dict, tmp_path, monkeypatch) -> None:
    task = _ScriptedDice([0.2, 0.5, 0.5, 0.3])
    monkeypatch.setattr("dvpt_core.steps.train.get_task", lambda name: task)
    cfg = tiny_segformer_config(*KVASIR, "train.epochs=4", "train.max_steps_per_epoch=1",
                                f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    summary = train(cfg, kvasir["root"] / "cache", tmp_path / "train")
    assert (summary["best_epoch"], summary["best_val_dice"]) == (2, 0.5), "the earliest of the best"
    saved = load_adapter(tmp_path / "train" / "adapter").trainable_state_dict()
    assert all(torch.equal(saved[k], task.states[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], task.states[3][k]) for k in saved)


def test_evaluate_writes_cases_class_table_overlays_and_metrics(kvasir: dict) -> None:
    root, report, model = kvasir["root"], kvasir["report"], kvasir["model"]
    metrics = json.loads((root / "evaluation" / "metrics.json").read_text())
    assert {"dice", "iou", "hd95", "hd95_unit", "cases", "per_class", "split", "random_weights"} <= set(metrics)
    assert metrics["hd95_unit"] == "voxel" and metrics["random_weights"] is True
    assert set(metrics["per_class"]) == {"polyp"} and metrics["per_class"]["polyp"]["dice"] == metrics["dice"]
    test = CachedSplit(root / "cache" / "test", model.info.mean, model.info.std)
    assert metrics["cases"] == len(test)
    preds = _argmax(model, test)
    assert metrics["dice"] == pytest.approx(_mean_dice(preds, test.masks, 2), abs=1e-9)
    expected_hd = np.mean([transunet_reference(p == 1, t == 1, None)[2] for p, t in zip(preds, test.masks)])
    assert metrics["hd95"] == pytest.approx(expected_hd, rel=1e-6)
    with (root / "evaluation" / "cases.csv").open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(test)
    assert "| polyp |" in (root / "evaluation" / "class_table.md").read_text()
    with Image.open(report["figure"]) as figure:
        assert figure.format == "PNG" and Path(report["figure"]).parent == root / "evaluation" / "figures"


def test_export_reproduces_logits_and_masks(kvasir: dict) -> None:
    root, exported, model = kvasir["root"], kvasir["export"], kvasir["model"]
    assert exported["output_shape"] == ["batch", 2, 64, 64] and exported["max_abs_diff"] <= 1e-4
    assert exported["mask_pixels_differing"] == 0 and exported["task"] == "segmentation"
    batch = torch.stack([CachedSplit(root / "cache" / "test", model.info.mean, model.info.std)[i][0] for i in range(3)])
    got = ort.InferenceSession(str(root / "export" / "model.onnx")).run(None, {"images": batch.numpy()})[0]
    with torch.no_grad():
        expected = model(batch).numpy()
    assert got.shape == (3, 2, 64, 64)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))


def test_register_makes_a_segmentation_version_with_its_onnx(kvasir: dict) -> None:
    root, cfg = kvasir["root"], kvasir["cfg"]
    result = register(cfg, root / "train", root / "export", root / "registry")
    version = mlflow.MlflowClient(cfg.tracking.tracking_uri).get_model_version("seg-tiny", result["version"])
    assert version.tags["task"] == "segmentation" and version.tags["onnx_model_uri"].startswith("models:/")
    # The description is the version's model card (dvpt_core.registry.model_card).
    assert version.tags["task"] == "segmentation" and "RANDOM WEIGHTS" in version.description

    # The registered pyfunc answers a label map at the input's own size: the adapter's argmax at the
    # model's size, grown back nearest-neighbour (as evaluation resamples), as a PNG of class indices.
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    uri = f"models:/seg-tiny/{result['version']}"
    pyfunc = mlflow.pyfunc.load_model(uri)
    assert {"mask", "fractions"} <= set(pyfunc.metadata.get_output_schema().input_names())
    image = (np.random.default_rng(3).random((50, 70, 3)) * 255).astype(np.uint8)
    image[10:40, 20:50] = [220, 120, 100]
    answer = pyfunc.predict(pd.DataFrame({"image": [_png_bytes(image)]})).iloc[0]
    with Image.open(io.BytesIO(base64.b64decode(answer["mask"]))) as png:
        mask = np.asarray(png)
    model = kvasir["model"]
    resized = Image.fromarray(image).resize((64, 64), Image.Resampling.BILINEAR)
    batch = (torch.from_numpy(np.asarray(resized)).permute(2, 0, 1).float() / 255 - torch.tensor(
        model.info.mean).view(3, 1, 1)) / torch.tensor(model.info.std).view(3, 1, 1)
    with torch.no_grad():
        small = model(batch[None]).argmax(1)[0].numpy().astype(np.uint8)
    rows, columns = (np.arange(50) * 64 // 50), (np.arange(70) * 64 // 70)
    np.testing.assert_array_equal(mask, small[np.ix_(rows, columns)])
    assert (answer["height"], answer["width"]) == (50, 70)
    assert answer["fractions"]["polyp"] == pytest.approx(float((mask == 1).mean()))

    # Batch inference writes each label map as a PNG and its fractions in the table.
    folder = root / "to_predict"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "sub" / "a.png").write_bytes(_png_bytes(image))
    summary = predict(uri, folder, root / "predicted")
    assert (summary["predicted"], summary["failed"]) == (1, 0)
    row = pd.read_csv(root / "predicted" / "predictions.csv").iloc[0]
    assert row["mask"] == "masks/sub/a.png" and row["fraction_polyp"] == pytest.approx(answer["fractions"]["polyp"])
    with Image.open(root / "predicted" / row["mask"]) as png:
        np.testing.assert_array_equal(np.asarray(png), mask)


def _png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_validation_dice_scores_each_volume_from_its_slices(tmp_path: Path) -> None:
    """On a 3D split the selection score is per volume (its slices' counts summed), not per slice."""
    root = _prepared(tmp_path, *ACDC, "synthetic.volumes=6")
    cfg = tiny_segformer_config(*ACDC, "model.gate_init=0.5")
    seed_everything(0)
    model = _random_head(build_model(cfg)).eval()
    loader = make_loader(root / "cache" / "valid", model.info.mean, model.info.std, False, cfg)
    scores = get_task("segmentation").validate(
        Prediction(model, loader, torch.device("cpu"), False, cfg.data.class_names, root / "cache", "valid"))
    preds = _argmax(model, loader.dataset)
    assert len(np.unique(preds)) > 2, "a random head predicts several classes"
    volumes = np.load(root / "cache" / "valid" / "volumes.npy")
    names = list(dict.fromkeys(volumes))
    assert len(names) >= 2 and len(names) < len(volumes)
    per_volume = [(np.stack(list(preds[volumes == v]), -1), np.stack(list(loader.dataset.masks[volumes == v]), -1))
                  for v in names]
    assert scores["val_dice"] == pytest.approx(_mean_dice(*zip(*per_volume), 4), abs=1e-9)
    assert list(scores) == ["val_loss", "val_iou", "val_dice"] and scores["val_loss"] > 0


def test_3d_evaluation_writes_nifti_with_the_input_affine_and_scores_volumes(tmp_path: Path) -> None:
    root = _prepared(tmp_path, *ACDC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_segformer_config(*ACDC, "model.gate_init=0.5", f"tracking.tracking_uri={uri}")
    seed_everything(0)
    model = _random_head(build_model(cfg))
    save_adapter(model, cfg, tmp_path / "train" / "adapter")
    client = mlflow.MlflowClient(uri)
    run = client.create_run("0")  # a new store's Default experiment; evaluate logs to this run
    (tmp_path / "train" / "run.json").write_text(json.dumps({"run_id": run.info.run_id}))

    report = evaluate(cfg, root / "cache", tmp_path / "train", tmp_path / "evaluation")

    assert report["hd95_unit"] == "mm" and set(report["per_class"]) == {"RV", "MYO", "LV"}
    written = sorted((tmp_path / "evaluation" / "volumes").glob("*.nii.gz"))
    with (tmp_path / "evaluation" / "cases.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["case"] for row in rows} == {p.name.removesuffix(".nii.gz") for p in written} and written
    assert report["cases"] == len(written) and len(rows) == 3 * len(written)
    for path in written:
        volume = path.name.removesuffix(".nii.gz")
        source = next((root / "data").glob(f"training/*/{volume}.nii.gz"))
        truth = nibabel.load(source.with_name(f"{volume}_gt.nii.gz"))
        predicted = nibabel.load(path)
        assert np.array_equal(predicted.affine, nibabel.load(source).affine) and predicted.shape == truth.shape
        spacing = truth.header.get_zooms()[:3]
        for row in (r for r in rows if r["case"] == volume):
            k = ["RV", "MYO", "LV"].index(row["class"]) + 1
            dice, _, hd = transunet_reference(np.asarray(predicted.dataobj) == k, np.asarray(truth.dataobj) == k,
                                              spacing)
            assert float(row["dice"]) == pytest.approx(dice) and float(row["hd95"]) == pytest.approx(hd, rel=1e-6)
    assert {"test_dice", "test_hd95", "test_dice_LV"} <= set(client.get_run(run.info.run_id).data.metrics)


def test_an_adapter_fixes_its_task_and_a_cache_its_task(tmp_path: Path) -> None:
    cfg = tiny_segformer_config()
    save_adapter(build_model(cfg), cfg, tmp_path / "adapter")
    assert config_for_adapter(load_config(), tmp_path / "adapter").data.task == "segmentation"
    with pytest.raises(AdapterError, match="data.task='classification' \\(the adapter has 'segmentation'\\)"):
        config_for_adapter(load_config(None, ["data.task=classification"]), tmp_path / "adapter")
    root = _prepared(tmp_path / "data-kvasir", "data.format=kvasir", "synthetic.seg_images=10",
                     "synthetic.image_size=32")
    with pytest.raises(ConfigError, match="data.task=classification but .* was preprocessed for segmentation"):
        train(tiny_config(), root / "cache", tmp_path / "train")


def test_served_answers_are_label_maps_at_the_input_size_and_class_probabilities() -> None:
    logits = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
    answers = SegmentationTask().answers(logits, ["background", "a", "b"], [(5, 4), (10, 12)])
    for answer, label_map, (height, width) in zip(answers, logits.argmax(1), [(5, 4), (10, 12)]):
        with Image.open(io.BytesIO(base64.b64decode(answer["mask"]))) as png:
            mask = np.asarray(png)
        # Nearest-neighbour growth: output pixel (i, j) takes input pixel (i * 5 // h, j * 4 // w).
        assert mask.dtype == np.uint8 and mask.shape == (height, width)
        np.testing.assert_array_equal(mask, label_map[np.ix_(np.arange(height) * 5 // height,
                                                             np.arange(width) * 4 // width)])
        counts = [int((mask == k).sum()) for k in range(3)]
        assert answer["fractions"] == {n: c / mask.size for n, c in zip(["background", "a", "b"], counts)}
        assert answer["classes"] == [n for n, c in zip(["background", "a", "b"], counts) if c]
    scores = logits[:, :, 0, 0]
    served = ClassificationTask().answers(scores, ["x", "y", "z"], [(1, 1)] * 2)
    expected = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    np.testing.assert_allclose([list(a["probabilities"].values()) for a in served], expected, rtol=1e-6)
    assert [a["label"] for a in served] == [["x", "y", "z"][i] for i in scores.argmax(1)]
    assert [a["index"] for a in served] == list(scores.argmax(1))


def test_comparisons_rank_segmentation_by_dice() -> None:
    metrics = SegmentationTask.comparison_metrics
    rows = [{"run_id": f"{m}{s}", "method": m, "seed": s, "label_ratio": 1.0, "trainable": 1, "random_weights": True,
             "dice": d, "iou": d / (2 - d), "hd95": h} for m, s, d, h in
            [("lora", 0, 0.6, 5.0), ("lora", 1, 0.7, 4.0), ("dvpt", 0, 0.8, 9.0), ("dvpt", 1, 0.75, 8.0)]]
    ranking = rank(summarise(rows, metrics), SegmentationTask.selection_metric)
    assert [(r["method"], r["dice_mean_over_ratios"]) for r in ranking] == [("dvpt", pytest.approx(0.775)),
                                                                           ("lora", pytest.approx(0.65))]


# --- the drivers, end to end ---------------------------------------------------------------------

SLOW_KVASIR = [*KVASIR, "train.epochs=2", "data.label_ratio=0.5"]


@pytest.mark.slow
def test_dvc_repro_trains_evaluates_exports_and_registers_a_segmenter(tmp_path, mlflow_server) -> None:
    from tests.test_dvc_pipeline import _dvc, dvc_params, dvc_project

    name = "dvc-seg-tiny"
    params = dvc_params([*TINY, *TINY_SEGFORMER, *SLOW_KVASIR, f"tracking.tracking_uri={mlflow_server}",
                         f"tracking.registered_model={name}"])
    project = dvc_project(tmp_path / "project", params)
    repro = _dvc(project, "repro")
    assert repro.returncode == 0, repro.stdout + repro.stderr
    for stage in ("validate", "preprocess", "train", "evaluate", "export", "register"):
        assert f"Running stage '{stage}'" in repro.stdout

    metrics = json.loads((project / "outputs/evaluation/metrics.json").read_text())
    assert 0 <= metrics["dice"] <= 1 and metrics["hd95_unit"] == "voxel" and "polyp" in metrics["per_class"]
    exported = json.loads((project / "outputs/export/export.json").read_text())
    assert exported["output_shape"] == ["batch", 2, 64, 64] and exported["mask_pixels_differing"] == 0
    registered = json.loads((project / "outputs/registry/registered.json").read_text())
    version = mlflow.MlflowClient(mlflow_server).get_model_version_by_alias(name, "challenger")
    assert version.version == registered["version"] and version.tags["task"] == "segmentation"
    shown = _dvc(project, "metrics", "show", "--json")
    assert shown.returncode == 0 and '"dice"' in shown.stdout
    plots = json.loads(_dvc(project, "plots", "show", "--json").stdout)
    assert not plots.get("errors")
    assert {"Loss", "outputs/train/history.csv", "outputs/evaluation/figures/overlays.png"} <= set(plots["data"])


@pytest.mark.slow
def test_local_kfp_run_trains_evaluates_exports_and_registers_a_segmenter(tmp_path, mlflow_server) -> None:
    from pipelines.dvpt_pipeline import run_local

    name = "kfp-seg-tiny"
    cfg = tiny_segformer_config(*SLOW_KVASIR, f"tracking.tracking_uri={mlflow_server}",
                                f"tracking.registered_model={name}", "tracking.experiment=kfp-seg-tests")
    generate_dataset(tmp_path / "data", cfg)

    result = run_local(cfg, tmp_path / "data", tmp_path / "kfp")

    assert result["alias"] == "challenger" and result["random_weights"] == "true"
    assert {"dice", "iou", "hd95", "per_class.polyp.dice"} <= set(result["test_metrics"])
    version = mlflow.MlflowClient(mlflow_server).get_model_version_by_alias(name, "challenger")
    assert version.version == result["version"] and version.tags["task"] == "segmentation"
    run_dir = Path(result["run_dir"])
    page = (run_dir / "evaluate/report").read_text()
    assert "data:image/png;base64," in page and "Image, ground truth and prediction on test" in page
    exported = json.loads((run_dir / "export/onnx_model/export.json").read_text())
    assert exported["output_shape"] == ["batch", 2, 64, 64]
    assert "| polyp |" in (run_dir / "evaluate/evaluation/class_table.md").read_text()
