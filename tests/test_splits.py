"""Splits: stratified hold-out, k folds, nested labelled ratios, patient grouping, de-duplication, leaks."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import pytest

from dvpt_core.config import DataConfig, ExperimentConfig, SyntheticConfig
from dvpt_core.data.records import SPLITS, Sample
from dvpt_core.data.dataset import make_loader
from dvpt_core.data.formats import mask_policy
from dvpt_core.data.formats.pixels import load_resized
from dvpt_core.data.splits import (
    SplitLeakError, file_digests, labelled_rows, plan_splits, stratified_order, write_splits_csv,
)
from dvpt_core.data.synthetic.ddr import generate_ddr
from dvpt_core.data.synthetic.kvasir import generate_kvasir
from dvpt_core.steps.preprocess import preprocess, validated_samples
from tests.helpers import validated

RATIOS = (0.1, 0.2, 0.3, 0.4, 1.0)


def fake_digest(sample: Sample) -> str:
    return hashlib.sha256(str(sample.path).encode()).hexdigest()


def images(n: int, labels: list[int] | None = None, split: str | None = None, prefix: str = "img") -> list[Sample]:
    """``n`` 2D samples with distinct fake files (nothing is read from disk by the split logic)."""
    return [Sample(Path(f"/data/{prefix}{i:04d}.jpg"), None if labels is None else labels[i], split,
                   mask=None if labels is not None else Path(f"/data/{prefix}{i:04d}_mask.png"))
            for i in range(n)]


def patients(n: int, frames: int = 2, slices: int = 10) -> list[Sample]:
    """ACDC-like: every slice of each patient's ED and ES volumes."""
    return [
        Sample(Path(f"/acdc/patient{p:03d}_frame{f:02d}.nii.gz"), None, None,
               mask=Path(f"/acdc/patient{p:03d}_frame{f:02d}_gt.nii.gz"), group=f"patient{p:03d}",
               volume=f"patient{p:03d}_frame{f:02d}", slice_index=k)
        for p in range(1, n + 1) for f in range(1, frames + 1) for k in range(slices)
    ]


def plan(samples: list[Sample], **data: object):
    return plan_splits(samples, [fake_digest(s) for s in samples], DataConfig(**data))


def by_split(result) -> dict[str, list[Sample]]:
    return {name: result.split(name) for name in SPLITS}


def test_holdout_split_is_stratified_and_sized() -> None:
    labels = [0] * 100 + [1] * 60 + [2] * 30 + [3] * 10
    result = plan(images(200, labels), format="csv", task="classification", class_names=list("abcd"))
    splits = by_split(result)
    assert {k: len(v) for k, v in splits.items()} == {"train": 140, "valid": 20, "test": 40}
    for name, fraction in (("test", 0.2), ("valid", 0.1)):
        per_class = Counter(s.label for s in splits[name])
        for label, total in Counter(labels).items():
            assert abs(per_class[label] - fraction * total) <= 1, (name, label, per_class)
    assert [s.path for s in result.samples] == [s.path for s in images(200, labels)], "reading order is kept"


def test_kfold_partitions_the_units_and_carves_validation_from_the_rest() -> None:
    samples = images(1000)
    tests, valids = [], []
    for fold in range(5):
        splits = by_split(plan(samples, format="kvasir", fold=fold))
        assert {k: len(v) for k, v in splits.items()} == {"train": 700, "valid": 100, "test": 200}
        tests.append({s.path for s in splits["test"]})
        valids.append({s.path for s in splits["valid"]})
        assert not valids[-1] & tests[-1]
    assert set().union(*tests) == {s.path for s in samples}, "the 5 test folds cover every image"
    assert sum(len(t) for t in tests) == 1000, "and never overlap"


def test_a_fold_is_the_validation_split_when_the_dataset_ships_its_test_split() -> None:
    samples = images(90, split="train") + images(30, split="test", prefix="test")
    splits = by_split(plan(samples, format="isic2016", folds=3, fold=1))
    assert [s.path for s in splits["test"]] == [s.path for s in samples[90:]]
    assert (len(splits["valid"]), len(splits["train"])) == (30, 60)

    named = images(10, split="train") + images(5, split="valid", prefix="v") + images(5, split="test", prefix="t")
    with pytest.raises(ValueError, match="data.folds=5, but the dataset names all of"):
        plan(named, format="kvasir")


