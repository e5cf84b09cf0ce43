"""Train / validation / test splits, k folds and labelled-ratio subsets: seeded, by patient, leak-free.

Rules, in order:
1. De-duplication: samples with identical content (sha256 of the image file, per slice for a
   file holding several) are kept once. The copy in a split the dataset names is preferred; two
   copies in different named splits are a leak in the dataset itself and are reported, not
   silently resolved.
2. Splits the dataset names (DDR's lists, ISIC's and Synapse's test sets) are kept. The splits it
   lacks are carved from the rest (its unassigned samples plus its training split), by unit: a
   patient or case (``Sample.group``) where the format knows one, else the image, so no patient
   straddles splits. ``test_fraction`` and ``val_fraction`` are fractions of those units (ACDC:
   70 / 10 / 20 patients). With ``folds`` = k > 1 the units are dealt into k folds and fold
   ``fold`` is held out as the first missing split (test, else valid); the validation split is
   then carved from the other folds. Classification units are stratified by label. Samples
   without a named split in a dataset that names all three join the training split.
3. ``label_ratio`` keeps that share of the training units (at least one). The units are ranked
   once by a stratified order seeded with ``label_seed`` (else ``split_seed``) that does not depend
   on the ratio, and a ratio takes a prefix of it, so every smaller subset lies inside every larger
   one (10 % in 20 % in ... in 100 %). The preprocess step caches the whole training split and
   training takes the subset from ``splits.csv`` (:func:`labelled_rows`), so one cache serves
   every ratio.
4. Leakage check: no content hash and no group may appear in two splits.

Everything is a pure function of the samples, their hashes and the ``data`` settings: the same
inputs give the same splits on any machine, and the step writes them to ``splits.csv`` so DVC
versions them and the training run can log them.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dvpt_core.config import DataConfig
from dvpt_core.data.manifest import relative_path
from dvpt_core.data.parallel import map_ordered
from dvpt_core.data.records import SPLITS, Sample

log = logging.getLogger(__name__)

# Independent random streams of one seed: the split order never depends on the label ratio.
SPLIT_STREAM, RATIO_STREAM = 0, 1
SPLITS_COLUMNS = ("path", "mask", "group", "volume", "slice_index", "label", "split", "labelled", "sha256")


class SplitLeakError(ValueError):
    """The same content or patient lies in two splits; the message names the files."""


@dataclass(frozen=True)
class SplitPlan:
    """The outcome: kept samples (reading order, split set), their hashes, the labelled subset."""

    samples: list[Sample]
    digests: list[str]
    # False for a training sample outside ``data.label_ratio``'s subset (never trained on).
    labelled: list[bool]
    # (dropped copy, the kept sample with the same content)
    duplicates: list[tuple[Sample, Sample]]

    def split(self, name: str) -> list[Sample]:
        """The samples a step uses for split ``name``: the training split only where labelled."""
        return [s for s, keep in zip(self.samples, self.labelled) if s.split == name and keep]

    def summary(self, root: Path, data: DataConfig) -> dict:
        """Settings and sizes, for ``meta.json`` and the run's parameters."""
        units = {name: len({s.unit for s in self.split(name)}) for name in SPLITS}
        return {
            "split_seed": data.split_seed, "folds": data.folds, "fold": data.fold,
            "val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
            "label_ratio": data.label_ratio,
            "samples": {name: len(self.split(name)) for name in SPLITS},
            "units": units,
            "unlabelled_train": self.labelled.count(False),
            "duplicates_dropped": [
                {"dropped": relative_path(root, a.path), "kept": relative_path(root, b.path)} for a, b in self.duplicates
            ],
        }


