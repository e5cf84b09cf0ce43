"""Per-sample evaluation records: what the promotion gate resamples and pairs across models.

A single test score cannot say whether a challenger is really better than the champion; the
per-sample outcomes can (a paired bootstrap over the same samples, ``dvpt_core.registry.bootstrap``).
The evaluate step writes one record per test sample (classification: the true and predicted
class; segmentation: the case's Dice averaged over the foreground classes) with the sample's path
and content hash from the preprocessing cache, and logs the file to the model's run. Two models'
records pair by sample and hash, and the hashes prove that both were scored on the same images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dvpt_core.data.atomic import atomic_file
from dvpt_core.data.cache_layout import SPLITS_FILE

# Where the evaluate step logs the records, in the model's run.
ARTIFACT_DIR = "evaluation"
# The task's primary metric: what promotion compares.
PRIMARY_METRIC = {"classification": "kappa", "segmentation": "dice"}
KEY_COLUMNS = ["sample", "sha256"]


class RecordsError(ValueError):
    """Per-sample records that are missing, malformed or cannot be paired."""


def records_file(split: str) -> str:
    return f"{split}_samples.json"


@dataclass(frozen=True)
class SampleRecords:
    """One model's per-sample outcomes on one split, in the evaluation's order.

    ``table`` columns: ``sample`` (path relative to the dataset root, or case id), ``sha256``
    (content hash, "" where none), and ``label`` + ``pred`` (classification) or ``dice``
    (segmentation)."""

    task: str
    split: str
    class_names: tuple[str, ...]
    table: pd.DataFrame

    @property
    def metric(self) -> str:
        return PRIMARY_METRIC[self.task]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def digest(self) -> str:
        """SHA-256 over the sorted (sample, content hash[, label]) rows: the test set's identity."""
        columns = KEY_COLUMNS + (["label"] if self.task == "classification" else [])
        rows = sorted("\t".join(str(v) for v in row) for row in self.table[columns].itertuples(index=False))
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()

    def scores(self) -> np.ndarray:
        """The vector the bootstrap resamples: classification ``label * K + pred`` (one integer
        keeps a sample's label and prediction together through resampling), segmentation Dice."""
        if self.task == "classification":
            return self.table["label"].to_numpy(np.int64) * self.num_classes + self.table["pred"].to_numpy(np.int64)
        return self.table["dice"].to_numpy(np.float64)

    def aligned_to(self, other: "SampleRecords") -> "SampleRecords":
        """These records reordered to ``other``'s sample order; ``RecordsError`` unless both hold
        exactly the same samples (path and content) with the same labels."""
        if self.task != other.task or self.class_names != other.class_names:
            raise RecordsError(f"records of a {self.task} model over {list(self.class_names)} cannot pair with "
                               f"a {other.task} model over {list(other.class_names)}")
        if self.digest() != other.digest():
            raise RecordsError(f"the two evaluations scored different {self.split} samples "
                               f"(test-set digests {self.digest()[:12]} and {other.digest()[:12]})")
        indexed = self.table.set_index(KEY_COLUMNS)
        table = indexed.loc[pd.MultiIndex.from_frame(other.table[KEY_COLUMNS])].reset_index()
        return SampleRecords(self.task, self.split, self.class_names, table[self.table.columns])


def split_sample_ids(cache_dir: Path, split: str, expected: int) -> pd.DataFrame:
    """The ``sample`` and ``sha256`` of each cached sample of ``split``, in cache order (the rows of
    ``splits.csv`` for that split, in the order the preprocess step wrote them)."""
    path = Path(cache_dir) / SPLITS_FILE
    if not path.is_file():
        raise RecordsError(f"{path} does not exist: run the preprocess step first")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    rows = table[(table["split"] == split) & (table["labelled"] == "1")]
    if len(rows) != expected:
        raise RecordsError(f"{path} lists {len(rows)} {split} samples but the cache holds {expected}")
    return pd.DataFrame({"sample": rows["path"].to_numpy(), "sha256": rows["sha256"].to_numpy()})


def classification_records(ids: pd.DataFrame, labels: Sequence[int], preds: Sequence[int], split: str,
                           class_names: Sequence[str]) -> SampleRecords:
    table = ids.assign(label=np.asarray(labels, dtype=np.int64), pred=np.asarray(preds, dtype=np.int64))
    return SampleRecords("classification", split, tuple(class_names), table.reset_index(drop=True))


def segmentation_records(cases: Sequence[str], dice: Sequence[float], split: str, class_names: Sequence[str],
                         hashes: Sequence[str] | None = None) -> SampleRecords:
    """Per case (image or volume): its Dice averaged over the foreground classes."""
    table = pd.DataFrame({"sample": list(cases), "sha256": list(hashes) if hashes is not None else [""] * len(cases),
                          "dice": np.asarray(dice, dtype=np.float64)})
    return SampleRecords("segmentation", split, tuple(class_names), table)


def write_records(path: Path, records: SampleRecords) -> Path:
    payload = {"task": records.task, "split": records.split, "metric": records.metric,
               "class_names": list(records.class_names), "columns": list(records.table.columns),
               "rows": records.table.to_numpy().tolist()}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload))
    return Path(path)


def read_records(path: Path) -> SampleRecords:
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        table = pd.DataFrame(payload["rows"], columns=payload["columns"])
        records = SampleRecords(payload["task"], payload["split"], tuple(payload["class_names"]), table)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecordsError(f"{path}: not a per-sample records file ({err})") from None
    if records.task not in PRIMARY_METRIC:
        raise RecordsError(f"{path}: unknown task {records.task!r}")
    return records
