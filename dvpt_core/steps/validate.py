"""Validate step: a Great Expectations suite over the dataset manifest, before anything trains.

The manifest (``dvpt_core.data.manifest``) turns each image into a row of facts; Great
Expectations judges those rows and renders Data Docs a person can browse. The step writes
``manifest.csv``, ``validation.json`` (every expectation's outcome and every offending file with
its reason) and ``data_docs/index.html``, and raises :class:`DataValidationError` naming every
offending file when the suite fails, so a bad dataset stops the pipeline here.

Great Expectations runs with an ephemeral (in-memory) context: the suite is defined in code and
versioned with it, so there is no ``gx/`` project folder to keep in sync, and only Data Docs are
written to disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.formats import read_dataset
from dvpt_core.data.manifest import build_manifest
from dvpt_core.data.records import SPLITS

log = logging.getLogger(__name__)

# Preprocessing converts greyscale to RGB, so both are accepted; anything else (CMYK, palette,
# 16-bit) points at files that did not come from a fundus camera's usual export.
ALLOWED_MODES = ("RGB", "L")
SUITE_NAME = "dataset_manifest"
SAME_CONTENT_COLUMN = "splits_with_same_content"
RESULT_FILE = "validation.json"
MANIFEST_FILE = "manifest.csv"
DOCS_DIR = "data_docs"


class DataValidationError(ValueError):
    """The dataset failed validation; the message names every offending file and why."""


@dataclass(frozen=True)
class Check:
    """One expectation and how to explain a row it rejects to a person."""

    expectation: Any  # a great_expectations Expectation (imported lazily: the import is slow)
    explain: Callable[[pd.Series], str]


def validate(cfg: ExperimentConfig, data_root: Path, out_dir: Path) -> dict:
    """Validate the dataset at ``data_root``; returns the summary also written to ``validation.json``.

    Format errors that make the dataset unreadable as a whole (a missing or malformed list file,
    a listed file that does not exist) are raised by the reader before any expectation runs.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(data_root, read_dataset(cfg.data, data_root), cfg.data.max_pixels)
    manifest.to_csv(out_dir / MANIFEST_FILE, index=False)
    checks = manifest_checks(cfg.data.num_classes, cfg.data.max_pixels)
    frame = with_derived_columns(manifest)
    results = run_suite(frame, checks, out_dir / DOCS_DIR)
    summary = summarise(frame, checks, results, data_root, out_dir)
    (out_dir / RESULT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["success"]:
        raise DataValidationError(failure_message(summary, data_root, out_dir))
    log.info("data validation of %s passed: %d images", data_root, len(manifest))
    return summary


def with_derived_columns(manifest: pd.DataFrame) -> pd.DataFrame:
    """Adds how many splits hold each content hash: more than one is a leak between splits."""
    frame = manifest.copy()
    frame[SAME_CONTENT_COLUMN] = frame.groupby("sha256")["split"].transform("nunique").astype("Int64")
    return frame


def manifest_checks(num_classes: int, max_pixels: int) -> list[Check]:
    """The suite: each expectation paired with the sentence that explains a rejected row."""
    gxe = _import_gx().expectations
    top = num_classes - 1
    return [
        Check(gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
              lambda r: f"unreadable image ({r['error']})"),
        Check(gxe.ExpectColumnValuesToNotBeNull(column="label"), lambda r: "label missing"),
        Check(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(num_classes))),
              lambda r: f"label {r['label']} not in 0-{top}"),
        Check(gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(ALLOWED_MODES)),
              lambda r: f"image mode {r['mode']} not in {', '.join(ALLOWED_MODES)}"),
        Check(gxe.ExpectColumnValuesToBeBetween(column="width", min_value=1),
              lambda r: f"width {r['width']} is not positive"),
        Check(gxe.ExpectColumnValuesToBeBetween(column="height", min_value=1),
              lambda r: f"height {r['height']} is not positive"),
        Check(gxe.ExpectColumnValuesToBeBetween(column="pixels", min_value=1, max_value=max_pixels),
              lambda r: f"{r['width']}x{r['height']} = {r['pixels']} pixels not in 1-{max_pixels} (data.max_pixels)"),
        Check(gxe.ExpectColumnValuesToBeUnique(column="path"), lambda r: "listed more than once"),
        Check(gxe.ExpectColumnValuesToBeBetween(column=SAME_CONTENT_COLUMN, min_value=1, max_value=1),
              lambda r: f"identical content (sha256 {r['sha256'][:12]}) is in more than one split"),
        # Table-level: a missing split has no row to blame (explained in ``offending_rows``).
        Check(gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS)),
              lambda r: ""),
    ]


