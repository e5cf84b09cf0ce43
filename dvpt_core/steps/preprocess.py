"""Preprocess step: decode every image once into fixed-size uint8 arrays the trainer memory-maps.

Decoding full-size fundus JPEGs (or decompressing NIfTI volumes) dominates an epoch on real data;
doing it once here makes every epoch (and every hyper-parameter trial) read plain arrays instead.
The step reads only what the data gate passed: the samples of the validate step's manifest
(``--validation``), refusing to run without a passed report made with the same data settings or
when a listed file changed since (its sha256 differs), and naming the command to run. Those
samples are split by ``dvpt_core.data.splits`` (seeded, by patient, de-duplicated and
leak-checked). The whole training split is cached whatever ``data.label_ratio`` says: training
takes the labelled subset from ``splits.csv`` (``splits.labelled_rows``), so one cache serves every
label ratio and labelled-subset seed (a comparison grid preprocesses once). Per split the step writes ``<split>/images.npy`` (uint8, N x S x S x 3, RGB, bilinear resize)
and, for classification, ``<split>/labels.npy`` (int64); for segmentation ``<split>/masks.npy``
(uint8 N x S x S class indices, nearest-neighbour resize) with ``volumes.npy`` / ``slices.npy``
(each slice's volume id and index, so evaluation can restack 3D volumes), and for 3D data
``volumes.json`` and ``volume_labels.npz`` (``dvpt_core.data.cases``). ``splits.csv`` records
every sample's split and content hash and ``meta.json`` the settings and counts. Everything is
written into a temporary directory beside ``out_dir`` and renamed into place at the end, so a
crash never leaves a half-written cache for DVC or the next step to pick up. The free space is
checked against the arrays' size first and their blocks are reserved before any is written, so
a full disk is a one-line error naming the folder and the space needed, never a SIGBUS.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import numpy as np

from dvpt_core.config import DataConfig, ExperimentConfig
from dvpt_core.data.atomic import atomic_directory, is_non_empty_dir
from dvpt_core.data.cases import write_volume_cache
from dvpt_core.data.cache_layout import (
    IMAGES_FILE, LABELS_FILE, MASKS_FILE, META_FILE, SLICES_FILE, SPLITS_FILE, VOLUMES_FILE,
)
from dvpt_core.data.formats import mask_policy, resolve_data_config
from dvpt_core.data.formats.pixels import MaskPolicy, load_resized
from dvpt_core.data.manifest import read_manifest, relative_path
from dvpt_core.data.parallel import map_ordered
from dvpt_core.data.records import SPLITS, Sample
from dvpt_core.data.splits import SplitPlan, file_digests, plan_splits, write_splits_csv
from dvpt_core.steps.validate import MANIFEST_FILE, RESULT_FILE, gate_settings
from dvpt_core.storage import disk_full_as_error, open_reserved_memmap, require_free_space

log = logging.getLogger(__name__)
# Beyond the arrays: a row of splits.csv per sample (paths and a sha256: well under this), and
# meta.json and the .npy headers once.
SPLITS_ROW_BYTES = 512
SPACE_MARGIN = 1 << 20


class NotValidatedError(ValueError):
    """The data were not passed by the validate step as they are now; says what to run."""


def preprocess(cfg: ExperimentConfig, data_root: Path, out_dir: Path, validation_dir: Path) -> dict:
    """Build the array cache of the dataset at ``data_root`` in ``out_dir``; returns ``meta.json``'s content.

    ``validation_dir``: the validate step's output for this dataset (see the module docstring).
    ``out_dir`` is replaced only when it is empty or a previous cache (it holds ``meta.json``),
    so a mistyped path cannot wipe unrelated files.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    _check_replaceable(out_dir)
    data = resolve_data_config(cfg.data, data_root)
    samples = validated_samples(data, data_root, Path(validation_dir))
    if data.task == "classification":
        _check_labels(samples, data.num_classes)
    # Every training sample: the labelled subset is taken at training time.
    data = data.model_copy(update={"label_ratio": 1.0, "label_seed": None})
    plan = plan_splits(samples, file_digests([s.path for s in samples]), data)
    size = cfg.model.image_size
    needed = cache_bytes(plan, size, data.task) + SPACE_MARGIN
    require_free_space(out_dir.parent, needed, f"the {size}x{size} preprocessing cache")
    with disk_full_as_error(out_dir, needed, "the preprocessing cache"), \
            atomic_directory(out_dir, replace=True) as tmp:
        counts = {}
        for split in SPLITS:
            split_samples = plan.split(split)
            if not split_samples:
                raise ValueError(f"{data_root}: split {split} has no samples")
            counts[split] = write_split(tmp / split, split_samples, size, data, mask_policy(data))
        write_splits_csv(tmp / SPLITS_FILE, plan, data_root)
        meta = {
            "image_size": size,
            "format": data.format,
            "task": data.task,
            "class_names": list(data.class_names),
            "counts": counts,
            "splits": plan.summary(data_root, data),
            "source": str(data_root),
            "inputs_sha256": inputs_hash(data_root, plan),
            "layout": _layout(data.task),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("preprocessed %s (%s, %s) into %s at %d px: %s", data_root, data.format, data.task, out_dir, size,
             ", ".join(f"{s}: {c['total']}" for s, c in counts.items()))
    return meta


def validated_samples(data: DataConfig, root: Path, validation_dir: Path) -> list[Sample]:
    """The samples of the passed validation report in ``validation_dir``, unchanged since.

    Refused, naming what to run: no report, a failed one, one made with other data settings
    (``validate.GATE_SETTINGS``), or a listed file (image or mask) whose content changed.
    """
    rerun = f"run `dvpt validate --data {root} --out {validation_dir}` with this configuration"
    report_path = validation_dir / RESULT_FILE
    if not report_path.is_file():
        raise NotValidatedError(f"{report_path} does not exist: preprocess reads only data the validate step "
                                f"passed; {rerun} first")
    report = json.loads(report_path.read_text())
    if not report.get("success"):
        raise NotValidatedError(f"{report_path}: the data validation of {report.get('data_root')} failed; "
                                f"fix what it names, then {rerun} again")
    validated, current = report.get("data_settings") or {}, gate_settings(data)
    changed = [f"data.{key}={current[key]!r} (validated with {validated.get(key)!r})"
               for key in current if validated.get(key) != current[key]]
    if changed:
        raise NotValidatedError(f"{report_path} holds for other data settings: {'; '.join(changed)}; {rerun}")
    samples, digests, mask_digests = read_manifest(validation_dir / MANIFEST_FILE, root)
    _check_unchanged([s.path for s in samples], digests, root, rerun)
    masked = [(s.mask, d) for s, d in zip(samples, mask_digests) if d is not None]
    _check_unchanged([m for m, _ in masked], [d for _, d in masked], root, rerun)
    return samples


def _check_unchanged(paths: list[Path], recorded: list[str], root: Path, rerun: str) -> None:
    """Every file still there with the content the report recorded (each distinct file hashed once)."""
    gone = [p for p in dict.fromkeys(paths) if not p.is_file()]
    if gone:
        raise NotValidatedError(f"{gone[0]} is listed in the validated manifest but does not exist "
                                f"({len(gone)} such file(s)); {rerun}")
    for path, now, then in zip(paths, file_digests(paths), recorded):
        if now != then:
            raise NotValidatedError(f"{relative_path(root, path)} changed since it was validated (sha256 "
                                    f"{now[:12]}, validated {then[:12]}); {rerun}")


def cache_bytes(plan: SplitPlan, size: int, task: str) -> int:
    """What the cache takes on disk: images (and masks) at ``size``, the per-sample arrays, splits.csv."""
    count = sum(len(plan.split(split)) for split in SPLITS)
    per_sample = size * size * (3 + (task == "segmentation")) + 8
    return count * per_sample + len(plan.samples) * SPLITS_ROW_BYTES


def _check_replaceable(out_dir: Path) -> None:
    if is_non_empty_dir(out_dir) and not (out_dir / META_FILE).is_file():
        raise FileExistsError(
            f"{out_dir} is not empty and holds no {META_FILE}: it is not a preprocessing cache, refusing to replace it"
        )


def _layout(task: str) -> dict[str, str]:
    if task == "classification":
        return {"images": "uint8 NHWC RGB", "labels": "int64"}
    return {"images": "uint8 NHWC RGB", "masks": "uint8 NHW class indices",
            "volumes": "unicode volume id per slice ('' for 2D)", "slices": "int32 slice index (-1 for 2D)",
            "volumes.json": "3D only: per volume shape, slice axis, slices, spacing (mm), affine",
            "volume_labels.npz": "3D valid/test only: uint8 label volume at original resolution per volume id"}


def write_split(split_dir: Path, samples: list[Sample], size: int, data: DataConfig, policy: MaskPolicy) -> dict:
    """Writes one split's arrays; returns its counts for ``meta.json``."""
    split_dir.mkdir(parents=True)
    segmentation = data.task == "segmentation"
    # Written through memory maps, so a split larger than RAM (real DDR at 224 px: ~1 GB) is fine;
    # their blocks are reserved first, so a full disk raises here instead of a SIGBUS mid-write.
    images = open_reserved_memmap(split_dir / IMAGES_FILE, np.uint8, (len(samples), size, size, 3))
    masks = open_reserved_memmap(split_dir / MASKS_FILE, np.uint8, (len(samples), size, size)) \
        if segmentation else None

    def load(indices: list[int]) -> None:
        pairs = load_resized([samples[i] for i in indices], size, policy, data.max_pixels)
        for index, (image, mask) in zip(indices, pairs, strict=True):
            images[index] = image
            if masks is not None:
                masks[index] = mask

    map_ordered(load, same_file_runs(samples), desc=f"preprocess {samples[0].split}")
    images.flush()
    del images
    if masks is None:
        np.save(split_dir / LABELS_FILE, np.asarray([s.label for s in samples], dtype=np.int64))
        return _class_counts(samples, data.num_classes)
    masks.flush()
    np.save(split_dir / VOLUMES_FILE, np.asarray([s.volume or "" for s in samples], dtype=str))
    np.save(split_dir / SLICES_FILE, np.asarray([-1 if s.slice_index is None else s.slice_index for s in samples],
                                                dtype=np.int32))
    write_volume_cache(split_dir, samples, policy)
    return _pixel_counts(samples, masks, data.num_classes)


def same_file_runs(samples: list[Sample]) -> list[list[int]]:
    """Indices grouped into runs of consecutive samples from one file, so a volume is decoded once."""
    runs = itertools.groupby(range(len(samples)), key=lambda i: samples[i].path)
    return [list(indices) for _, indices in runs]


def inputs_hash(root: Path, plan: SplitPlan) -> str:
    """One sha256 over every cached sample's split, path, label or mask, slice and content hash."""
    hasher = hashlib.sha256()
    rows = [(s, d) for s, d, keep in zip(plan.samples, plan.digests, plan.labelled, strict=True) if keep]
    masks = [s.mask for s, _ in rows if s.mask is not None]
    mask_digests = iter(file_digests(masks))
    for sample, digest in rows:
        target = sample.label if sample.mask is None else f"{relative_path(root, sample.mask)}:{next(mask_digests)}"
        hasher.update(
            f"{sample.split}\t{relative_path(root, sample.path)}\t{sample.slice_index}\t{target}\t{digest}\n".encode()
        )
    return hasher.hexdigest()


def _check_labels(samples: list[Sample], num_classes: int) -> None:
    """A label out of range would surface much later as an obscure loss error; stop here."""
    bad = [f"{s.path}: label {s.label} not in 0-{num_classes - 1}" for s in samples if not 0 <= s.label < num_classes]
    if bad:
        raise ValueError("labels out of range (run the validate step for a full report):\n" + "\n".join(bad))


def _class_counts(samples: list[Sample], num_classes: int) -> dict:
    per_class = np.bincount([s.label for s in samples], minlength=num_classes)
    return {"total": len(samples), "per_class": [int(n) for n in per_class]}


def _pixel_counts(samples: list[Sample], masks: np.ndarray, num_classes: int) -> dict:
    """Images (or slices), volumes, and each class's share of the mask pixels."""
    pixels = np.bincount(masks.reshape(-1), minlength=num_classes)
    return {
        "total": len(samples),
        "volumes": len({s.volume for s in samples if s.volume is not None}),
        "class_pixel_share": [round(float(n) / max(int(pixels.sum()), 1), 6) for n in pixels],
    }
