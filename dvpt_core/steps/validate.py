"""Validate step: a Great Expectations suite over the dataset manifest, before anything trains.

The reader of ``data.format`` lists the samples, the manifest (``dvpt_core.data.manifest``) turns
each into a row of facts, the split planner (``dvpt_core.data.splits``) adds the split each sample
will land in, and Great Expectations judges the rows with the suite of the task
(``classification`` or ``segmentation``) and renders Data Docs a person can browse. The step
writes ``manifest.csv``, ``validation.json`` (every expectation's outcome and every offending file
with its reason) and ``data_docs/index.html``, and raises :class:`DataValidationError` naming
every offending file when the suite fails, so a bad dataset stops the pipeline here.

Besides bad files, the suite judges the dataset as a whole, by rules ``validation.*`` in the
configuration sets to "error" (fails), "warning" (reported in ``validation.json``'s
``warnings``, the Data Docs and the log) or "ignore": a class with no sample in a split, a
dataset of one class, and image files in a split folder that the dataset's lists do not name.
``validation.json`` also records the data settings it judged by (``data_settings``): the
preprocess step reads only the samples of a passed report made with the same settings.

Nothing half-written is left behind: the report is built in a temporary directory beside
``out_dir`` and renamed into place whole, whether the data pass or fail (a failed report replaces
any earlier one, so a stale "passed" never sits beside bad data), and the step raises after that,
so no later step (preprocess, train) ever starts. A dataset the reader cannot even list (a missing
list file, a malformed line, a volume of the wrong dimensions) fails the same way, with
``validation.json`` naming the file the reader blamed.

Great Expectations runs with an ephemeral (in-memory) context: the suites are defined in code and
versioned with it, so there is no ``gx/`` project folder to keep in sync, and only Data Docs are
written to disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

from dvpt_core.config import DataConfig, ExperimentConfig, ValidationConfig
from dvpt_core.data.atomic import atomic_directory, is_non_empty_dir
from dvpt_core.data.formats import mask_policy, read_dataset, resolve_data_config, unlisted_files
from dvpt_core.data.manifest import AMBIGUITY, MAX_SLICES_AT_LIMIT, build_manifest, relative_path
from dvpt_core.data.records import SPLITS, Sample
from dvpt_core.data.splits import SplitLeakError, plan_splits

log = logging.getLogger(__name__)

# Preprocessing converts greyscale to RGB, so both are accepted; anything else (CMYK, palette,
# 16-bit, alpha) points at files that did not come from a camera's usual 8-bit export.
ALLOWED_MODES = ("RGB", "L")
# Masks: a binary mask may be any single-channel or RGB image (it is thresholded); a multi-class
# mask must hold class indices (greyscale or palette PNG, 16-bit allowed).
BINARY_MASK_MODES = ("1", "L", "P", "RGB")
INDEX_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B")
# A lossy (JPEG) binary mask passes while at most this share of its pixels is ambiguous (within
# ``manifest.AMBIGUITY`` of ``data.mask_threshold``): edges only, not a grey picture.
MAX_AMBIGUOUS_SHARE = 0.05
# Formats whose layout always names every split (DDR's three list files): an empty one is an error,
# not a split to carve. The file that names a split, for the report.
DECLARED_SPLITS = {"ddr": "{split}.txt"}
EXPECTED_NDIM = {"volume": 3, "slice": 2}

SUITE_NAMES = {"classification": "dataset_manifest_classification", "segmentation": "dataset_manifest_segmentation"}
SAME_CONTENT_COLUMN = "splits_with_same_content"
SAME_GROUP_COLUMN = "splits_with_same_group"
RESULT_FILE = "validation.json"
MANIFEST_FILE = "manifest.csv"
DOCS_DIR = "data_docs"
# The data settings a report holds for: what the suite judged by. A later step reading the
# report's manifest must use the same (split settings may differ: the planner runs again there).
GATE_SETTINGS = ("format", "task", "class_names", "max_pixels", "mask_threshold", "synapse_labels", "csv_file",
                 "link_roots")
MISSING_CLASSES_COLUMN = "classes_missing_from_split"
CLASSES_COLUMN = "classes_in_dataset"
UNLISTED_COLUMN = "unlisted_files"
# A rule's setting -> GX's severity of its expectation ("ignore" adds no expectation).
GX_SEVERITY = {"error": "critical", "warning": "warning"}


class DataValidationError(ValueError):
    """The dataset failed validation; the message names every offending file and why."""


def _image_file(row: pd.Series) -> str:
    return row["path"]


def _mask_file(row: pd.Series) -> str:
    return row["mask"]


@dataclass(frozen=True)
class Check:
    """One expectation and how to explain what it rejects to a person.

    Row-level checks explain each rejected row (``explain``) and blame ``file(row)``; table-level
    checks (a missing split has no row to blame) turn the result into offending entries (``table``).
    """

    expectation: Any  # a great_expectations Expectation (imported lazily: the import is slow)
    explain: Callable[[pd.Series], str] | None = None
    file: Callable[[pd.Series], str] = _image_file
    table: Callable[[dict], list[dict]] | None = None
    # "warning": a failure is reported but does not fail validation (a ``validation.*`` rule).
    severity: str = "error"


def validate(cfg: ExperimentConfig, data_root: Path, out_dir: Path) -> dict:
    """Validate the dataset at ``data_root``; returns the summary also written to ``validation.json``.

    ``out_dir`` is replaced only when it is empty or an earlier report (it holds ``validation.json``
    or ``manifest.csv``), so a mistyped path cannot wipe unrelated files.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    _check_replaceable(out_dir)
    with atomic_directory(out_dir, replace=True) as work:
        summary = _run(cfg, data_root, work, out_dir)
        (work / RESULT_FILE).write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    if not summary["success"]:
        raise DataValidationError(failure_message(summary, data_root, out_dir))
    for entry in summary["warnings"]:
        log.warning("%s: %s", entry["file"], entry["reason"])
    log.info("data validation of %s passed (%s suite): %d samples", data_root, summary["task"], summary["images"])
    return summary


