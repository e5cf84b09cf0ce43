"""Train step: fit the configured PEFT method on the frozen backbone, locally first, then in MLflow.

Writes ``<out_dir>/adapter/`` (the best epoch by the task's validation score, the earliest on
ties: quadratic kappa for classification, Dice for segmentation; see ``dvpt_core.tasks``),
``history.csv`` (per epoch: train loss, learning rate, then the task's validation columns, its
selection score last), ``run.json`` (the MLflow run and logged model the later steps add to) and,
while training, ``checkpoint.pt`` after every epoch. Nothing is lost to a fault:

- a run killed at any point (SIGKILL, SIGTERM, Ctrl-C, a lost machine) resumes from its last
  checkpoint when the step is run again with the same configuration, in the same MLflow run, and
  ends exactly as an uninterrupted run would (``dvpt_core.checkpoint``); SIGTERM and Ctrl-C close
  the MLflow run as KILLED on their way out, and a run a SIGKILL left RUNNING is resumed or, when
  there is nothing to resume, closed as KILLED by the next attempt (``active.json`` names the
  process that owns it);
- the tracking server is checked before any work (seconds, not minutes); if it goes away during
  training, training goes on locally and what MLflow missed is recorded in ``sync.json`` and sent
  at the end (``dvpt_core.steps.sync``), or later with ``dvpt sync`` when the server stays away.

The MLflow run carries the lineage a reviewer follows: dataset inputs (digest = the DVC hash of the
data), the validation result and Data Docs, the git revision and DVC experiment, the backbone's
fingerprint and whether its weights are random or a stand-in, and the adapter as a LoggedModel.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import mlflow
import torch

from dvpt_core.checkpoint import CHECKPOINT_FILE, TrainingState, config_key, load_checkpoint, save_checkpoint
from dvpt_core.config import ConfigError, ExperimentConfig
from dvpt_core.data.atomic import pid_alive
from dvpt_core.data.cache_layout import META_FILE
from dvpt_core.data.dataset import make_loader
from dvpt_core.engine import train_one_epoch
from dvpt_core.models.backbone import BackboneInfo, weights_warning
from dvpt_core.optim import make_optimizer, make_scheduler
from dvpt_core.peft import build_model, count_parameters
from dvpt_core.peft.adapter import WEIGHTS_FILE, save_adapter
from dvpt_core.runtime import resolve_device, seed_everything
from dvpt_core.signals import Terminated, terminate_as_exception
from dvpt_core.secrets import mask_uri
from dvpt_core.steps.sync import HISTORY_FILE, log_epoch, log_run_inputs, read_sync_state, sync, write_sync_state
from dvpt_core.tasks import Prediction, Task, get_task
from dvpt_core.tracking import (
    connect, dvc_data_hash, dvc_experiment, git_commit, run_name, write_run_file,
)

log = logging.getLogger(__name__)
ACTIVE_FILE = "active.json"
# Errors that mean "the tracking server did not take this call": training goes on without it.
TRACKING_ERRORS = (mlflow.MlflowException, OSError)


def train(cfg: ExperimentConfig, cache_dir: Path, out_dir: Path, data_root: Path | None = None,
          validation_dir: Path | None = None) -> dict:
    """Returns the run summary also written to ``run.json``. ``data_root`` gives the lineage its
    DVC hash; ``validation_dir`` (the validate step's folder) is logged to the run."""
    cache_dir, out_dir = Path(cache_dir), Path(out_dir)
    task = _cache_task(cfg, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = connect(cfg)
    generator = seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg).to(device)
    info = model.info
    loaders = {
        split: make_loader(cache_dir / split, info.mean, info.std, split == "train", cfg, generator=generator)
        for split in ("train", "valid")
    }
    steps_per_epoch = _steps_per_epoch(len(loaders["train"]), cfg.train.max_steps_per_epoch)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.weight_decay_on)
    scheduler = make_scheduler(optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.warmup_epochs, steps_per_epoch)
    key = config_key(cfg, info.fingerprint)
    state = load_checkpoint(out_dir / CHECKPOINT_FILE, key, model, optimizer, scheduler, generator)
    state = state or TrainingState(key=key)
    _close_stale_run(out_dir, keep=state.run_id)
    lineage = _lineage(cfg, info, data_root)
    warning = weights_warning(info, cfg.model.init_seed, cfg.model.weights_file)
    sync_state = _open_run(cfg, out_dir, state, lineage, warning, {
        "cache_dir": str(cache_dir.resolve()),
        "data_root": str(Path(data_root).resolve()) if data_root else None,
        "validation_dir": str(Path(validation_dir).resolve()) if validation_dir else None,
    })
    live = _LiveLog(out_dir, sync_state)
    live.call(log_run_inputs, cfg, out_dir, sync_state)
    with terminate_as_exception():
        try:
            validation = Prediction(model, loaders["valid"], device, cfg.train.amp, cfg.data.class_names, cache_dir,
                                    "valid")
            _fit(task, validation, loaders["train"], optimizer, scheduler, generator, steps_per_epoch, cfg, state,
                 out_dir, live)
        except (KeyboardInterrupt, Terminated) as stop:
            _close_interrupted(out_dir, state, live, stop)
            raise
    model.load_state_dict(state.best_state, strict=False)
    adapter_dir = save_adapter(model.cpu(), cfg, out_dir / "adapter")
    _write_history(out_dir / HISTORY_FILE, state.history)
    counts = count_parameters(model)
    summary = {
        "run_id": state.run_id, "run_name": sync_state["run_name"], "experiment_id": sync_state["experiment_id"],
        "tracking_uri": mask_uri(tracking_uri), "model_id": None, "model_uri": None, "synced": False,
        "task": task.name, "selection_metric": task.selection_metric, "best_epoch": state.best_epoch,
        f"best_val_{task.selection_metric}": state.best_score, **counts,
        "adapter_bytes": (adapter_dir / WEIGHTS_FILE).stat().st_size, **lineage, "weights_warning": warning,
    }
    write_run_file(out_dir, summary)
    summary = sync(cfg, out_dir)
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    (out_dir / ACTIVE_FILE).unlink(missing_ok=True)
    return summary