def test_label_ratios_are_nested_stratified_and_sized() -> None:
    labels = [0] * 300 + [1] * 100 + [2] * 50
    samples = images(450, labels)
    cfg = {"format": "csv", "task": "classification", "class_names": list("abc"), "split_seed": 3}
    full_train = {s.path for s in plan(samples, **cfg).split("train")}
    subsets = [plan(samples, label_ratio=r, **cfg).split("train") for r in RATIOS]
    for ratio, subset in zip(RATIOS, subsets):
        assert len(subset) == max(1, int(np.floor(ratio * len(full_train) + 0.5)))
        shares = Counter(s.label for s in subset)
        assert abs(shares[0] / len(subset) - 300 / 450) < 0.05, (ratio, shares)
    paths = [{s.path for s in subset} for subset in subsets]
    assert all(small <= large for small, large in zip(paths, paths[1:])), "smaller subsets lie inside larger ones"
    assert paths[-1] == full_train
    result = plan(samples, label_ratio=0.2, **cfg)
    assert {k: len(v) for k, v in by_split(result).items()}["test"] == 90, "the ratio only thins the training split"
    assert result.labelled.count(False) == len(full_train) - len(subsets[1])


def test_patients_never_straddle_splits_and_acdc_gets_70_10_20() -> None:
    result = plan(patients(100), format="acdc")
    groups = {name: {s.group for s in members} for name, members in by_split(result).items()}
    assert {k: len(v) for k, v in groups.items()} == {"train": 70, "valid": 10, "test": 20}
    assert not (groups["train"] & groups["valid"] or groups["train"] & groups["test"] or groups["valid"] & groups["test"])
    per_group = Counter(s.group for s in result.split("test"))
    assert set(per_group.values()) == {20}, "both frames and all slices of a patient travel together"

    thinned = plan(patients(100), format="acdc", label_ratio=0.1).split("train")
    assert len({s.group for s in thinned}) == 7 and len(thinned) == 7 * 20, "label ratios count patients"


def test_duplicates_are_dropped_and_leaks_between_named_splits_are_reported(caplog) -> None:
    samples = images(30)
    twin = Sample(Path("/data/copy_of_img0003.jpg"), None, None, mask=Path("/data/m.png"))
    other = Sample(Path("/data/copy_of_img0007.jpg"), None, None, mask=Path("/data/m7.png"))
    digests = [fake_digest(s) for s in samples] + [fake_digest(samples[3]), fake_digest(samples[7])]
    with caplog.at_level(logging.WARNING, logger="dvpt_core.data.splits"):
        result = plan_splits([*samples, twin, other], digests, DataConfig(format="kvasir", folds=1))
    assert len(result.samples) == 30 and not {twin.path, other.path} & {s.path for s in result.samples}
    assert [(a.path, b.path) for a, b in result.duplicates] == [(twin.path, samples[3].path), (other.path, samples[7].path)]
    assert f"dropped 2 duplicate sample(s), e.g. {twin.path} (same content as {samples[3].path})" in caplog.text
    with pytest.raises(dataclasses.FrozenInstanceError):  # validate and preprocess read one plan
        result.labelled = []

    train, test = images(10, split="train"), images(5, split="test", prefix="t")
    digests = [fake_digest(s) for s in train] + [fake_digest(train[0])] + [fake_digest(s) for s in test[1:]]
    with pytest.raises(SplitLeakError, match=r"content sha256 .* in splits test, train: /data/img0000.jpg, /data/t0000.jpg"):
        plan_splits(train + test, digests, DataConfig(format="isic2016"))

    torn = [Sample(Path("/a.nii.gz"), None, "train", Path("/a_gt.nii.gz"), group="case0001", slice_index=0),
            Sample(Path("/b.h5"), None, "test", Path("/b.h5"), group="case0001", slice_index=0)]
    with pytest.raises(SplitLeakError, match="case0001 in test, train"):
        plan(torn, format="synapse")


def test_splits_follow_the_seed() -> None:
    samples = images(100)
    first = [s.split for s in plan(samples, format="kvasir", split_seed=0).samples]
    assert first == [s.split for s in plan(samples, format="kvasir", split_seed=0).samples]
    assert first != [s.split for s in plan(samples, format="kvasir", split_seed=1).samples]
    order = stratified_order([0, 0, 1, 1, 1, 1], np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(6))


def test_too_few_units_name_the_settings() -> None:
    with pytest.raises(ValueError, match="split.* would be empty: 2 unit"):
        plan(patients(2), format="acdc")