def _check_replaceable(out_dir: Path) -> None:
    if is_non_empty_dir(out_dir) and not any((out_dir / name).is_file() for name in (RESULT_FILE, MANIFEST_FILE)):
        raise FileExistsError(
            f"{out_dir} is not empty and holds no {RESULT_FILE}: it is not a validation report, refusing to replace it"
        )


def _run(cfg: ExperimentConfig, data_root: Path, work: Path, out_dir: Path) -> dict:
    """Everything but the final rename: read, build the manifest, plan splits, run the suite."""
    data = cfg.data
    try:
        data = resolve_data_config(data, data_root)
        samples = read_dataset(data, data_root)
        unlisted = unlisted_files(data, data_root, samples)
    # The readers raise FileNotFoundError / DatasetFormatError (a ValueError) naming the file.
    except (OSError, ValueError) as err:
        log.error("cannot read the dataset at %s: %s", data_root, err)
        return unreadable_summary(err, data, data_root)
    manifest = build_manifest(data_root, samples, data.max_pixels, mask_threshold=data.mask_threshold,
                              link_roots=data.link_roots)
    manifest, plan_problem = with_planned_splits(manifest, samples, data, data_root)
    manifest.to_csv(work / MANIFEST_FILE, index=False)
    frame = with_derived_columns(manifest, data, len(unlisted))
    checks = suite_checks(frame, data, plan_problem)
    checks += dataset_checks(_import_gx().expectations, frame, data, cfg.validation,
                             {relative_path(data_root, path): where for path, where in unlisted.items()})
    suite = SUITE_NAMES[data.task]
    results = run_suite(frame, checks, work / DOCS_DIR, suite)
    return summarise(frame, checks, results, data, suite, data_root, out_dir, plan_problem)


# --- splits ---------------------------------------------------------------------------------