def _cache_task(cfg: ExperimentConfig, cache_dir: Path) -> Task:
    """The configured task, once the cache is known to hold data for it (a classification model on
    masks would fail deep inside the loss, naming neither)."""
    meta_path = cache_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist: {cache_dir} is not a preprocessed cache; "
                                "run the preprocess step first")
    cached = json.loads(meta_path.read_text()).get("task")
    if cached != cfg.data.task:
        raise ConfigError(f"data.task={cfg.data.task} but {cache_dir} was preprocessed for {cached}: set data.task "
                          f"(or data.format) to what the data is, or preprocess again")
    return get_task(cfg.data.task)


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


def _open_run(cfg: ExperimentConfig, out_dir: Path, state: TrainingState, lineage: dict[str, str],
              warning: str | None, paths: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's run re-opened, or a new one; recorded in ``sync.json`` and ``active.json``
    (this process owns it) before training starts."""
    client = mlflow.MlflowClient()
    if state.run_id:
        client.update_run(state.run_id, status="RUNNING")
        run = client.get_run(state.run_id)
        sync_state = read_sync_state(out_dir)
    else:
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment)
        tags = {**lineage, **({"WARNING": warning} if warning else {})}
        run = client.create_run(experiment.experiment_id, run_name=run_name(cfg), tags=tags)
        state.run_id = run.info.run_id
        sync_state = {}
    sync_state.update(run_id=run.info.run_id, run_name=run.info.run_name, experiment_id=run.info.experiment_id,
                      data_dvc_md5=lineage["data_dvc_md5"], git_commit=lineage["git_commit"], **paths)
    write_sync_state(out_dir, sync_state)
    (out_dir / ACTIVE_FILE).write_text(json.dumps({"run_id": state.run_id, "pid": os.getpid(),
                                                   "host": socket.gethostname()}))
    log.info("MLflow run %s (%s)%s", run.info.run_name, state.run_id, " resumed" if state.epoch else "")
    return sync_state


def _close_stale_run(out_dir: Path, keep: str) -> None:
    """A run an earlier attempt left RUNNING (its process died without closing it) and that the
    checkpoint does not continue is closed as KILLED, so no run claims to be running for ever."""
    path = out_dir / ACTIVE_FILE
    if not path.is_file():
        return
    owner = json.loads(path.read_text())
    if owner["host"] == socket.gethostname() and pid_alive(owner["pid"]) and owner["pid"] != os.getpid():
        raise RuntimeError(f"{out_dir} is in use by process {owner['pid']} (training run {owner['run_id']}); "
                           "wait for it or stop it first")
    if owner["run_id"] != keep:
        client = mlflow.MlflowClient()
        if client.get_run(owner["run_id"]).info.status == "RUNNING":
            client.set_tag(owner["run_id"], "dvpt.closed_by", "the next training attempt (its process had died)")
            client.set_terminated(owner["run_id"], "KILLED")
            log.warning("closed MLflow run %s left RUNNING by a dead process as KILLED", owner["run_id"])
    path.unlink()


def _close_interrupted(out_dir: Path, state: TrainingState, live: _LiveLog, stop: BaseException) -> None:
    """On SIGTERM or Ctrl-C: the run is marked KILLED (when the server answers) and the last
    checkpoint stays for the next attempt to resume."""
    live.call(mlflow.MlflowClient().set_terminated, state.run_id, "KILLED")
    (out_dir / ACTIVE_FILE).unlink(missing_ok=True)
    log.warning("training interrupted (%s) after %d epochs; run the same command again to resume from %s",
                stop or "Ctrl-C", state.epoch, out_dir / CHECKPOINT_FILE)


class _LiveLog:
    """MLflow calls made while training: the first failure (a lost server) turns them off, and
    what they would have sent stays recorded in ``sync.json`` for the final sync."""

    def __init__(self, out_dir: Path, sync_state: dict[str, Any]) -> None:
        self.out_dir, self.sync_state, self.online = out_dir, sync_state, True

    def call(self, func: Any, *args: Any) -> None:
        if not self.online:
            return
        try:
            func(*args)
        except TRACKING_ERRORS as err:
            self.online = False
            log.warning("MLflow stopped answering (%s); training goes on locally and syncs at the end",
                        str(err).splitlines()[0][:200])

    def epoch(self, row: dict[str, float]) -> None:
        self.call(log_epoch, self.out_dir, self.sync_state, row)


def _fit(task: Task, validation: Prediction, batches: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
         generator: torch.Generator, steps_per_epoch: int, cfg: ExperimentConfig, state: TrainingState,
         out_dir: Path, live: _LiveLog) -> None:
    """The remaining epochs; after each, the best state (by the task's validation score, the
    earliest on ties) and the history are updated and checkpointed before MLflow hears of it."""
    model, loss_fn, selection = validation.model, task.loss(), f"val_{task.selection_metric}"
    for epoch in range(state.epoch, cfg.train.epochs):
        done_steps = epoch * steps_per_epoch
        train_loss = train_one_epoch(
            model, batches, optimizer, lambda step, done=done_steps: scheduler.step_update(done + step),
            validation.device, amp=cfg.train.amp, grad_clip=cfg.train.grad_clip,
            max_steps=cfg.train.max_steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", loss_fn=loss_fn,
        )
        row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
               **task.validate(validation)}
        state.history.append(row)
        state.epoch = epoch + 1
        if row[selection] > state.best_score:
            state.best_score, state.best_epoch = row[selection], epoch + 1
            state.best_state = {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()}
        save_checkpoint(out_dir / CHECKPOINT_FILE, state, model, optimizer, scheduler, generator)
        log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
        live.epoch(row)


def _steps_per_epoch(batches: int, max_steps: int | None) -> int:
    return min(batches, max_steps) if max_steps else batches


def _write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
