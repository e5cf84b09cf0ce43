"""Pipeline steps through their public functions: behaviour that only shows over several epochs or
across methods (the best epoch is the one kept; the adapter holds exactly the method's trainable
tensors), the test metrics against scikit-learn on the saved adapter's own predictions, and the
alias the register step moves.

The preprocessed cache is written by hand (the arrays ``preprocess`` would write), so the
validation labels can be chosen: they are the training images with every grade reversed, so the
better the model fits its training labels, the worse its validation kappa, and the validation
curve peaks early by construction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix

from dvpt_core.config import ConfigError, ExperimentConfig
from dvpt_core.data.cache_layout import IMAGES_FILE, LABELS_FILE, META_FILE, SPLITS_FILE
from dvpt_core.data.splits import SPLITS_COLUMNS
from dvpt_core.data.dataset import make_loader
from dvpt_core.engine import predict
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import load_adapter
from dvpt_core.steps.evaluate import evaluate
from dvpt_core.tasks import classification as classification_task
from dvpt_core.checkpoint import CHECKPOINT_FILE
from dvpt_core.steps import sync as sync_step
from dvpt_core.steps import train as train_step
from dvpt_core.steps import register as register_step
from dvpt_core.steps.register import RegistrationError, register
from dvpt_core.steps.train import ACTIVE_FILE, train
from dvpt_core.tracking import TrackingUnavailable
from tests.helpers import tiny_config, tiny_segformer_config
from tests.test_methods import OWN

SIZE, N = 32, 20
GRADES = list(range(5))


def write_split(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    directory.mkdir(parents=True)
    np.save(directory / IMAGES_FILE, images)
    np.save(directory / LABELS_FILE, labels.astype(np.int64))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache whose validation split reverses the training grades; MLflow in a SQLite file there."""
    root = tmp_path_factory.mktemp("steps")
    rng = np.random.default_rng(0)
    labels = np.arange(N) % 5
    # Each grade has its own brightness, so the grades are learnable in a few steps.
    images = np.clip(rng.normal(40 + 40 * labels[:, None, None, None], 20, size=(N, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    write_split(root / "cache" / "train", images, labels)
    write_split(root / "cache" / "valid", images, 4 - labels)
    write_split(root / "cache" / "test", images, labels)
    (root / "cache" / META_FILE).write_text(json.dumps({"task": "classification", "image_size": SIZE}))
    rows = [f"{split}/{i}.png,,,,,{label},{split},1,{split}{i:040d}" for split, grades in
            (("train", labels), ("valid", 4 - labels), ("test", labels)) for i, label in enumerate(grades)]
    (root / "cache" / SPLITS_FILE).write_text("\n".join([",".join(SPLITS_COLUMNS), *rows]) + "\n")
    cwd = Path.cwd()
    os.chdir(root)  # MLflow writes artifacts beside the working directory
    try:
        yield root
    finally:
        os.chdir(cwd)


def config(root: Path, *overrides: str) -> ExperimentConfig:
    return tiny_config(
        "model.backbone_kwargs={depth: 2}", "train.batch_size=10", "train.amp=false", "train.hflip=false",
        "train.vflip=false", "train.crop_scale=[1.0, 1.0]", f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        *overrides,
    )


def adapter_predictions(train_dir: Path, cache: Path, split: str, cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    model = load_adapter(train_dir / "adapter")
    loader = make_loader(cache / split, model.info.mean, model.info.std, False, cfg)
    logits, labels = predict(model, loader, torch.device("cpu"))
    return logits.argmax(1).numpy(), labels.numpy()


@pytest.fixture(scope="module")
def trained(workspace: Path) -> dict:
    # Flips on: training is augmented, and validation must not be (the val_loss check below).
    cfg = config(workspace, "train.epochs=5", "train.lr=0.05", "train.warmup_epochs=0", "model.gate_init=0.1",
                 "train.hflip=true", "train.vflip=true")
    summary = train(cfg, workspace / "cache", workspace / "train")
    return {"cfg": cfg, "summary": summary, "dir": workspace / "train"}


def history(train_dir: Path) -> list[dict[str, float]]:
    lines = (train_dir / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, map(float, line.split(",")))) for line in lines[1:]]


def test_the_best_epoch_by_validation_kappa_is_kept_not_the_last(trained: dict, workspace: Path) -> None:
    rows = history(trained["dir"])
    kappas = [row["val_kappa"] for row in rows]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4, 5]
    # Two steps an epoch, no warm-up: the cosine from 0.05 to 0 over 10 steps, read after each epoch's last step.
    assert [row["lr"] for row in rows] == pytest.approx([0.025 * (1 + math.cos(math.pi * 2 * e / 10)) for e in range(1, 6)],
                                                        abs=1e-9)
    best = max(range(len(kappas)), key=lambda i: (kappas[i], -i))  # the first of the highest
    assert kappas[best] > kappas[-1], f"the validation curve must peak before the last epoch here: {kappas}"
    summary = trained["summary"]
    assert summary["best_epoch"] == best + 1 and summary["best_val_kappa"] == pytest.approx(kappas[best])
    preds, labels = adapter_predictions(trained["dir"], workspace / "cache", "valid", trained["cfg"])
    saved = cohen_kappa_score(labels, preds, weights="quadratic", labels=GRADES)
    assert saved == pytest.approx(kappas[best], abs=1e-6), "the saved adapter is not the best epoch's"
    model = load_adapter(trained["dir"] / "adapter")
    logits, targets = predict(model, make_loader(workspace / "cache" / "valid", model.info.mean, model.info.std, False,
                                                 trained["cfg"]), torch.device("cpu"))
    loss = float(torch.nn.functional.cross_entropy(logits, targets))
    assert rows[best]["val_loss"] == pytest.approx(loss, rel=1e-5), "validation must see the images unaugmented"
    run = MlflowClient(trained["cfg"].tracking.resolved_uri()).get_run(summary["run_id"])
    assert run.data.metrics["best_epoch"] == best + 1
    assert run.data.metrics["best_val_kappa"] == pytest.approx(kappas[best])


def test_evaluate_scores_the_adapter_like_scikit_learn(trained: dict, workspace: Path, monkeypatch) -> None:
    evaluate(trained["cfg"], workspace / "cache", trained["dir"], workspace / "evaluated" / "test")
    titles: list[str] = []
    plot = classification_task.plot_confusion_matrix
    monkeypatch.setattr(classification_task, "plot_confusion_matrix", lambda *a: titles.append(a[-1]) or plot(*a))
    # Again over its own output (a DVC re-run), with augmentation and shuffling switched on for
    # training: evaluation must use neither.
    augmented = trained["cfg"].model_copy(update={"train": trained["cfg"].train.model_copy(update={
        "hflip": True, "vflip": True, "crop_scale": (0.3, 1.0)})})
    report = evaluate(augmented, workspace / "cache", trained["dir"], workspace / "evaluated" / "test")
    preds, labels = adapter_predictions(trained["dir"], workspace / "cache", "test", trained["cfg"])
    assert report["kappa"] == pytest.approx(cohen_kappa_score(labels, preds, weights="quadratic", labels=GRADES), abs=1e-6)
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert report["confusion_matrix"] == confusion_matrix(labels, preds, labels=GRADES).tolist()
    assert (report["samples"], report["split"], report["random_weights"]) == (N, "test", True)
    assert titles == ["vit_tiny_patch16_224 + dvpt on test (RANDOM WEIGHTS)"], "a plot of random weights must say so"
    # Each per-sample record (what promotion pairs across models) holds that sample's own label and prediction.
    records = json.loads((workspace / "evaluated" / "test" / "test_samples.json").read_text())
    table = [dict(zip(records["columns"], row)) for row in records["rows"]]
    assert [(r["sample"], r["label"], r["pred"]) for r in table] == [
        (f"test/{i}.png", int(label), int(pred)) for i, (label, pred) in enumerate(zip(labels, preds))]
    written = json.loads((workspace / "evaluated" / "test" / "metrics.json").read_text())
    assert written == {k: report[k] for k in written}
    assert (workspace / "evaluated" / "test" / "figures" / "confusion_matrix.png").stat().st_size > 0
    client = MlflowClient(trained["cfg"].tracking.resolved_uri())
    metrics = client.get_run(trained["summary"]["run_id"]).data.metrics
    assert metrics["test_kappa"] == pytest.approx(report["kappa"]) and metrics["test_samples"] == N
    logged = {a.path for a in client.list_artifacts(trained["summary"]["run_id"])}
    assert {"metrics.json", "confusion_matrix.png"} <= logged
    assert [a.path for a in client.list_artifacts(trained["summary"]["run_id"], "evaluation")] == ["evaluation/test_samples.json"]


@pytest.mark.parametrize("method", sorted(OWN))
def test_the_saved_adapter_holds_exactly_the_methods_trainable_tensors(method: str, workspace: Path) -> None:
    cfg = config(workspace, f"model.method={method}", "model.vpt.prompts=2", "train.epochs=1", "train.max_steps_per_epoch=1",
                 "tracking.experiment=adapters")
    out = workspace / f"adapter-{method}"
    summary = train(cfg, workspace / "cache", out)
    tensors = load_file(str(out / "adapter" / "adapter.safetensors"))
    expected = {n for n, p in build_model(cfg).named_parameters() if p.requires_grad}
    assert set(tensors) == expected
    assert all(OWN[method](n) or n.startswith("classifier.") for n in tensors)
    assert any(n.startswith("classifier.") for n in tensors) and (method == "linear" or any(OWN[method](n) for n in tensors))
    assert sum(t.numel() for t in tensors.values()) == summary["trainable"]


def tiny_onnx(path: Path) -> Path:
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 5])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 5])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), path)
    return path