def with_planned_splits(
    manifest: pd.DataFrame, samples: list[Sample], data: DataConfig, root: Path
) -> tuple[pd.DataFrame, str]:
    """The manifest with ``named_split`` (as the dataset names it) and ``split`` (where the split
    planner puts the sample, as preprocessing will), plus ``duplicate_of`` for identical content
    the planner keeps once. Returns the planner's objection ("" if none).

    A leak between the dataset's own splits makes the planner refuse; ``split`` then stays as
    named, so the suite's leak expectations can name every file involved.
    """
    frame = manifest.copy()
    frame.insert(frame.columns.get_loc("split") + 1, "named_split", frame["split"])
    frame["duplicate_of"] = None
    # Unread files have no hash: a unique stand-in keeps the planner from calling them duplicates.
    digests = [d if isinstance(d, str) else f"unread:{i}" for i, d in enumerate(frame["sha256"])]
    try:
        plan = plan_splits(samples, digests, data)
    except SplitLeakError as err:
        log.warning("split planner: %s", err)
        return frame, ""
    except ValueError as err:
        return frame, str(err)
    planned = {_key(s): s.split for s in plan.samples}
    kept_for = {_key(dropped): kept for dropped, kept in plan.duplicates}
    splits, duplicates = [], []
    for sample in samples:
        key = _key(sample)
        if key in planned:
            splits.append(planned[key])
            duplicates.append(None)
        else:
            kept = kept_for[key]
            splits.append(planned[_key(kept)])
            duplicates.append(relative_path(root, kept.path))
    frame["split"] = splits
    frame["duplicate_of"] = duplicates
    return frame, ""


def _key(sample: Sample) -> tuple:
    return sample.path, sample.mask, sample.slice_index


# --- the suites -----------------------------------------------------------------------------


def with_derived_columns(manifest: pd.DataFrame, data: DataConfig, unlisted: int = 0) -> pd.DataFrame:
    """Columns the suite needs beyond the manifest's facts.

    ``row`` identifies rows in GX results; ``sample_id`` is a sample's identity (file, slice);
    the two ``splits_with_same_*`` count the splits holding each content hash and each patient
    (more than one is a leak); ``mask_matches_image``, ``mask_binary`` and ``mask_in_classes``
    judge masks by the task's classes. The dataset-wide columns: ``classes_missing_from_split``
    (the classes no sample of the row's split shows, "" when none), ``classes_in_dataset`` and
    ``unlisted_files`` (the same on every row: GX judges them with column min/max expectations).
    """
    frame = manifest.copy()
    frame.insert(0, "row", np.arange(len(frame)))
    slices = frame["slice_index"].astype("string").fillna("")
    frame["sample_id"] = frame["path"] + np.where(slices == "", "", "#slice" + slices)
    # Null where the sample has no split (the planner refused): no leak to judge, only its objection.
    unplanned = frame["split"].isna()
    for column, key in ((SAME_CONTENT_COLUMN, "sha256"), (SAME_GROUP_COLUMN, "group")):
        frame[column] = frame.groupby(key)["split"].transform("nunique").astype("Int64").mask(unplanned)
    both = frame["shape"].notna() & frame["mask_shape"].notna()
    frame["mask_matches_image"] = (frame["shape"] == frame["mask_shape"]).astype("boolean").mask(~both)
    decoded = frame["mask_decoded"].fillna(False).astype(bool)
    if data.num_classes == 2:
        frame["mask_binary"] = _judge_masks(frame, decoded, _binary)
    else:
        # Raw values must be class indices, or have a class in the format's table (Synapse's 13 organs).
        lut = mask_policy(data).lut
        top = data.num_classes if lut is None else len(lut)
        frame["mask_in_classes"] = _judge_masks(frame, decoded, lambda r: 0 <= r["mask_min"] and r["mask_max"] < top)
    shown = shown_classes(frame, data)
    missing = classes_missing(frame, shown, data)
    frame[MISSING_CLASSES_COLUMN] = frame["split"].map(lambda split: ", ".join(missing.get(split, []))).fillna("")
    present = set().union(*shown) if len(shown) else set()
    # Segmentation: background is always there; its classes to tell apart are the structures.
    frame[CLASSES_COLUMN] = len(present) + (data.task == "segmentation")
    frame[UNLISTED_COLUMN] = unlisted
    return frame