def file_digests(paths: Sequence[Path]) -> list[str]:
    """sha256 of each file, each distinct file read once (a volume serves all its slices).

    Pass the samples' image paths for the content hashes the splits use."""
    unique = list(dict.fromkeys(paths))
    digests = dict(zip(unique, map_ordered(_sha256, unique, desc="hash")))
    return [digests[path] for path in paths]


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def plan_splits(samples: Sequence[Sample], digests: Sequence[str], data: DataConfig) -> SplitPlan:
    """Apply rules 1-4 of the module docstring; raises :class:`SplitLeakError` on a leak."""
    keep, duplicates = deduplicate(samples, digests)
    kept = assign_splits([samples[i] for i in keep], data)
    kept_digests = [digests[i] for i in keep]
    check_no_leakage(kept, kept_digests)
    chosen = labelled_units(kept, data)
    labelled = [s.split != "train" or s.unit in chosen for s in kept]
    if duplicates:
        log.warning("dropped %d duplicate sample(s), e.g. %s (same content as %s)",
                    len(duplicates), samples[duplicates[0][0]].path, samples[duplicates[0][1]].path)
    return SplitPlan(kept, kept_digests, labelled, [(samples[a], samples[b]) for a, b in duplicates])


def content_keys(samples: Sequence[Sample], digests: Sequence[str]) -> list[tuple[str, int | None]]:
    """What makes two samples the same content: the file hash, plus the slice for multi-slice files."""
    per_file = Counter(s.path for s in samples)
    return [(d, s.slice_index if per_file[s.path] > 1 else None) for s, d in zip(samples, digests)]


