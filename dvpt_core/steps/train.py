"""Train step: fit the configured PEFT method on the frozen backbone and log it all to MLflow.

Writes ``<out_dir>/adapter/`` (the best epoch by validation kappa), ``history.csv`` and
``run.json`` (the MLflow run the later steps add to).
"""

from __future__ import annotations

import copy
import csv
import logging
import math
from pathlib import Path

import mlflow
import torch
from timm.scheduler import CosineLRScheduler

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.cache_layout import SPLITS_FILE
from dvpt_core.data.dataset import make_loader
from dvpt_core.engine import predict, train_one_epoch
from dvpt_core.metrics.classification import classification_metrics
from dvpt_core.models.backbone import RANDOM_WEIGHTS_WARNING
from dvpt_core.peft import build_model, count_parameters
from dvpt_core.peft.adapter import WEIGHTS_FILE, save_adapter
from dvpt_core.runtime import resolve_device, seed_everything
from dvpt_core.tracking import connect, dvc_data_hash, flatten, git_commit, write_run_file

log = logging.getLogger(__name__)


def train(cfg: ExperimentConfig, cache_dir: Path, out_dir: Path, data_root: Path | None = None) -> dict:
    """Returns the run summary also written to ``run.json``."""
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
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    # Per-step warm-up then cosine to zero over the whole run (the released code's scheduler drops
    # the LR to 0 after the first epoch; this one does not).
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=cfg.train.epochs * steps_per_epoch,
        warmup_t=min(cfg.train.warmup_epochs, cfg.train.epochs - 1) * steps_per_epoch,
        warmup_lr_init=cfg.train.lr * 1e-3,
        warmup_prefix=False,
        t_in_epochs=False,
    )

    tracking_uri = connect(cfg)
    lineage = {
        "backbone": info.name,
        "backbone_fingerprint": info.fingerprint,
        "random_weights": str(info.random_weights).lower(),
        "method": cfg.model.method,
        "data_dvc_md5": dvc_data_hash(data_root) if data_root else "untracked",
        "git_commit": git_commit(),
    }
    best = {"kappa": -math.inf, "epoch": -1, "state": None}
    history = []
    with mlflow.start_run() as run:
        mlflow.set_tags(lineage)
        if info.random_weights:
            mlflow.set_tag("WARNING", RANDOM_WEIGHTS_WARNING.format(name=info.name, seed=cfg.model.init_seed))
        mlflow.log_params(flatten("", cfg.model_dump(mode="json")))
        mlflow.log_metrics({"params_trainable": counts["trainable"], "params_total": counts["total"]})
        done_steps = 0
        for epoch in range(cfg.train.epochs):
            train_loss = train_one_epoch(
                model,
                loaders["train"],
                optimizer,
                lambda step: scheduler.step_update(done_steps + step),
                device,
                amp=cfg.train.amp,
                grad_clip=cfg.train.grad_clip,
                max_steps=cfg.train.max_steps_per_epoch,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
            )
            done_steps += steps_per_epoch
            logits, labels = predict(model, loaders["valid"], device, amp=cfg.train.amp, desc="validate")
            val = classification_metrics(logits.argmax(1), labels, cfg.data.num_classes)
            val_loss = float(torch.nn.functional.cross_entropy(logits, labels))
            row = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                   "val_kappa": val["kappa"], "val_accuracy": val["accuracy"],
                   "lr": optimizer.param_groups[0]["lr"]}
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
            if val["kappa"] > best["kappa"]:
                best = {"kappa": val["kappa"], "epoch": epoch + 1,
                        "state": copy.deepcopy(model.trainable_state_dict())}
        model.load_state_dict(best["state"], strict=False)
        adapter_dir = save_adapter(model.cpu(), cfg, out_dir / "adapter")
        _write_history(out_dir / "history.csv", history)
        mlflow.log_metrics({"best_val_kappa": best["kappa"], "best_epoch": best["epoch"],
                            "adapter_bytes": (adapter_dir / WEIGHTS_FILE).stat().st_size})
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
        mlflow.log_artifact(str(out_dir / "history.csv"))
        if (cache_dir / SPLITS_FILE).is_file():
            mlflow.log_artifact(str(cache_dir / SPLITS_FILE), artifact_path="data")
        summary = {
            "run_id": run.info.run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": tracking_uri,
            "best_epoch": best["epoch"],
            "best_val_kappa": best["kappa"],
            **counts,
            "adapter_bytes": (adapter_dir / WEIGHTS_FILE).stat().st_size,
            **lineage,
        }
    write_run_file(out_dir, summary)
    return summary


def _steps_per_epoch(batches: int, max_steps: int | None) -> int:
    return min(batches, max_steps) if max_steps else batches


def _write_history(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