def shown_classes(frame: pd.DataFrame, data: DataConfig) -> pd.Series:
    """Per row, the classes the sample shows: its label (classification) or the structures its
    mask holds (segmentation: class indices above 0, read from the mask's recorded values the way
    preprocessing maps them: thresholded when binary, through the format's table where it has one)."""
    classes = range(data.num_classes)
    if data.task == "classification":
        return frame["label"].map(lambda label: frozenset({int(label)} & set(classes)) if pd.notna(label)
                                  else frozenset())
    lut = mask_policy(data).lut

    def structures(row: pd.Series) -> frozenset[int]:
        if pd.isna(row["mask_decoded"]) or not row["mask_decoded"] or pd.isna(row["mask_max"]):
            return frozenset()
        if data.num_classes == 2:
            top = int(row["mask_max"])
            return frozenset({1}) if top == 1 or top >= data.mask_threshold else frozenset()
        values = [int(v) for v in str(row["mask_values"]).split(",") if v.isdigit()]
        mapped = {int(lut[v]) for v in values if v < len(lut)} if lut is not None else set(values)
        return frozenset(c for c in mapped if 0 < c < data.num_classes)

    return frame.apply(structures, axis=1) if len(frame) else pd.Series([], dtype=object)


def classes_missing(frame: pd.DataFrame, shown: pd.Series, data: DataConfig) -> dict[str, list[str]]:
    """Per split holding samples, ``"<index> (<name>)"`` of each class none of them shows."""
    expected = range(data.num_classes) if data.task == "classification" else range(1, data.num_classes)
    missing = {}
    for split in SPLITS:
        rows = (frame["split"] == split).fillna(False).to_numpy(dtype=bool)
        if rows.any():
            present = set().union(*shown[rows])
            missing[split] = [f"{c} ({data.class_names[c]})" for c in expected if c not in present]
    return missing


def _judge_masks(frame: pd.DataFrame, decoded: pd.Series, judge: Callable[[pd.Series], bool]) -> pd.Series:
    """``judge`` of each decoded mask's row; null where no mask was decoded (nothing to judge)."""
    verdicts = pd.Series(pd.NA, index=frame.index, dtype="boolean")
    if decoded.any():
        verdicts[decoded] = frame[decoded].apply(lambda r: bool(judge(r)), axis=1)
    return verdicts


def _binary(row: pd.Series) -> bool:
    """A lossless binary mask holds 0/1 or 0/255 only; a lossy one has few ambiguous pixels."""
    if row["mask_lossy"]:
        return bool(row["mask_ambiguous"] <= MAX_AMBIGUOUS_SHARE)
    values = {int(v) for v in str(row["mask_values"]).split(",") if v.isdigit()}
    return row["mask_distinct"] <= 2 and (values <= {0, 1} or values <= {0, 255})


def suite_checks(frame: pd.DataFrame, data: DataConfig, plan_problem: str = "") -> list[Check]:
    """The suite of ``data.task``: each expectation paired with how it explains a rejection."""
    gxe = _import_gx().expectations
    checks = file_checks(gxe, data.max_pixels, prefix="", file=_image_file)
    checks.append(Check(
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(ALLOWED_MODES),
                                        row_condition=_kind_is("image")),
        lambda r: f"image mode {r['mode']} not allowed (allowed: {', '.join(ALLOWED_MODES)})"))
    for kind, ndim in EXPECTED_NDIM.items():
        checks.append(Check(
            gxe.ExpectColumnValuesToBeInSet(column="ndim", value_set=[ndim],
                                            row_condition=_kind_is(kind)),
            lambda r, ndim=ndim: f"{r['ndim']}-D array of shape {r['shape']}, expected {ndim}-D"))
    if data.task == "classification":
        checks += label_checks(gxe, data)
    else:
        checks += mask_checks(gxe, data)
    checks += split_checks(gxe, frame, data, plan_problem)
    return checks


def _kind_is(kind: str) -> Any:
    """A GX row condition: only rows whose file is of this ``kind`` (see ``manifest.file_kind``)."""
    from great_expectations.expectations.row_conditions import Column

    return Column("kind") == kind


