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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch.utils.data import DataLoader

from dvpt_core.checkpoint import (
    CHECKPOINT_FILE, TrainingState, config_key, read_checkpoint, restore_checkpoint, save_checkpoint,
)
from dvpt_core.config import ConfigError, ExperimentConfig
from dvpt_core.data.atomic import pid_alive
from dvpt_core.data.cache_layout import META_FILE
from dvpt_core.data.dataset import make_loader, set_epoch
from dvpt_core.distributed import GlobalBatch, Ranks, data_parallel, process_group
from dvpt_core.engine import train_one_epoch
from dvpt_core.models.adapted import AdaptedModel
from dvpt_core.models.backbone import BackboneInfo, weights_warning
from dvpt_core.optim import make_optimizer, make_scheduler
from dvpt_core.peft import build_model, count_parameters
from dvpt_core.peft.adapter import WEIGHTS_FILE, save_adapter
from dvpt_core.runtime import DROPOUT_STREAM, derived_seed, seed_everything
from dvpt_core.signals import Terminated, terminate_as_exception, termination_ignored
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
    DVC hash; ``validation_dir`` (the validate step's folder) is logged to the run.

    Under ``torchrun`` every process calls this and trains its share of each global batch
    (``dvpt_core.distributed``); rank 0 alone validates, talks to MLflow and writes into
    ``out_dir`` (its checkpoint is what every process resumes from) while the others wait for it,
    and every process returns rank 0's summary."""
    with process_group(cfg.train) as ranks:
        return _train(cfg, ranks, Path(cache_dir), Path(out_dir), data_root, validation_dir)


def _train(cfg: ExperimentConfig, ranks: Ranks, cache_dir: Path, out_dir: Path, data_root: Path | None,
           validation_dir: Path | None) -> dict:
    task = _cache_task(cfg, cache_dir)
    tracking_uri = ""
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tracking_uri = connect(cfg)
    generator = seed_everything(cfg.train.seed)
    model = build_model(cfg).to(ranks.device)
    info = model.info
    batches = make_loader(cache_dir / "train", info.mean, info.std, True, cfg, generator=generator,
                          world_size=ranks.world_size, rank=ranks.rank)
    steps_per_epoch = _steps_per_epoch(len(batches), cfg.train.max_steps_per_epoch)
    optimizer = make_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.weight_decay_on)
    scheduler = make_scheduler(optimizer, cfg.train.lr, cfg.train.epochs, cfg.train.warmup_epochs, steps_per_epoch)
    key = config_key(cfg, info.fingerprint)
    payload = ranks.from_main(read_checkpoint(out_dir / CHECKPOINT_FILE, key) if ranks.is_main else None)
    state = restore_checkpoint(payload, model, optimizer, scheduler, generator) or TrainingState(key=key)
    run = _Training(
        task=task, model=model, trained=data_parallel(model, ranks), batches=batches,
        gather=GlobalBatch(len(batches.dataset), cfg.train.batch_size) if ranks.distributed else None,
        optimizer=optimizer, scheduler=scheduler, generator=generator, steps_per_epoch=steps_per_epoch,
        cfg=cfg, ranks=ranks, out_dir=out_dir,
    )
    live = None
    if ranks.is_main:
        run.validation = Prediction(model, make_loader(cache_dir / "valid", info.mean, info.std, False, cfg),
                                    ranks.device, cfg.train.amp, cfg.data.class_names, cache_dir, "valid")
        live = _start_run(cfg, out_dir, state, info, cache_dir, data_root, validation_dir)
    with terminate_as_exception():
        try:
            _fit(run, state, live)
        except (KeyboardInterrupt, Terminated) as stop:
            if live is not None:
                _close_interrupted(out_dir, state, live, stop)
            raise
        except Exception as err:
            if live is not None:
                _close_failed(out_dir, state, live, err)
            raise
    return ranks.from_main(_finish(run, state, live, tracking_uri) if live is not None else None)


def _start_run(cfg: ExperimentConfig, out_dir: Path, state: TrainingState, info: BackboneInfo, cache_dir: Path,
               data_root: Path | None, validation_dir: Path | None) -> _LiveLog:
    """Rank 0: the MLflow run opened (or re-opened) with its lineage and inputs."""
    _close_stale_run(out_dir, keep=state.run_id)
    lineage = _lineage(cfg, info, data_root)
    warning = weights_warning(info, cfg.model.init_seed, cfg.model.weights_file)
    sync_state = _open_run(cfg, out_dir, state, lineage, warning, {
        "cache_dir": str(cache_dir.resolve()),
        "data_root": str(Path(data_root).resolve()) if data_root else None,
        "validation_dir": str(Path(validation_dir).resolve()) if validation_dir else None,
    })
    live = _LiveLog(out_dir, sync_state, lineage, warning)
    live.call(log_run_inputs, cfg, out_dir, sync_state)
    return live


