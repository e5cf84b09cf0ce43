"""Train step: fit the configured PEFT method on the frozen backbone and log it all to MLflow.

Writes ``<out_dir>/adapter/`` (the best epoch by validation kappa), ``history.csv`` and
``run.json`` (the MLflow run and logged model the later steps add to). The MLflow run carries
the lineage a reviewer follows: dataset inputs (digest = the DVC hash of the data), the
validation result and Data Docs, the git revision and DVC experiment, the backbone's
fingerprint and whether its weights are random or a stand-in, and the adapter as a LoggedModel.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
from pathlib import Path
from typing import Any

import mlflow
import torch

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.cache_layout import SPLITS_FILE
from dvpt_core.data.dataset import make_loader
from dvpt_core.engine import predict, train_one_epoch
from dvpt_core.metrics.classification import classification_metrics
from dvpt_core.models.backbone import BackboneInfo, weights_warning
from dvpt_core.optim import make_optimizer, make_scheduler
from dvpt_core.peft import build_model, count_parameters
from dvpt_core.peft.adapter import WEIGHTS_FILE, save_adapter
from dvpt_core.runtime import resolve_device, seed_everything
from dvpt_core.serving.logged_model import log_adapter_model
from dvpt_core.tracking import (
    connect, dvc_data_hash, dvc_experiment, flatten, git_commit, log_dataset_inputs, run_name, write_run_file,
)

log = logging.getLogger(__name__)
# What the validate step writes that the run keeps (dvpt_core.steps.validate).
VALIDATION_ARTIFACTS = ("validation.json", "data_docs")


def train(cfg: ExperimentConfig, cache_dir: Path, out_dir: Path, data_root: Path | None = None,
          validation_dir: Path | None = None) -> dict:
    """Returns the run summary also written to ``run.json``. ``data_root`` gives the lineage its
    DVC hash; ``validation_dir`` (the validate step's folder) is logged to the run."""
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg).to(device)
    info = model.info
    counts = count_parameters(model)
    loaders = {
        split: make_loader(cache_dir / split, info.mean, info.std, split == "train", cfg, generator=generator)
        for split in ("train", "valid")
    }
    steps_per_epoch = _steps_per_epoch(len(loaders["train"]), cfg.train.max_steps_per_epoch)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.weight_decay_on)
    scheduler = make_scheduler(optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.warmup_epochs, steps_per_epoch)

    tracking_uri = connect(cfg)
    lineage = _lineage(cfg, info, data_root)
    with mlflow.start_run(run_name=run_name(cfg), tags=lineage) as run:
        warning = weights_warning(info, cfg.model.init_seed, cfg.model.weights_file)
        if warning:
            mlflow.set_tag("WARNING", warning)
        mlflow.log_params(flatten("", cfg.model_dump(mode="json")))
        mlflow.log_metrics({"params_trainable": counts["trainable"], "params_total": counts["total"]})
        log_dataset_inputs(cache_dir / SPLITS_FILE, data_root, lineage["data_dvc_md5"], lineage["git_commit"])
        _log_validation(validation_dir)
        best, history = _fit(model, loaders, optimizer, scheduler, steps_per_epoch, device, cfg)
        model.load_state_dict(best["state"], strict=False)
        adapter_dir = save_adapter(model.cpu(), cfg, out_dir / "adapter")
        _write_history(out_dir / "history.csv", history)
        adapter_bytes = (adapter_dir / WEIGHTS_FILE).stat().st_size
        logged = log_adapter_model(adapter_dir)
        mlflow.log_metrics({"best_val_kappa": best["kappa"], "best_epoch": best["epoch"],
                            "adapter_bytes": adapter_bytes}, model_id=logged.model_id)
        mlflow.log_artifact(str(out_dir / "history.csv"))
        if (cache_dir / SPLITS_FILE).is_file():
            mlflow.log_artifact(str(cache_dir / SPLITS_FILE), artifact_path="data")
        summary = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": tracking_uri,
            "model_id": logged.model_id,
            "model_uri": logged.model_uri,
            "best_epoch": best["epoch"],
            "best_val_kappa": best["kappa"],
            **counts,
            "adapter_bytes": adapter_bytes,
            **lineage,
            "weights_warning": warning,
        }
    write_run_file(out_dir, summary)
    return summary


def _lineage(cfg: ExperimentConfig, info: BackboneInfo, data_root: Path | None) -> dict[str, str]:
    return {
        "backbone": info.name,
        "backbone_fingerprint": info.fingerprint,
        "random_weights": str(info.random_weights).lower(),
        "stand_in_weights": str(info.stand_in).lower(),
        "method": cfg.model.method,
        "data_dvc_md5": dvc_data_hash(data_root) if data_root else "untracked",
        "git_commit": git_commit(),
        "dvc_experiment": dvc_experiment(),
    }


def _log_validation(validation_dir: Path | None) -> None:
    """The data gate's verdict and its Data Docs, beside the model trained on that data."""
    if validation_dir is None:
        return
    for name in VALIDATION_ARTIFACTS:
        path = Path(validation_dir) / name
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=f"validation/{name}")
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path="validation")


def _fit(model: torch.nn.Module, loaders: dict, optimizer: torch.optim.Optimizer, scheduler: Any,
         steps_per_epoch: int, device: torch.device, cfg: ExperimentConfig) -> tuple[dict, list[dict]]:
    """Every epoch, keeping the trainable state of the best one by validation kappa (the
    earliest on ties) and the per-epoch history."""
    best: dict[str, Any] = {"kappa": -math.inf, "epoch": -1, "state": None}
    history = []
    for epoch in range(cfg.train.epochs):
        done_steps = epoch * steps_per_epoch
        train_loss = train_one_epoch(
            model, loaders["train"], optimizer, lambda step, done=done_steps: scheduler.step_update(done + step),
            device, amp=cfg.train.amp, grad_clip=cfg.train.grad_clip, max_steps=cfg.train.max_steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
        )
        logits, labels = predict(model, loaders["valid"], device, amp=cfg.train.amp, desc="validate")
        val = classification_metrics(logits.argmax(1), labels, cfg.data.num_classes)
        row = {"epoch": epoch + 1, "train_loss": train_loss,
               "val_loss": float(torch.nn.functional.cross_entropy(logits, labels)),
               "val_kappa": val["kappa"], "val_accuracy": val["accuracy"], "lr": optimizer.param_groups[0]["lr"]}
        history.append(row)
        mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
        if val["kappa"] > best["kappa"]:
            best = {"kappa": val["kappa"], "epoch": epoch + 1, "state": copy.deepcopy(model.trainable_state_dict())}
    return best, history


def _steps_per_epoch(batches: int, max_steps: int | None) -> int:
    return min(batches, max_steps) if max_steps else batches


def _write_history(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