def file_checks(gxe: Any, max_pixels: int, prefix: str, file: Callable[[pd.Series], str]) -> list[Check]:
    """Root, emptiness, pixel limit and decoding of the image files (``prefix=""``) or masks (``"mask_"``)."""
    what = "mask file" if prefix else "file"
    return [
        Check(gxe.ExpectColumnValuesToBeInSet(column=f"{prefix}inside_root", value_set=[True]),
              lambda r: r[f"{prefix}error"], file),
        Check(gxe.ExpectColumnValuesToBeBetween(column=f"{prefix}bytes", min_value=1),
              lambda r: f"empty {what} (0 bytes)", file),
        Check(gxe.ExpectColumnValuesToBeBetween(column=f"{prefix}pixels", min_value=1, max_value=max_pixels),
              lambda r: f"{_plane(r, prefix)} = {r[f'{prefix}pixels']} pixels not in 1-{max_pixels} "
                        "(data.max_pixels; not decoded)", file),
        Check(gxe.ExpectColumnValuesToBeBetween(column=f"{prefix}voxels", min_value=1,
                                                max_value=max_pixels * MAX_SLICES_AT_LIMIT),
              lambda r: r[f"{prefix}error"], file),
        Check(gxe.ExpectColumnValuesToBeInSet(column=f"{prefix}decoded", value_set=[True]),
              lambda r: r[f"{prefix}error"], file),
    ]


def _plane(row: pd.Series, prefix: str) -> str:
    """``WxH``, and for an array the array's shape it is a slice of."""
    size, shape = f"{row[f'{prefix}width']}x{row[f'{prefix}height']}", row[f"{prefix}shape"]
    return size if shape == size else f"{shape}: a {size} slice"


def label_checks(gxe: Any, data: DataConfig) -> list[Check]:
    top = data.num_classes - 1
    return [
        Check(gxe.ExpectColumnValuesToNotBeNull(column="label"), lambda r: "label missing"),
        Check(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(data.num_classes))),
              lambda r: f"label {r['label']} not in 0-{top} (data.class_names has {data.num_classes} classes)"),
    ]


def mask_checks(gxe: Any, data: DataConfig) -> list[Check]:
    binary = data.num_classes == 2
    modes = BINARY_MASK_MODES if binary else INDEX_MASK_MODES
    checks = [
        Check(gxe.ExpectColumnValuesToNotBeNull(column="mask"), lambda r: "no mask for this image"),
        *file_checks(gxe, data.max_pixels, prefix="mask_", file=_mask_file),
        Check(gxe.ExpectColumnValuesToBeInSet(column="mask_mode", value_set=list(modes),
                                              row_condition=_kind_is("image")),
              lambda r: f"mask mode {r['mask_mode']} not allowed for {data.num_classes} classes "
                        f"(allowed: {', '.join(modes)})", _mask_file),
        Check(gxe.ExpectColumnValuesToBeInSet(column="mask_matches_image", value_set=[True]),
              lambda r: f"mask is {r['mask_shape']} but its image {r['path']} is {r['shape']}", _mask_file),
        Check(gxe.ExpectColumnValuesToBeInSet(column="mask_integral", value_set=[True]),
              lambda r: "label values are not whole numbers", _mask_file),
    ]
    if binary:
        checks.append(Check(gxe.ExpectColumnValuesToBeInSet(column="mask_binary", value_set=[True]),
                            lambda r: _not_binary(r, data.mask_threshold), _mask_file))
    else:
        checks += [
            Check(gxe.ExpectColumnValuesToBeInSet(column="mask_in_classes", value_set=[True]),
                  lambda r: f"mask values {r['mask_values']} are not class indices 0-{data.num_classes - 1} "
                            f"(data.class_names has {data.num_classes} classes)", _mask_file),
            Check(gxe.ExpectColumnValuesToBeInSet(column="mask_lossy", value_set=[False]),
                  lambda r: f"a JPEG mask is lossy, so it cannot hold {data.num_classes} class indices; "
                            "save multi-class masks as PNG", _mask_file),
        ]
    return checks