# --- the preprocess step writes the split files ------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_preprocess_caches_every_training_sample_and_training_reads_the_labelled_subset(tmp_path: Path) -> None:
    root = tmp_path / "ddr"
    generate_ddr(root, SyntheticConfig(train=20, valid=5, test=5, image_size=48), DataConfig().class_names)
    cfg = ExperimentConfig(model={"image_size": 32, "weights": "random"}, data={"label_ratio": 0.3})
    validation = validated(cfg, root, tmp_path / "validation")
    meta = preprocess(cfg, root, tmp_path / "cache", validation)
    assert meta["counts"]["train"]["total"] == 20 and meta["splits"]["unlabelled_train"] == 0
    rows = read_rows(tmp_path / "cache" / "splits.csv")
    assert len(rows) == 30 and Counter(r["split"] for r in rows) == {"train": 20, "valid": 5, "test": 5}
    assert all(r["labelled"] == "1" for r in rows) and all(len(r["sha256"]) == 64 for r in rows)

    # The reference: the samples the split planner labels at this ratio, decoded from their files.
    samples = validated_samples(cfg.data, root, validation)
    digests = file_digests([s.path for s in samples])
    expected = plan_splits(samples, digests, cfg.data).split("train")
    assert len(expected) == 6
    pixels = np.stack([load_resized([s], 32, mask_policy(cfg.data), cfg.data.max_pixels)[0][0] for s in expected])
    loader = make_loader(tmp_path / "cache" / "train", (0.5,) * 3, (0.5,) * 3, True, cfg)
    subset = loader.dataset
    assert len(subset) == 6
    np.testing.assert_array_equal(subset.dataset.images[subset.indices], pixels)
    assert subset.dataset.labels[subset.indices].tolist() == [s.label for s in expected]
    # An epoch of the training loader reads exactly these rows, each once.
    labels = torch.cat([batch_labels for _, batch_labels in loader])
    assert sorted(labels.tolist()) == sorted(s.label for s in expected)
    # Validation and test are read whole.
    assert len(make_loader(tmp_path / "cache" / "valid", (0.5,) * 3, (0.5,) * 3, False, cfg).dataset) == 5

    # Each repetition seed of a comparison cell (data.label_seed) labels what data.split_seed did
    # before the subset moved to training time, for every ratio: DDR names its splits, so the split
    # seed never chose anything else.
    for seed, ratio in [(0, 0.1), (1, 0.5), (2, 0.3), (5, 0.75)]:
        before = plan_splits(samples, digests, DataConfig(split_seed=seed, label_ratio=ratio)).split("train")
        chosen = labelled_rows(tmp_path / "cache" / "splits.csv", DataConfig(label_seed=seed, label_ratio=ratio))
        train_rows = [r["path"] for r in rows if r["split"] == "train"]
        assert [train_rows[i] for i in chosen] == [s.path.relative_to(root).as_posix() for s in before]


def test_the_labelled_subset_read_back_from_splits_csv_is_the_planned_one_for_patients(tmp_path: Path) -> None:
    """Units read back from the file (groups; relative paths) rank as the planner ranked them."""
    samples = patients(24, slices=3)
    digests = [fake_digest(s) for s in samples]
    whole = plan_splits(samples, digests, DataConfig(format="acdc", split_seed=3))
    write_splits_csv(tmp_path / "splits.csv", whole, Path("/acdc"))
    cached_train = whole.split("train")
    for ratio, label_seed in [(0.25, None), (0.5, 7), (0.1, 2)]:
        data = DataConfig(format="acdc", split_seed=3, label_ratio=ratio, label_seed=label_seed)
        planned = plan_splits(samples, digests, data).split("train")
        assert [cached_train[i] for i in labelled_rows(tmp_path / "splits.csv", data)] == planned


def test_a_cache_holding_part_of_its_training_split_is_refused(tmp_path: Path) -> None:
    samples = images(20, labels=[i % 3 for i in range(20)], split="train") + images(4, [0, 1, 2, 0], "test", "t")
    thinned = plan(samples, format="csv", task="classification", class_names=list("abc"), label_ratio=0.5)
    write_splits_csv(tmp_path / "splits.csv", thinned, Path("/data"))
    with pytest.raises(ValueError, match="preprocess step again"):
        labelled_rows(tmp_path / "splits.csv", DataConfig(format="csv", class_names=list("abc"), label_ratio=0.2))


def test_no_content_hash_is_in_two_splits_of_a_kvasir_fold(tmp_path: Path) -> None:
    root = tmp_path / "kvasir"
    generate_kvasir(root, SyntheticConfig(seg_images=20, image_size=32))
    cfg = ExperimentConfig(model={"image_size": 32, "weights": "random"}, data={"format": "kvasir", "fold": 2})
    meta = preprocess(cfg, root, tmp_path / "cache", validated(cfg, root, tmp_path / "validation"))
    assert meta["task"] == "segmentation" and meta["splits"]["samples"] == {"train": 14, "valid": 2, "test": 4}
    rows = read_rows(tmp_path / "cache" / "splits.csv")
    splits_per_hash = {h: {r["split"] for r in rows if r["sha256"] == h} for h in {r["sha256"] for r in rows}}
    assert all(len(names) == 1 for names in splits_per_hash.values())
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["splits"]["fold"] == 2