def run_suite(frame: pd.DataFrame, checks: list[Check], docs_dir: Path) -> list[dict]:
    """Runs the checks through a Checkpoint that also renders Data Docs into ``docs_dir``.

    Returns one JSON-ready result per check, in the order of ``checks``.
    """
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _point_docs_at(context, docs_dir)
    batch = (
        context.data_sources.add_pandas("dataset")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    expectations = [suite.add_expectation(check.expectation) for check in checks]
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=SUITE_NAME, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=SUITE_NAME,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["path"]},
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = outcome.run_results.values()
    by_id = {r.expectation_config.id: r.to_json_dict() for r in validation.results}
    return [by_id[e.id] for e in expectations]


def _import_gx() -> ModuleType:
    """Imports Great Expectations (about 3 s, so only when validating) with analytics off.

    GX logs its internals at INFO; they are kept out of the step's log unless a user set a level.
    """
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # read when a context starts; no network here
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:
        gx_log.setLevel(logging.WARNING)
    import great_expectations
    import great_expectations.expectations  # noqa: F401  (the submodule the checks use)

    return great_expectations


def _point_docs_at(context: Any, docs_dir: Path) -> None:
    """Renders the ephemeral context's local Data Docs site into ``docs_dir`` (emptied first)."""
    shutil.rmtree(docs_dir, ignore_errors=True)
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    for name in list(context.list_data_docs_sites()):
        context.delete_data_docs_site(name)
    context.add_data_docs_site("local_site", site)


def summarise(
    frame: pd.DataFrame, checks: list[Check], results: list[dict], data_root: Path, out_dir: Path
) -> dict:
    """The JSON document written to ``validation.json``."""
    expectations = [_expectation_summary(result) for result in results]
    offending = offending_rows(frame, checks, results)
    return {
        "success": all(e["success"] for e in expectations),
        "data_root": str(data_root),
        "images": len(frame),
        "counts": {s: int((frame["split"] == s).sum()) for s in SPLITS},
        "manifest": str(out_dir / MANIFEST_FILE),
        "data_docs": str(out_dir / DOCS_DIR / "index.html"),
        "expectations": expectations,
        "offending": offending,
    }


def _expectation_summary(result: dict) -> dict:
    config, details = result["expectation_config"], result.get("result", {})
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    summary = {"expectation": config["type"], "kwargs": kwargs, "success": bool(result["success"])}
    for key in ("element_count", "unexpected_count", "missing_count", "observed_value"):
        if key in details:
            summary[key] = details[key]
    if result.get("exception_info", {}).get("raised_exception"):
        summary["exception"] = result["exception_info"]["exception_message"]
    return summary


def offending_rows(frame: pd.DataFrame, checks: list[Check], results: list[dict]) -> list[dict]:
    """``{"file", "reason"}`` for every rejected row of every failed check, sorted by file."""
    rows: dict[tuple[str, str], dict] = {}
    by_path = frame.drop_duplicates("path").set_index("path", drop=False)
    for check, result in zip(checks, results):
        if result["success"]:
            continue
        for entry in _explain(by_path, check, result):
            rows.setdefault((entry["file"], entry["reason"]), entry)
    return sorted(rows.values(), key=lambda e: (e["file"], e["reason"]))


def _explain(by_path: pd.DataFrame, check: Check, result: dict) -> list[dict]:
    """The offending rows of one failed check; ``by_path`` is the manifest indexed by path."""
    config = result["expectation_config"]
    column = config["kwargs"]["column"]
    if config["type"] == "expect_column_distinct_values_to_contain_set":
        missing = [s for s in SPLITS if s not in set(by_path["split"])]
        return [{"file": f"{s}.txt", "reason": f"split {s} has no gradable images", "column": column}
                for s in missing]
    if result.get("exception_info", {}).get("raised_exception"):
        return [{"file": "(all)", "reason": f"expectation on {column} raised: "
                 f"{result['exception_info']['exception_message']}", "column": column}]
    paths = [entry["path"] for entry in result["result"].get("unexpected_index_list", [])]
    explained = []
    for path in dict.fromkeys(paths):
        explained.append({"file": path, "reason": check.explain(by_path.loc[path]), "column": column})
    return explained


def failure_message(summary: dict, data_root: Path, out_dir: Path) -> str:
    lines = [f"{e['file']}: {e['reason']}" for e in summary["offending"]]
    failed = [f"{e['expectation']}({e['kwargs'].get('column')})" for e in summary["expectations"] if not e["success"]]
    head = (
        f"data validation of {data_root} failed ({len(lines)} problem(s); failed expectations: "
        f"{', '.join(failed)}). Details: {out_dir / RESULT_FILE}, {summary['data_docs']}"
    )
    return "\n".join([head, *lines])