def deduplicate(samples: Sequence[Sample], digests: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Indices to keep (in order) and (dropped, kept) index pairs of duplicate content."""
    by_key: dict[tuple[str, int | None], list[int]] = defaultdict(list)
    for index, key in enumerate(content_keys(samples, digests)):
        by_key[key].append(index)
    dropped: list[tuple[int, int]] = []
    for indices in by_key.values():
        named = {samples[i].split for i in indices} - {None}
        if len(indices) == 1 or len(named) > 1:
            continue  # unique, or a leak between the dataset's own splits: check_no_leakage names it
        keeper = next((i for i in indices if samples[i].split is not None), indices[0])
        dropped += [(i, keeper) for i in indices if i != keeper]
    gone = {i for i, _ in dropped}
    return [i for i in range(len(samples)) if i not in gone], sorted(dropped)


def assign_splits(samples: Sequence[Sample], data: DataConfig) -> list[Sample]:
    """The samples with every split set (rule 2 of the module docstring), in the same order."""
    named = named_unit_splits(samples)
    present = set(named.values()) - {None}
    missing = [name for name in ("test", "valid") if name not in present]
    pool = sorted(unit for unit, split in named.items() if split in (None, "train"))
    order = [pool[i] for i in stratified_order(unit_strata(samples, pool, data), _rng(data.split_seed, SPLIT_STREAM))]
    assigned = {**named, **dict.fromkeys(pool, "train")}
    if data.folds > 1:
        if not missing:
            raise ValueError(f"data.folds={data.folds}, but the dataset names all of {SPLITS}: no split to hold out")
        assigned.update(dict.fromkeys(order[data.fold::data.folds], missing.pop(0)))
        order = [unit for position, unit in enumerate(order) if position % data.folds != data.fold]
    fractions = {"test": data.test_fraction, "valid": data.val_fraction}
    for name in missing:
        count = max(1, round_half_up(fractions[name] * len(pool)))
        assigned.update(dict.fromkeys(order[:count], name))
        order = order[count:]
    sized = Counter(assigned.values())
    empty = [name for name in SPLITS if not sized[name]]
    if empty:
        raise ValueError(
            f"split(s) {', '.join(empty)} would be empty: {len(pool)} unit(s) to split with "
            f"data.folds={data.folds}, data.val_fraction={data.val_fraction}, data.test_fraction={data.test_fraction}"
        )
    return [replace(s, split=assigned[s.unit]) for s in samples]


def named_unit_splits(samples: Sequence[Sample]) -> dict[str, str | None]:
    """Each unit's split as the dataset names it (``None``: not named); a unit in two is a leak."""
    splits: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        splits[s.unit] |= {s.split} - {None}
    torn = {unit: names for unit, names in splits.items() if len(names) > 1}
    if torn:
        raise SplitLeakError("patient/case in more than one split: " + "; ".join(
            f"{unit} in {', '.join(sorted(names))}" for unit, names in sorted(torn.items())))
    return {unit: next(iter(names), None) for unit, names in splits.items()}


def unit_strata(samples: Sequence[Sample], units: Sequence[str], data: DataConfig) -> list[Hashable]:
    """Classification units are stratified by their (first) sample's label; segmentation is not."""
    if data.task != "classification":
        return [0] * len(units)
    label = {}
    for s in samples:
        label.setdefault(s.unit, s.label)
    return [label[unit] for unit in units]


def labelled_units(samples: Sequence[Sample], data: DataConfig) -> set[str]:
    """The training units inside ``data.label_ratio``'s subset (rule 3)."""
    units = sorted({s.unit for s in samples if s.split == "train"})
    seed = data.split_seed if data.label_seed is None else data.label_seed
    order = stratified_order(unit_strata(samples, units, data), _rng(seed, RATIO_STREAM))
    count = max(1, round_half_up(data.label_ratio * len(units)))
    return {units[i] for i in order[:count]}


def stratified_order(strata: Sequence[Hashable], rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation of ``range(len(strata))`` in which every prefix holds each stratum in
    close to its overall proportion, so a prefix or every k-th element is a stratified sample.

    Each stratum's members are shuffled and spread evenly over [0, 1) (with a random offset);
    sorting by that position interleaves the strata.
    """
    positions = np.empty(len(strata))
    for stratum in sorted(set(strata), key=repr):
        members = np.flatnonzero([s == stratum for s in strata])
        positions[members] = (rng.permutation(len(members)) + rng.random()) / len(members)
    return np.argsort(positions, kind="stable")


def round_half_up(value: float) -> int:
    """Python's round() rounds half to even (2.5 -> 2); splits should not depend on parity."""
    return int(np.floor(value + 0.5))


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def find_leaks(samples: Sequence[Sample], digests: Sequence[str]) -> list[str]:
    """One sentence per content hash or group found in more than one split."""
    problems = []
    for what, keys in (("content sha256", digests), ("patient/case", [s.group for s in samples])):
        splits: dict[str, set[str]] = defaultdict(set)
        files: dict[str, list[str]] = defaultdict(list)
        for s, key in zip(samples, keys):
            if key is not None:
                splits[key].add(str(s.split))
                files[key].append(str(s.path))
        for key, names in sorted(splits.items()):
            if len(names) > 1:
                shown = ", ".join(list(dict.fromkeys(files[key]))[:4])
                problems.append(f"{what} {key[:16]} is in splits {', '.join(sorted(names))}: {shown}")
    return problems


def check_no_leakage(samples: Sequence[Sample], digests: Sequence[str]) -> None:
    problems = find_leaks(samples, digests)
    if problems:
        raise SplitLeakError("data leak between splits:\n" + "\n".join(problems))


def labelled_rows(splits_csv: Path, data: DataConfig) -> list[int]:
    """Positions, in a cache's training split, of the samples inside ``data.label_ratio``'s subset
    (drawn with ``data.label_seed``), from the cache's ``splits.csv``: the samples
    :func:`plan_splits` labels when given the cache's samples and ``data``.

    Units are read back as the file records them: the group, else the image's path relative to
    the dataset root, which sorts as the absolute paths did. Refuses a cache that holds only part
    of its training split (one preprocessed before the subset was taken at training time).
    """
    with Path(splits_csv).open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    if not all(row["labelled"] == "1" for row in rows):
        raise ValueError(f"{splits_csv}: the cache holds only part of its training split (it was preprocessed "
                         "with a label ratio); run the preprocess step again")
    samples = [Sample(path=Path(row["path"]), label=int(row["label"]) if row["label"] else None, split="train",
                      group=row["group"] or None) for row in rows]
    chosen = labelled_units(samples, data)
    return [index for index, sample in enumerate(samples) if sample.unit in chosen]


def write_splits_csv(path: Path, plan: SplitPlan, root: Path) -> None:
    """One row per kept sample (paths relative to the dataset root), in reading order."""
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SPLITS_COLUMNS)
        for s, digest, labelled in zip(plan.samples, plan.digests, plan.labelled):
            writer.writerow([
                relative_path(root, s.path), "" if s.mask is None else relative_path(root, s.mask),
                s.group or "", s.volume or "", "" if s.slice_index is None else s.slice_index,
                "" if s.label is None else s.label, s.split, int(labelled), digest,
            ])