def _not_binary(row: pd.Series, threshold: int) -> str:
    if row["mask_lossy"]:
        return (f"mask is not binary: {row['mask_ambiguous']:.0%} of its pixels lie within {AMBIGUITY} of "
                f"data.mask_threshold={threshold} (at most {MAX_AMBIGUOUS_SHARE:.0%} expected for a JPEG mask)")
    return f"mask is not binary: values {row['mask_values']} (expected 0/1 or 0/255)"


def split_checks(gxe: Any, frame: pd.DataFrame, data: DataConfig, plan_problem: str) -> list[Check]:
    def same_content(r: pd.Series) -> str:
        twins = frame[(frame["sha256"] == r["sha256"]) & (frame["split"] != r["split"])]
        shown = ", ".join(f"{p} ({s})" for p, s in dict.fromkeys(zip(twins["path"], twins["split"])))
        return f"identical content (sha256 {r['sha256'][:12]}) is in more than one split: {r['split']} and {shown}"

    def same_group(r: pd.Series) -> str:
        splits = sorted(set(frame.loc[frame["group"] == r["group"], "split"].dropna()))
        return f"patient/case {r['group']} is in more than one split ({', '.join(splits)})"

    def missing(column: str, file: Callable[[str], str], reason: Callable[[str], str]) -> list[dict]:
        observed = set(frame[column].dropna())
        return [{"file": file(s), "reason": reason(s), "column": column} for s in SPLITS if s not in observed]

    checks = [
        Check(gxe.ExpectColumnValuesToBeUnique(column="sample_id"), lambda r: "listed more than once"),
        Check(gxe.ExpectColumnValuesToBeBetween(column=SAME_CONTENT_COLUMN, min_value=1, max_value=1), same_content),
        Check(gxe.ExpectColumnValuesToBeBetween(column=SAME_GROUP_COLUMN, min_value=1, max_value=1), same_group),
        Check(gxe.ExpectColumnDistinctValuesToContainSet(column="split", value_set=list(SPLITS)),
              table=lambda result: missing(
                  "split", lambda s: "(splits)",
                  lambda s: f"split {s} is empty" + (f": {plan_problem}" if plan_problem else ""))),
    ]
    if data.format in DECLARED_SPLITS:
        name = DECLARED_SPLITS[data.format]
        checks.append(Check(
            gxe.ExpectColumnDistinctValuesToContainSet(column="named_split", value_set=list(SPLITS)),
            table=lambda result: missing("named_split", lambda s: name.format(split=s),
                                         lambda s: f"split {s} lists no usable samples")))
    return checks


def dataset_checks(gxe: Any, frame: pd.DataFrame, data: DataConfig, rules: ValidationConfig,
                   unlisted: dict[str, str]) -> list[Check]:
    """The ``validation.*`` rules over the dataset as a whole, each an expectation of the rule's
    severity (none for "ignore"), explained per split, per dataset or per unlisted file."""
    from great_expectations.expectations.row_conditions import Column

    checks = []

    def add(rule: str, expectation: Any, table: Callable[[dict], list[dict]]) -> None:
        severity = getattr(rules, rule)
        if severity == "ignore":
            return
        expectation.severity = GX_SEVERITY[severity]
        expectation.notes = f"validation.{rule} = {severity} (error fails validation, warning reports it)"
        checks.append(Check(expectation, table=table, severity=severity))

    def missing_in(split: str, rule: str) -> Callable[[dict], list[dict]]:
        def entries(result: dict) -> list[dict]:
            names = frame.loc[frame["split"] == split, MISSING_CLASSES_COLUMN].iloc[0]
            what = "mask shows" if data.task == "segmentation" else "sample is of"
            return [{"file": "(splits)", "reason": f"no {split} {what} class {names} (validation.{rule})",
                     "column": MISSING_CLASSES_COLUMN}]
        return entries

    for split in SPLITS:
        rule = "class_missing_from_train" if split == "train" else "class_missing_from_eval"
        add(rule, gxe.ExpectColumnValuesToBeInSet(column=MISSING_CLASSES_COLUMN, value_set=[""],
                                                  row_condition=Column("split") == split),
            missing_in(split, rule))

    def one_class(result: dict) -> list[dict]:
        if data.task == "segmentation":
            reason = "every mask is background only: nothing to segment"
        else:
            labels = sorted(set(frame["label"].dropna()) & set(range(data.num_classes)))
            reason = (f"every sample is of class {labels[0]} ({data.class_names[labels[0]]})" if labels
                      else "no sample has a usable label") + ": nothing to tell apart"
        return [{"file": "(dataset)", "reason": f"{reason} (validation.single_class)", "column": CLASSES_COLUMN}]

    add("single_class", gxe.ExpectColumnMinToBeBetween(column=CLASSES_COLUMN, min_value=2), one_class)
    add("unlisted_files", gxe.ExpectColumnMaxToBeBetween(column=UNLISTED_COLUMN, max_value=0),
        lambda result: [{"file": file, "reason": f"in a split folder but not listed in {where}, so never read "
                         "(validation.unlisted_files)", "column": UNLISTED_COLUMN} for file, where in unlisted.items()])
    return checks