def _finish(run: _Training, state: TrainingState, live: _LiveLog, tracking_uri: str) -> dict:
    """Rank 0: the best epoch's adapter, the history and ``run.json`` written, then MLflow synced."""
    cfg, out_dir, model = run.cfg, run.out_dir, run.model
    model.load_state_dict(state.best_state, strict=False)
    adapter_dir = save_adapter(model.cpu(), cfg, out_dir / "adapter")
    _write_history(out_dir / HISTORY_FILE, state.history)
    counts = count_parameters(model)
    summary = {
        "run_id": state.run_id, "run_name": live.sync_state["run_name"],
        "experiment_id": live.sync_state["experiment_id"], "tracking_uri": mask_uri(tracking_uri),
        "model_id": None, "model_uri": None, "synced": False, "task": run.task.name,
        "selection_metric": run.task.selection_metric, "best_epoch": state.best_epoch,
        f"best_val_{run.task.selection_metric}": state.best_score, **counts,
        "adapter_bytes": (adapter_dir / WEIGHTS_FILE).stat().st_size, **live.lineage,
        "weights_warning": live.warning,
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
    """On SIGTERM or Ctrl-C (torchrun sends SIGTERM when another process died): the run is
    marked KILLED and the last checkpoint stays for the next attempt."""
    _close_unfinished(out_dir, state, live, "KILLED")
    log.warning("training interrupted (%s) after %d epochs; run the same command again to resume from %s",
                str(stop) or "Ctrl-C", state.epoch, out_dir / CHECKPOINT_FILE)


def _close_failed(out_dir: Path, state: TrainingState, live: _LiveLog, err: Exception) -> None:
    """On an error (a collective whose peer died or timed out, an exhausted GPU...): the run is
    marked FAILED rather than left RUNNING, and the last checkpoint stays for the next attempt."""
    _close_unfinished(out_dir, state, live, "FAILED")
    log.error("training failed after %d epochs (%s); run the same command again to resume from %s",
              state.epoch, str(err).splitlines()[0][:200] if str(err) else type(err).__name__,
              out_dir / CHECKPOINT_FILE)


def _close_unfinished(out_dir: Path, state: TrainingState, live: _LiveLog, status: str) -> None:
    """The run marked ``status`` (when the server answers) and no longer owned by this process;
    a SIGTERM meanwhile (torchrun stopping this process after another failed) is ignored: the
    process is on its way out already."""
    with termination_ignored():
        live.call(mlflow.MlflowClient().set_terminated, state.run_id, status)
        (out_dir / ACTIVE_FILE).unlink(missing_ok=True)


class _LiveLog:
    """MLflow calls made while training: the first failure (a lost server) turns them off, and
    what they would have sent stays recorded in ``sync.json`` for the final sync."""

    def __init__(self, out_dir: Path, sync_state: dict[str, Any], lineage: dict[str, str],
                 warning: str | None) -> None:
        self.out_dir, self.sync_state, self.online = out_dir, sync_state, True
        self.lineage, self.warning = lineage, warning

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


@dataclass
class _Training:
    """What every epoch uses. ``model`` is the adapted model, ``trained`` what the optimiser
    steps through (``model`` itself, or its DistributedDataParallel wrapper under torchrun);
    ``validation``: rank 0's validation split (the other processes have none)."""

    task: Task
    model: AdaptedModel
    trained: torch.nn.Module
    batches: DataLoader
    gather: GlobalBatch | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    steps_per_epoch: int
    cfg: ExperimentConfig
    ranks: Ranks
    out_dir: Path
    validation: Prediction | None = None


def _fit(run: _Training, state: TrainingState, live: _LiveLog | None) -> None:
    """The remaining epochs. Each is ordered, augmented and (for dropout) seeded by the seed and
    its number alone, so a resumed run and any number of processes see the same epoch. After each,
    rank 0 validates, updates the best state (by the task's validation score, the earliest on
    ties) and the history, and checkpoints them before MLflow hears of it; the others wait."""
    cfg, loss_fn = run.cfg, run.task.loss()
    for epoch in range(state.epoch, cfg.train.epochs):
        set_epoch(run.batches, epoch)
        torch.manual_seed(derived_seed(cfg.train.seed, DROPOUT_STREAM, epoch, run.ranks.rank))
        done_steps = epoch * run.steps_per_epoch
        train_loss = train_one_epoch(
            run.trained, run.batches, run.optimizer, lambda step, done=done_steps: run.scheduler.step_update(done + step),
            run.ranks.device, amp=cfg.train.amp, grad_clip=cfg.train.grad_clip,
            max_steps=cfg.train.max_steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", loss_fn=loss_fn,
            gather=run.gather,
        )
        state.epoch = epoch + 1
        if live is not None and run.validation is not None:
            _end_epoch(run, run.validation, state, live, train_loss)
        run.ranks.barrier()


def _end_epoch(run: _Training, validation: Prediction, state: TrainingState, live: _LiveLog,
               train_loss: float) -> None:
    """Rank 0 after an epoch: validation, the best state, the checkpoint, then MLflow."""
    selection = f"val_{run.task.selection_metric}"
    row = {"epoch": state.epoch, "train_loss": train_loss, "lr": run.optimizer.param_groups[0]["lr"],
           **run.task.validate(validation)}
    state.history.append(row)
    if row[selection] > state.best_score:
        state.best_score, state.best_epoch = row[selection], state.epoch
        state.best_state = {k: v.detach().cpu().clone() for k, v in run.model.trainable_state_dict().items()}
    save_checkpoint(run.out_dir / CHECKPOINT_FILE, state, run.model, run.optimizer, run.scheduler, run.generator)
    log.info("epoch %d: %s", state.epoch, ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k != "epoch"))
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