def test_register_sets_the_alias_with_the_lineage_and_registers_a_run_once(trained: dict, workspace: Path) -> None:
    cfg = trained["cfg"].model_copy(update={"tracking": trained["cfg"].tracking.model_copy(update={"registered_model": "steps-test"})})
    export_dir = workspace / "export"
    tiny_onnx(export_dir / "model.onnx")  # the register step logs the graph; its content is the export step's concern
    first = register(cfg, trained["dir"], export_dir, workspace / "registry1")
    again = register(cfg, trained["dir"], export_dir, workspace / "registry2")
    assert str(first["version"]) == str(again["version"]) == "1" and first["registered"] is True
    assert first["alias"] == "challenger" and first["model_uri"] == "models:/steps-test@challenger"
    client = MlflowClient(cfg.tracking.resolved_uri())
    assert str(client.get_model_version_by_alias("steps-test", "challenger").version) == "1"
    tags = client.get_model_version("steps-test", "1").tags
    adapter = json.loads((trained["dir"] / "adapter" / "adapter.json").read_text())
    assert (tags["method"], tags["backbone"], tags["random_weights"]) == ("dvpt", adapter["backbone"], "true")
    assert tags["backbone_fingerprint"] == adapter["backbone_fingerprint"]
    assert json.loads((workspace / "registry1" / "registered.json").read_text())["version"] == first["version"]