# --- running GX -----------------------------------------------------------------------------


def run_suite(frame: pd.DataFrame, checks: list[Check], docs_dir: Path, suite_name: str) -> list[dict]:
    """Runs the checks through a Checkpoint that also renders Data Docs into ``docs_dir``.

    Returns one JSON-ready result per check, in the order of ``checks``.
    """
    gx = _import_gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    _quiet_gx()  # modules the context just imported
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    _point_docs_at(context, docs_dir)
    batch = (
        context.data_sources.add_pandas("dataset")
        .add_dataframe_asset("manifest")
        .add_batch_definition_whole_dataframe("manifest")
    )
    # Given whole: adding expectations one by one re-serialises the stored suite on each (quadratic).
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name,
                                                   expectations=[check.expectation for check in checks]))
    expectations = suite.expectations
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=suite_name,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["row"]},
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    (validation,) = outcome.run_results.values()
    by_id = {r.expectation_config.id: r.to_json_dict() for r in validation.results}
    return [by_id[e.id] for e in expectations]


def _import_gx() -> ModuleType:
    """Imports Great Expectations (seconds, so only when validating) with analytics off."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # read when a context starts; no network here
    global _GX_QUIET
    if _GX_QUIET is None:
        # Decided before GX's first import: a level set by the user is theirs to keep.
        _GX_QUIET = logging.getLogger("great_expectations").level == logging.NOTSET
    if _GX_QUIET:
        logging.getLogger("great_expectations").setLevel(logging.WARNING)  # before: the import logs
    import great_expectations
    import great_expectations.expectations  # noqa: F401  (the submodule the checks use)

    _quiet_gx()
    return great_expectations


_GX_QUIET: bool | None = None


def _quiet_gx() -> None:
    """GX logs its internals at INFO, and some of its modules set INFO on their own loggers: keep
    them at WARNING (unless the user configured GX's logging), so the step's log stays readable."""
    if not _GX_QUIET:
        return
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("great_expectations.") and isinstance(logger, logging.Logger) \
                and logging.NOTSET < logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


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


# --- the report -----------------------------------------------------------------------------


def summarise(
    frame: pd.DataFrame, checks: list[Check], results: list[dict], data: DataConfig, suite: str,
    data_root: Path, out_dir: Path, plan_problem: str = "",
) -> dict:
    """The JSON document written to ``validation.json``.

    A split planner's objection fails validation even when every expectation passed (the splits
    the dataset names may all be there while the settings cannot carve the rest)."""
    expectations = [{**_expectation_summary(result), "severity": check.severity}
                    for check, result in zip(checks, results)]
    offending = offending_rows(frame, checks, results, "error")
    if plan_problem and not any(plan_problem in e["reason"] for e in offending):
        offending.append({"file": "(splits)", "reason": plan_problem, "column": "split"})
    return {
        "success": all(e["success"] for e in expectations if e["severity"] == "error") and not plan_problem,
        "stage": "suite",
        "data_root": str(data_root),
        "format": data.format,
        "task": data.task,
        "suite": suite,
        "images": len(frame),
        "files": int(frame["path"].nunique()),
        "counts": {s: int((frame["split"] == s).sum()) for s in SPLITS},
        "duplicates_kept_once": int(frame["duplicate_of"].notna().sum()),
        "manifest": str(out_dir / MANIFEST_FILE),
        "data_docs": str(out_dir / DOCS_DIR / "index.html"),
        "expectations": expectations,
        "split_planner": plan_problem or "ok",
        "offending": offending,
        "warnings": offending_rows(frame, checks, results, "warning"),
        "data_settings": gate_settings(data),
    }


def gate_settings(data: DataConfig) -> dict[str, Any]:
    """The settings of :data:`GATE_SETTINGS`, as JSON, for the report."""
    dumped = data.model_dump(mode="json")
    return {key: dumped[key] for key in GATE_SETTINGS}


def unreadable_summary(err: Exception, data: DataConfig, data_root: Path) -> dict:
    """The report when the reader cannot list the dataset: no manifest, no suite, the reader's blame."""
    return {
        "success": False,
        "stage": "read",
        "data_root": str(data_root),
        "format": data.format,
        "task": data.task,
        "suite": None,
        "images": 0,
        "counts": {},
        "manifest": None,
        "data_docs": None,
        "expectations": [],
        "error": f"{type(err).__name__}: {err}",
        "offending": [blame(str(err), data_root)],
        "warnings": [],
        "data_settings": gate_settings(data),
    }


