"""Batch inference (``dvpt predict``): a registered adapter over a folder of images, a CSV naming
images, or a DVC-tracked dataset folder, through PyTorch or ONNX Runtime; classification or
segmentation, as the adapter's task says.

Every input is decoded and preprocessed by the serving path (``dvpt_core.serving``), so batch
and online predictions agree. A file that cannot be read or decoded becomes an ``error`` row
naming the reason and never stops the others. Writes ``predictions.csv`` (per image: file,
status, the task's columns, error: a class name, index and one probability column per class, or
the label map's PNG under ``masks/`` and each class's pixel fraction) and ``summary.json``
(counts, failures, the model version and the data's DVC hash where the input is DVC-tracked).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from dvpt_core.data.atomic import atomic_file
from dvpt_core.peft.adapter import load_adapter
from dvpt_core.serving.inputs import InputError
from dvpt_core.serving.logged_model import WEIGHTS_FILE_ENV
from dvpt_core.serving.predictor import Predictor, onnx_forward, torch_forward
from dvpt_core.serving.sources import ModelSource, onnx_file, resolve
from dvpt_core.tracking import dvc_data_hash

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
OK, ERROR = "ok", "error"


@dataclass(frozen=True)
class Item:
    """One input: how it is named in the output, and where its bytes are."""

    name: str
    path: Path


def predict(model_uri: str, inputs: Path, out_dir: Path, runtime: str = "torch", column: str = "image",
            batch_size: int = 16, weights_file: Path | None = None, cache_dir: Path | None = None) -> dict:
    """Predict every image of ``inputs`` (a folder, or a CSV whose ``column`` holds image paths
    relative to it) with the model at ``model_uri``; see the module docstring."""
    inputs, out_dir = Path(inputs), Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / ".models"
    source = resolve(model_uri, cache_dir)
    predictor = _predictor(source, runtime, weights_file, cache_dir)
    items = list(list_inputs(inputs, column))
    rows, batch = [], []
    for item in tqdm(items, desc="predict", disable=None):
        try:
            batch.append((item, predictor.prepare(item.path.read_bytes(), item.name)))
        except (OSError, InputError) as err:
            rows.append(_error_row(item, err))
        if len(batch) == batch_size:
            rows += _predict_batch(predictor, batch)
            batch = []
    rows += _predict_batch(predictor, batch)
    rows.sort(key=lambda row: row["file"])
    _write_csv(out_dir / PREDICTIONS_FILE, [_table_row(predictor, row, out_dir) for row in rows],
               predictor.task.table_columns(predictor.class_names))
    failures = [{"file": r["file"], "error": r["error"]} for r in rows if r["status"] == ERROR]
    summary = {
        "model": model_uri, "registered_model": source.name, "version": source.version, "runtime": runtime,
        "inputs": str(inputs), "data_dvc_md5": dvc_data_hash(inputs) if inputs.is_dir() else "untracked",
        "images": len(rows), "predicted": len(rows) - len(failures), "failed": len(failures), "failures": failures,
        "predictions": str(out_dir / PREDICTIONS_FILE),
        "random_weights": source.meta.get("random_weights", False),
        "stand_in_weights": source.meta.get("stand_in", False),
    }
    with atomic_file(out_dir / SUMMARY_FILE) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    for failure in failures:
        log.warning("could not predict %s: %s", failure["file"], failure["error"])
    log.info("predicted %d of %d images with %s version %s (%s)", summary["predicted"], len(rows), source.name,
             source.version, runtime)
    return summary


def list_inputs(inputs: Path, column: str = "image") -> Iterator[Item]:
    """The images of a folder (recursively, by suffix, sorted) or of a CSV's ``column``."""
    if inputs.is_dir():
        for path in sorted(p for p in inputs.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            yield Item(str(path.relative_to(inputs)), path)
    elif inputs.is_file() and inputs.suffix.lower() == ".csv":
        table = pd.read_csv(inputs, dtype=str, keep_default_na=False)
        if column not in table:
            raise ValueError(f"{inputs} has no column {column!r} (columns: {list(table.columns)}); use --column")
        for name in table[column]:
            yield Item(name, inputs.parent / name)
    else:
        raise FileNotFoundError(f"{inputs} is neither a folder of images nor a .csv file naming images")


def _predictor(source: ModelSource, runtime: str, weights_file: Path | None, cache_dir: Path) -> Predictor:
    meta = source.meta
    if runtime == "onnx":
        return Predictor(meta, onnx_forward(onnx_file(source, cache_dir)))
    if runtime != "torch":
        raise ValueError(f"runtime {runtime!r} is neither torch nor onnx")
    weights = weights_file or os.environ.get(WEIGHTS_FILE_ENV)
    model = load_adapter(source.adapter_dir, {"weights_file": str(weights)} if weights else None)
    return Predictor(meta, torch_forward(model))


def _predict_batch(predictor: Predictor, batch: list) -> list[dict]:
    answers = predictor.predict_prepared([image for _, image in batch])
    return [{"file": item.name, "status": OK, "answer": answer, "error": ""} for (item, _), answer in zip(batch, answers)]


def _error_row(item: Item, err: Exception) -> dict:
    return {"file": item.name, "status": ERROR, "answer": None, "error": f"{type(err).__name__}: {err}"}


def _table_row(predictor: Predictor, row: dict, out_dir: Path) -> dict:
    answer = row["answer"]
    columns = {} if answer is None else predictor.task.table_row(answer, out_dir, row["file"])
    return {"file": row["file"], "status": row["status"], **columns, "error": row["error"]}


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["file", "status", *columns, "error"], restval="")
        writer.writeheader()
        writer.writerows(rows)