class StopAtEpoch:
    """The real epoch loop, with ``error`` raised when the given epoch starts (a Ctrl-C, a SIGTERM
    turned into an exception, or a failure such as a collective whose peer died); records the
    progress bar's description of every epoch."""

    def __init__(self, epoch: int, error: BaseException) -> None:
        self.epoch, self.error, self.descriptions = epoch, error, []
        self.real = train_step.train_one_epoch

    def __call__(self, *args, **kwargs) -> float:
        self.descriptions.append(kwargs["desc"])
        if len(self.descriptions) == self.epoch:
            raise self.error
        return self.real(*args, **kwargs)


@pytest.mark.parametrize(("error", "status", "message"), [
    (KeyboardInterrupt(), "KILLED", "training interrupted (Ctrl-C) after 1 epochs; run the same command again to resume from {}"),
    (RuntimeError("peer died " + "x" * 300 + "\nsecond line"), "FAILED",
     "training failed after 1 epochs (" + ("peer died " + "x" * 300)[:200] + "); run the same command again to resume from {}"),
], ids=["ctrl-c", "failure"])
def test_an_interrupted_run_is_closed_keeps_its_checkpoint_and_resumes(workspace: Path, monkeypatch, caplog, error, status,
                                                                       message) -> None:
    cfg = config(workspace, "train.epochs=3", "train.max_steps_per_epoch=1", f"tracking.experiment=lifecycle-{status}")
    out = workspace / "lifecycle" / status  # a folder whose parent does not exist yet
    stop = StopAtEpoch(2, error)
    monkeypatch.setattr(train_step, "train_one_epoch", stop)
    with pytest.raises(type(error)), caplog.at_level(logging.INFO, logger="dvpt_core.steps.train"):
        train(cfg, workspace / "cache", out)
    assert any(m.startswith("MLflow run ") and not m.endswith("resumed") for m in caplog.messages)
    assert stop.descriptions == ["epoch 1/3", "epoch 2/3"]
    assert message.format(out / CHECKPOINT_FILE) in caplog.messages
    assert any(m.startswith("epoch 1: train_loss=") and ", lr=" in m for m in caplog.messages)
    client = MlflowClient(cfg.tracking.resolved_uri())
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert [r.info.status for r in runs] == [status]
    assert runs[0].data.tags["WARNING"].startswith("RANDOM WEIGHTS"), "a run on random weights must say so"
    assert (out / CHECKPOINT_FILE).is_file() and not (out / ACTIVE_FILE).exists()
    assert not (out / "adapter").exists() and not (out / "run.json").exists(), "an unfinished run must not look finished"
    monkeypatch.undo()
    # What a SIGKILL at this point would have left: the run RUNNING, claimed by a dead process.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.update_run(runs[0].info.run_id, "RUNNING")
    (out / ACTIVE_FILE).write_text(json.dumps({"run_id": runs[0].info.run_id, "pid": dead.pid, "host": socket.gethostname()}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dvpt_core.steps.train"):
        summary = train(cfg, workspace / "cache", out)
    assert "dvpt.closed_by" not in client.get_run(summary["run_id"]).data.tags, "the resumed run is not a stale one"
    assert f"MLflow run {runs[0].info.run_name} ({runs[0].info.run_id}) resumed" in caplog.messages
    assert summary["run_id"] == runs[0].info.run_id, "the next attempt must resume the same MLflow run"
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    assert [row["epoch"] for row in history(out)] == [1, 2, 3]
    assert not (out / CHECKPOINT_FILE).exists() and not (out / ACTIVE_FILE).exists()


def test_a_folder_owned_by_a_live_process_is_refused_and_a_dead_owners_run_closed(workspace: Path) -> None:
    cfg = config(workspace, "train.epochs=1", "train.max_steps_per_epoch=1", "tracking.experiment=lifecycle-owner")
    out = workspace / "lifecycle-owner"
    out.mkdir()
    client = MlflowClient(cfg.tracking.resolved_uri())
    experiment = client.create_experiment(cfg.tracking.experiment)
    orphan = client.create_run(experiment).info.run_id  # left RUNNING by a process that died
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        claim = {"run_id": orphan, "pid": owner.pid, "host": socket.gethostname()}
        (out / ACTIVE_FILE).write_text(json.dumps(claim))
        with pytest.raises(RuntimeError, match=f"in use by process {owner.pid}"):
            train(cfg, workspace / "cache", out)
        # The init process: alive, and a smaller pid than this process's (pids wrap, so a child's may not be larger).
        (out / ACTIVE_FILE).write_text(json.dumps({**claim, "pid": 1}))
        with pytest.raises(RuntimeError, match="in use by process 1 "):
            train(cfg, workspace / "cache", out)
        assert client.get_run(orphan).info.status == "RUNNING"
        # A claim from another machine (a shared folder) cannot be checked from here and is not honoured.
        for elsewhere in (socket.gethostname() + "-z", socket.gethostname()[:-1]):  # sorting after and before
            foreign = client.create_run(experiment).info.run_id
            (out / ACTIVE_FILE).write_text(json.dumps({"run_id": foreign, "pid": 1, "host": elsewhere}))
            train(cfg, workspace / "cache", out)
            assert client.get_run(foreign).info.status == "KILLED"
        (out / ACTIVE_FILE).write_text(json.dumps(claim))  # the owner, about to die
    finally:
        owner.kill()
        owner.wait()
    summary = train(cfg, workspace / "cache", out)
    closed = client.get_run(orphan)
    assert closed.info.status == "KILLED" and "dvpt.closed_by" in closed.data.tags
    assert client.get_run(summary["run_id"]).info.status == "FINISHED" and summary["run_id"] != orphan

    # This process's own claim (an attempt in this process that died before it could let go) is no obstacle.
    mine = client.create_run(experiment).info.run_id
    (out / ACTIVE_FILE).write_text(json.dumps({"run_id": mine, "pid": os.getpid(), "host": socket.gethostname()}))
    summary = train(cfg, workspace / "cache", out)
    assert client.get_run(mine).info.status == "KILLED"

    # A dead process's claim on a run that did finish leaves that run as it is.
    (out / ACTIVE_FILE).write_text(json.dumps({"run_id": summary["run_id"], "pid": owner.pid, "host": socket.gethostname()}))
    again = train(cfg, workspace / "cache", out)
    assert client.get_run(summary["run_id"]).info.status == "FINISHED" and again["run_id"] != summary["run_id"]


def test_a_dead_claim_on_another_run_than_the_checkpoints_is_closed_whichever_id_sorts_first(workspace: Path) -> None:
    """The run a checkpoint continues stays RUNNING for the attempt that resumes it; another run a
    dead process claimed is closed. Run ids are random, so both orders are checked."""
    cfg = config(workspace, "tracking.experiment=lifecycle-two-claims")
    mlflow.set_tracking_uri(cfg.tracking.resolved_uri())
    client = MlflowClient(cfg.tracking.resolved_uri())
    experiment = client.create_experiment(cfg.tracking.experiment)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = workspace / "lifecycle-two-claims"
    out.mkdir()
    for claim_sorts_first in (True, False):
        low, high = sorted(client.create_run(experiment).info.run_id for _ in range(2))
        claimed, resumed = (low, high) if claim_sorts_first else (high, low)
        (out / ACTIVE_FILE).write_text(json.dumps({"run_id": claimed, "pid": dead.pid, "host": socket.gethostname()}))
        train_step._close_stale_run(out, keep=resumed)
        assert (client.get_run(claimed).info.status, client.get_run(resumed).info.status) == ("KILLED", "RUNNING")
        assert not (out / ACTIVE_FILE).exists()


def test_a_lost_server_turns_tracking_off_with_one_line(tmp_path: Path, caplog) -> None:
    live = train_step._LiveLog(tmp_path, {}, {}, None)
    calls: list[str] = []

    def lost(name: str) -> None:
        calls.append(name)
        raise MlflowException("connection refused " + "x" * 300 + "\nretries exhausted")

    with caplog.at_level(logging.WARNING, logger="dvpt_core.steps.train"):
        live.call(lost, "first")
        live.call(lost, "second")
    assert calls == ["first"] and not live.online, "after the first failure no call may wait on the server again"
    reason = ("connection refused " + "x" * 300)[:200]
    assert caplog.messages == [f"MLflow stopped answering ({reason}); training goes on locally and syncs at the end"]


def test_a_server_lost_at_the_end_leaves_the_result_marked_unsynced_until_dvpt_sync(workspace: Path, monkeypatch) -> None:
    # weight_decay_on=all: one AdamW parameter group, whose learning rate the history must read too.
    cfg = config(workspace, "train.epochs=1", "train.max_steps_per_epoch=1", "train.weight_decay_on=all",
                 "tracking.experiment=lifecycle-sync")
    out = workspace / "lifecycle-sync"

    def lost(*args) -> None:
        raise MlflowException("connection refused")

    monkeypatch.setattr(sync_step, "_send", lost)
    with pytest.raises(TrackingUnavailable, match="once it is back, run: dvpt sync"):
        train(cfg, workspace / "cache", out)
    assert json.loads((out / "run.json").read_text())["synced"] is False
    assert (out / "adapter" / "adapter.safetensors").is_file()
    monkeypatch.undo()
    summary = sync_step.sync(cfg, out)
    assert summary["synced"] is True and json.loads((out / "run.json").read_text())["synced"] is True
    assert MlflowClient(cfg.tracking.resolved_uri()).get_run(summary["run_id"]).info.status == "FINISHED"


def registering(trained: dict, name: str, *overrides: str) -> ExperimentConfig:
    tracking = {"registered_model": name, **dict(o.split("=", 1) for o in overrides)}
    return trained["cfg"].model_copy(update={"tracking": trained["cfg"].tracking.model_copy(update=tracking)})


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v3", "V12", "has space", "", "a" * 256, "café"])
def test_an_alias_mlflow_would_refuse_is_refused_before_any_version_exists(trained: dict, workspace: Path,
                                                                          alias: str) -> None:
    cfg = registering(trained, "steps-alias", f"alias={alias}")
    tiny_onnx(workspace / "export" / "model.onnx")
    with pytest.raises(RegistrationError, match="is not a valid MLflow alias"):
        register(cfg, trained["dir"], workspace / "export", workspace / "registry-alias")
    assert not MlflowClient(cfg.tracking.resolved_uri()).search_model_versions("name='steps-alias'")


@pytest.mark.parametrize("alias", ["v", "v3a", "vv3", "latest2", "a" * 255, "champion-2_b"])
def test_the_nearest_valid_aliases_pass_the_check(tmp_path: Path, alias: str) -> None:
    model = tiny_onnx(tmp_path / "model.onnx")
    register_step._precheck(alias, {"synced": True, "model_uri": "models:/m-1"}, model, tmp_path)


@pytest.mark.parametrize(("run", "onnx_file", "message"), [
    ({"synced": True, "model_uri": "models:/m-1"}, False, "does not exist: run the export step first"),
    ({"synced": False, "model_uri": "models:/m-1"}, True, "has not reached MLflow yet: run dvpt sync"),
    ({"synced": True, "model_uri": None}, True, "has not reached MLflow yet: run dvpt sync"),
], ids=["no graph", "unsynced", "no logged model"])
def test_a_missing_graph_or_an_unsynced_run_is_refused_naming_the_step(tmp_path: Path, run: dict, onnx_file: bool,
                                                                        message: str) -> None:
    model = tiny_onnx(tmp_path / "model.onnx") if onnx_file else tmp_path / "model.onnx"
    with pytest.raises(RegistrationError, match=message):
        register_step._precheck("challenger", run, model, tmp_path)


def test_registering_inside_a_dvc_experiment_is_skipped_unless_asked(trained: dict, workspace: Path, monkeypatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-ibex")
    out = workspace / "registry-exp"
    result = register(registering(trained, "steps-exp"), trained["dir"], workspace / "export", out)
    assert result["registered"] is False and "DVC experiment lucid-ibex" in result["reason"]
    assert json.loads((out / "registered.json").read_text()) == result


def test_a_failed_alias_move_removes_the_version_or_marks_it_failed(trained: dict, workspace: Path, monkeypatch,
                                                                   caplog) -> None:
    cfg = registering(trained, "steps-undo")
    tiny_onnx(workspace / "export" / "model.onnx")
    client = MlflowClient(cfg.tracking.resolved_uri())

    def refused(*args) -> None:
        raise MlflowException("alias service down")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", refused)
    with pytest.raises(RegistrationError, match="the version was removed, nothing is registered"):
        register(cfg, trained["dir"], workspace / "export", workspace / "registry-undo")
    assert not client.search_model_versions("name='steps-undo'")
    assert not (workspace / "registry-undo" / "registered.json").exists()

    def unreachable(*args) -> None:
        raise ConnectionError("connection reset")

    monkeypatch.setattr(MlflowClient, "delete_model_version", unreachable)  # and the clean-up fails too
    with pytest.raises(RegistrationError):
        register(cfg, trained["dir"], workspace / "export", workspace / "registry-undo")
    [left] = client.search_model_versions("name='steps-undo'")
    assert left.tags["dvpt.registration"] == "failed"

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", unreachable)  # nothing answers at all
    with pytest.raises(RegistrationError), caplog.at_level(logging.ERROR, logger="dvpt_core.steps.register"):
        register(cfg, trained["dir"], workspace / "export", workspace / "registry-undo")
    assert any(m.endswith("could be neither removed nor marked failed") for m in caplog.messages)
    monkeypatch.undo()
    result = register(cfg, trained["dir"], workspace / "export", workspace / "registry-undo")
    assert result["version"] != left.version, "a version marked failed is never reused"
    logged = mlflow.search_logged_models(experiment_ids=[trained["summary"]["experiment_id"]], output_format="list",
                                         filter_string=f"source_run_id = '{trained['summary']['run_id']}' AND name = 'onnx_model'")
    assert [f"models:/{m.model_id}" for m in logged] == [result["onnx_uri"]], "every attempt reuses the one ONNX model"


def test_a_version_describes_its_lineage_and_random_weights_before_its_card(trained: dict, workspace: Path,
                                                                             monkeypatch) -> None:
    cfg = registering(trained, "steps-card")
    tiny_onnx(workspace / "export" / "model.onnx")

    def no_card(*args) -> None:
        raise RuntimeError("card renderer down")

    monkeypatch.setattr(register_step, "publish_model_card", no_card)
    with pytest.raises(RuntimeError, match="card renderer down"):
        register(cfg, trained["dir"], workspace / "export", workspace / "registry" / "card")
    [version] = MlflowClient(cfg.tracking.resolved_uri()).search_model_versions("name='steps-card'")
    adapter = json.loads((trained["dir"] / "adapter" / "adapter.json").read_text())
    assert version.description.startswith(f"dvpt adapter over {adapter['backbone']} (weights fingerprint "
                                          f"{adapter['backbone_fingerprint'][:12]}), classification of 5 classes")
    assert "\n\nRANDOM WEIGHTS" in version.description
    assert version.tags["task"] == "classification" and version.tags["stand_in_weights"] == "false"
    assert version.tags["onnx_model_uri"].startswith("models:/")


def test_a_cache_of_the_other_task_is_refused_naming_both(workspace: Path, tmp_path: Path) -> None:
    segmentation = tiny_segformer_config(f"tracking.tracking_uri=sqlite:///{workspace / 'mlflow.db'}")
    with pytest.raises(ConfigError, match=r"data.task=segmentation but .* was preprocessed for classification"):
        train(segmentation, workspace / "cache", tmp_path / "seg")
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / META_FILE).write_text(json.dumps({"task": "segmentation", "image_size": SIZE}))
    with pytest.raises(ConfigError, match=r"data.task=classification but .* was preprocessed for segmentation"):
        train(config(workspace), masks, tmp_path / "cls")
    assert not (tmp_path / "seg").exists() and not (tmp_path / "cls").exists()


def test_a_tied_validation_score_keeps_the_earliest_epoch(workspace: Path) -> None:
    """A learning rate too small to change any prediction: every epoch scores the same, and the
    first of them is kept (a later epoch must do strictly better to replace it)."""
    cfg = config(workspace, "train.epochs=3", "train.max_steps_per_epoch=1", "train.lr=1e-12", "train.warmup_epochs=0",
                 "tracking.experiment=ties")
    summary = train(cfg, workspace / "cache", workspace / "ties")
    kappas = [row["val_kappa"] for row in history(workspace / "ties")]
    assert kappas[0] == kappas[1] == kappas[2]
    assert summary["best_epoch"] == 1


def test_register_reuses_only_the_newest_ready_version_not_marked_failed() -> None:
    """Still pending, failed to register, or marked failed by an earlier attempt's undo: never reused."""
    failed = [ModelVersionTag("dvpt.registration", "failed")]
    versions = [ModelVersion("m", "1", 0, run_id="r"), ModelVersion("m", "2", 0, run_id="r"),
                ModelVersion("m", "3", 0, run_id="r", tags=failed),
                ModelVersion("m", "4", 0, run_id="r", status="PENDING_REGISTRATION"),
                ModelVersion("m", "5", 0, run_id="r", status="FAILED_REGISTRATION")]

    class Registry:
        def search_model_versions(self, filter_string: str) -> list[ModelVersion]:
            assert filter_string == "name='m' and run_id='r'"
            return versions

    assert register_step._existing(Registry(), "m", "r").version == "2"
    del versions[:2]
    assert register_step._existing(Registry(), "m", "r") is None


def test_a_registry_that_cannot_search_versions_still_registers(trained: dict, workspace: Path, monkeypatch) -> None:
    """Some registries refuse a search by run id; the step then cannot tell a repeat and registers."""
    cfg = registering(trained, "steps-nosearch")
    tiny_onnx(workspace / "export" / "model.onnx")

    def unsupported(*args, **kwargs) -> None:
        raise MlflowException("filter on run_id is not supported")

    monkeypatch.setattr(MlflowClient, "search_model_versions", unsupported)
    result = register(cfg, trained["dir"], workspace / "export", workspace / "registry-nosearch")
    assert result["registered"] is True and result["version"] == "1"