# "<file>: reason" or "<file>:<line>: reason", as the readers word their errors.
_LOCATED = re.compile(r"(?P<file>[^\s:]+)(?::(?P<line>\d+))?: (?P<reason>.+)", re.S)


def blame(message: str, root: Path) -> dict:
    """``{"file", "reason"}`` of a reader's error message (the file relative to ``root`` where inside)."""
    match = _LOCATED.fullmatch(message)
    if not match or not Path(match["file"]).suffix:
        return {"file": ".", "reason": message, "column": None}
    path = Path(match["file"])
    file = relative_path(root, path) if path.is_absolute() and path.is_relative_to(root.absolute()) else str(path)
    if match["line"]:
        file += f":{match['line']}"
    return {"file": file, "reason": match["reason"], "column": None}


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


def offending_rows(frame: pd.DataFrame, checks: list[Check], results: list[dict], severity: str = "error") -> list[dict]:
    """``{"file", "reason", "column"}`` for every rejection of every failed check of ``severity``,
    sorted by file."""
    entries: dict[tuple[str, str], dict] = {}
    for check, result in zip(checks, results):
        if result["success"] or check.severity != severity:
            continue
        for entry in _explain(frame, check, result):
            entries.setdefault((entry["file"], entry["reason"]), entry)
    return sorted(entries.values(), key=lambda e: (e["file"], e["reason"]))


def _explain(frame: pd.DataFrame, check: Check, result: dict) -> list[dict]:
    column = result["expectation_config"]["kwargs"].get("column")
    if result.get("exception_info", {}).get("raised_exception"):
        return [{"file": "(all)", "reason": f"expectation on {column} raised: "
                 f"{result['exception_info']['exception_message']}", "column": column}]
    if check.table is not None:
        return check.table(result)
    rows = [entry["row"] for entry in result["result"].get("unexpected_index_list", [])]
    return [{"file": check.file(frame.iloc[row]), "reason": check.explain(frame.iloc[row]), "column": column}
            for row in dict.fromkeys(rows)]


def failure_message(summary: dict, data_root: Path, out_dir: Path) -> str:
    lines = [f"{e['file']}: {e['reason']}" for e in summary["offending"]]
    details = f"Details: {out_dir / RESULT_FILE}" + (f", {summary['data_docs']}" if summary["data_docs"] else "")
    if summary["stage"] == "read":
        head = f"data validation of {data_root} failed: the dataset cannot be read ({summary['error']}). {details}"
    else:
        failed = [f"{e['expectation']}({e['kwargs'].get('column')})" for e in summary["expectations"]
                  if not e["success"] and e["severity"] == "error"]
        if summary["split_planner"] != "ok":
            failed.append("split planner")
        head = (f"data validation of {data_root} failed ({len(lines)} problem(s); {summary['suite']} suite, "
                f"failed expectations: {', '.join(failed)}). {details}")
    return "\n".join([head, *lines])


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
