"""Per-epoch training checkpoints, so a killed run resumes where it stopped and ends exactly as an
uninterrupted one would (on the CPU: bit for bit).

A checkpoint holds everything the next epoch depends on: the trainable tensors, the optimiser and
scheduler states, every random generator (Python, NumPy, torch's global one and the data loader's),
the best epoch so far with its tensors, the history and the MLflow run. It is written to a
temporary file and renamed, so a kill during the write leaves the previous checkpoint intact.
It is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only,
nothing unpickled (under torchrun rank 0 reads it and sends it to the other processes, which
have no file of their own). Resuming requires the same configuration key (everything that shapes training);
a checkpoint made under another configuration is discarded and training starts fresh, so a changed
experiment (``dvc exp run -S ...``) never continues a different run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvpt_core.config import ExperimentConfig

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1


def config_key(cfg: ExperimentConfig, backbone_fingerprint: str) -> str:
    """Everything that shapes the training trajectory: model, optimisation, classes, the labelled
    subset (taken at training time from a cache that holds every training sample), the frozen
    weights (by fingerprint, not path). Tracking and export settings do not count."""
    payload = {
        "model": cfg.model.model_dump(mode="json", exclude={"weights_file"}),
        "train": cfg.train.model_dump(mode="json"),
        "class_names": cfg.data.class_names,
        "labelled": cfg.data.model_dump(include={"label_ratio", "label_seed", "split_seed"}),
        "backbone_fingerprint": backbone_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class TrainingState:
    """What survives between epochs; ``epoch`` is the number of completed epochs."""

    key: str
    epoch: int = 0
    best_score: float = -float("inf")
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    run_id: str = ""


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    """Every generator a training epoch draws from, as tensors and plain numbers."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "loader": generator.get_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def restore_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["loader"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))


def save_checkpoint(path: Path, state: TrainingState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, generator: torch.Generator) -> None:
    """Atomically replace ``path`` (temp file in the same folder, fsync, rename)."""
    payload = {
        "format_version": FORMAT_VERSION, "key": state.key, "epoch": state.epoch, "run_id": state.run_id,
        "best_score": state.best_score, "best_epoch": state.best_epoch, "best_state": state.best_state,
        "history": state.history, "trainable": model.trainable_state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(generator),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path, key: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` as saved, or None when there is nothing to resume (no
    checkpoint, or one made under another configuration, which is then removed). Under torchrun
    rank 0 reads it and every process restores what rank 0 read (``Ranks.from_main``)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as err:
        log.warning("checkpoint %s is unreadable (%s): starting fresh", path, err)
        path.unlink()
        return None
    if payload.get("format_version") != FORMAT_VERSION or payload.get("key") != key:
        log.warning("checkpoint %s was made under another configuration: starting fresh", path)
        path.unlink()
        return None
    log.info("resuming from %s after epoch %d", path, payload["epoch"])
    return payload


def restore_checkpoint(payload: dict[str, Any] | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: Any, generator: torch.Generator) -> TrainingState | None:
    """A :func:`read_checkpoint` payload restored into the given objects (None: nothing to restore)."""
    if payload is None:
        return None
    model.load_state_dict(payload["trainable"], strict=False)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    restore_rng_states(payload["rng"], generator)
    return TrainingState(key=payload["key"], epoch=payload["epoch"], best_score=payload["best_score"],
                         best_epoch=payload["best_epoch"], best_state=payload["best_state"],
                         history=payload["history"], run_id=payload["run_id"])
