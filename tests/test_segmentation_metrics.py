"""Segmentation metrics against medpy (the published numbers' reference), the empty-mask convention,
3D restacking and NIfTI output on real preprocessed caches, the report files, and the Dice + CE loss
against an independent computation."""

from __future__ import annotations

import csv
import dataclasses
import math
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from medpy.metric import binary as medpy
from PIL import Image
from scipy.ndimage import gaussian_filter

from dvpt_core.config import ExperimentConfig, SyntheticConfig
from dvpt_core.data.atomic import atomic_file
from dvpt_core.data.cases import VolumeRecord, image_names, read_truth_volume, read_volume_records
from dvpt_core.data.formats.pixels import resize_label_map
from dvpt_core.data.restack import restack, restack_split
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.losses import segmentation_loss
from dvpt_core.metrics.segmentation import (
    binary_scores,
    class_counts,
    class_table,
    overlap_scores,
    score_case,
    score_images,
    summary_metrics,
)
from dvpt_core.metrics.segmentation_report import markdown_table, plot_overlay_grid, write_case_csv
from dvpt_core.metrics.split import score_split, score_volumes
from dvpt_core.steps.preprocess import preprocess
from tests.helpers import validated
from tests.test_formats import write_synapse

TINY = SyntheticConfig(seg_images=10, volumes=10, slices=3, image_size=32)
ACDC_CLASSES = ["background", "RV", "MYO", "LV"]
SHAPES = [((37, 41), None), ((37, 41), (0.7, 1.3)), ((24, 28, 9), (1.5, 0.8, 5.0)), ((24, 28, 9), None)]


def blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 2.0, level: float = 0.5) -> np.ndarray:
    """A random mask of smooth blobs (touching the borders at times)."""
    return gaussian_filter(rng.random(shape), sigma) > level


def labels(rng: np.random.Generator, shape: tuple[int, ...], classes: int) -> np.ndarray:
    """A random label map: smooth random fields, the class of the largest at each voxel, with
    background where all are low."""
    fields = np.stack([gaussian_filter(rng.random(shape), 2.0) for _ in range(classes)])
    return np.where(fields.max(0) > 0.52, fields.argmax(0), 0).astype(np.uint8)


def transunet_reference(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None) -> tuple[float, ...]:
    """TransUNet's ``calculate_metric_percase`` (with IoU beside Dice), computed by medpy."""
    if pred.sum() > 0 and truth.sum() > 0:
        return medpy.dc(pred, truth), medpy.jc(pred, truth), medpy.hd95(pred, truth, voxelspacing=spacing)
    if pred.sum() > 0:
        return 1.0, 1.0, 0.0
    return 0.0, 0.0, 0.0


@pytest.mark.parametrize("shape, spacing", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_binary_scores_equal_medpy_on_random_masks(shape: tuple, spacing: tuple | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for pred, truth in ((blob(rng, shape), blob(rng, shape)), (rng.random(shape) > 0.9, blob(rng, shape, level=0.55))):
        dice, iou, hd95 = binary_scores(pred, truth, spacing)
        assert dice == pytest.approx(medpy.dc(pred, truth), rel=1e-12)
        assert iou == pytest.approx(medpy.jc(pred, truth), rel=1e-12)
        # MONAI returns float32 distances; medpy float64.
        assert hd95 == pytest.approx(medpy.hd95(pred, truth, voxelspacing=spacing), rel=1e-6)
        assert binary_scores(truth, pred, spacing)[2] == pytest.approx(hd95, rel=1e-6), "HD95 is symmetric"


@pytest.mark.parametrize("ndim", [2, 3])
def test_empty_masks_follow_the_published_convention(ndim: int) -> None:
    shape = (12, 14, 5)[:ndim]
    empty, some = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    some[(slice(3, 8),) * ndim] = True
    assert binary_scores(some, empty) == (1.0, 1.0, 0.0), "prediction non-empty, ground truth empty"
    assert binary_scores(empty, some) == (0.0, 0.0, 0.0), "prediction empty (a missed structure)"
    assert binary_scores(empty, empty) == (0.0, 0.0, 0.0), "both empty: TransUNet's else branch"
    for pred, truth in ((some, empty), (empty, some), (empty, empty)):
        assert binary_scores(pred, truth) == transunet_reference(pred, truth, None)
    # Where medpy alone disagrees, so the convention is applied, not inherited.
    assert medpy.dc(some, empty) == 0.0 and medpy.jc(empty, empty) == 1.0
    with np.errstate(invalid="ignore"):
        assert np.isnan(medpy.dc(empty, empty))
    with pytest.raises(RuntimeError):
        medpy.hd95(empty, some)


@pytest.mark.parametrize("shape, spacing", SHAPES)
def test_multiclass_scores_per_class_equal_medpy(shape: tuple, spacing: tuple | None) -> None:
    rng = np.random.default_rng(7)
    truth, pred = labels(rng, shape, 5), labels(rng, shape, 5)
    truth[truth == 4] = 0  # class 4 absent from the truth: prediction non-empty, truth empty
    pred[pred == 3] = 0  # class 3 missed by the prediction
    scores = score_case("case", pred, truth, 6, spacing)  # class 5 absent from both
    for k, cls in enumerate(range(1, 6)):
        expected = transunet_reference(pred == cls, truth == cls, spacing)
        assert (scores.dice[k], scores.iou[k]) == pytest.approx(expected[:2], rel=1e-12)
        assert scores.hd95[k] == pytest.approx(expected[2], rel=1e-6)
    assert scores.missed == (False, False, True, False, False)
    assert scores.hd95_unit == ("voxel" if spacing is None else "mm")
    assert scores.dice[3] == 1.0 and scores.dice[2] == 0.0 and scores.dice[4] == 0.0


@pytest.mark.parametrize("shape", [(5, 9, 7), (5, 4, 9, 7)])
def test_counts_per_map_and_class_give_medpys_scores_and_add_up_over_slices(shape: tuple) -> None:
    """class_counts: per label map (2D or 3D) and foreground class, (predicted, present, overlap);
    overlap_scores of a map's counts are medpy's Dice and IoU under the empty-mask convention, and
    of the counts summed over the maps, the stack's (how validation scores a volume by slices)."""
    rng = np.random.default_rng(5)
    truths, preds = labels(rng, shape, 4), labels(rng, shape, 4)
    preds[1][preds[1] == 2] = 0  # class 2 missed on map 1
    truths[2][truths[2] == 3] = 0
    preds[2].flat[:3] = 3  # class 3 predicted where absent on map 2
    counts = class_counts(preds, truths, 5)  # class 4 in neither
    assert counts.shape == (5, 4, 3) and counts.dtype == np.int64
    for n in range(5):
        for k in range(1, 5):
            p, t = preds[n] == k, truths[n] == k
            assert counts[n, k - 1].tolist() == [np.count_nonzero(p), np.count_nonzero(t), np.count_nonzero(p & t)]
    dice, iou = overlap_scores(counts[..., 0], counts[..., 1], counts[..., 2])
    for n in range(5):
        for k in range(1, 5):
            assert (dice[n, k - 1], iou[n, k - 1]) == pytest.approx(
                transunet_reference(preds[n] == k, truths[n] == k, None)[:2], rel=1e-12)
    assert dice[1, 1] == 0.0 and dice[2, 2] == 1.0 and dice[0, 3] == 0.0
    whole_dice, whole_iou = overlap_scores(*counts.sum(axis=0).T)
    for k in range(1, 4):
        assert (whole_dice[k - 1], whole_iou[k - 1]) == pytest.approx(
            (medpy.dc(preds == k, truths == k), medpy.jc(preds == k, truths == k)), rel=1e-12)
    with pytest.raises(ValueError, match=r"prediction shape \(5, 9, 7\) differs from ground truth shape \(5, 9, 6\)"):
        class_counts(np.zeros((5, 9, 7)), np.zeros((5, 9, 6)), 4)
    with pytest.raises(ValueError, match=r"prediction shape \(5, 9, 6\) differs from ground truth shape \(5, 9, 7\)"):
        class_counts(np.zeros((5, 9, 6)), np.zeros((5, 9, 7)), 4)


def test_one_voxel_structures_score_exactly() -> None:
    """The smallest structures, by hand: a single voxel found exactly is Dice 1, IoU 1; found
    beside its place, 0; and one voxel of two found, Dice 2/3, IoU 1/2."""
    assert overlap_scores(1, 1, 1) == (1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0 / 0 anywhere, not even in a branch np.where discards
        empty = overlap_scores([0, 0, 3], [0, 2, 0], [0, 0, 0])
    assert [a.tolist() for a in empty] == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    assert overlap_scores(1, 1, 0) == (0.0, 0.0)
    dice, iou = overlap_scores([1, 2], [2, 1], [1, 1])
    assert dice.tolist() == pytest.approx([2 / 3, 2 / 3]) and iou.tolist() == pytest.approx([0.5, 0.5])


def test_score_case_checks_classes_spacing_and_shapes_and_score_images_its_lengths() -> None:
    rng = np.random.default_rng(2)
    truth, pred = labels(rng, (12, 10), 2), labels(rng, (12, 10), 2)
    binary = score_case("c", pred, truth, 2)  # background and one class: the smallest task
    assert binary.dice == pytest.approx((medpy.dc(pred == 1, truth == 1),))
    with pytest.raises(ValueError, match="num_classes is 1: segmentation needs background and at least one class"):
        score_case("c", pred, truth, 1)
    with pytest.raises(ValueError, match=r"case c: spacing \(1.0, 1.0, 1.0\) has 3 values for a 2-D mask"):
        score_case("c", pred, truth, 2, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"case c: spacing \(1.0,\) has 1 values for a 2-D mask"):
        score_case("c", pred, truth, 2, (1.0,))
    with pytest.raises(ValueError, match=r"case c: prediction shape \(12, 9\) differs from ground truth shape \(12, 10\)"):
        score_case("c", pred[:, :9], truth, 2)
    with pytest.raises(ValueError, match=r"case c: prediction shape \(12, 10\) differs from ground truth shape \(12, 9\)"):
        score_case("c", pred, truth[:, :9], 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        binary.dice = (1.0,)  # scores are values: a report cannot change a case after the fact
    preds, truths = np.stack([pred, truth, pred]), np.stack([truth, truth, pred])
    scored = score_images(["x", "y", "z"], preds, truths, 2)
    assert [s.case for s in scored] == ["x", "y", "z"] and scored[0] == score_case("x", pred, truth, 2)
    assert scored[1].dice == (1.0,) and scored[1].hd95 == (0.0,)
    with pytest.raises(ValueError, match="2 case names, 3 predictions and 3 ground truths"):
        score_images(["x", "y"], preds, truths, 2)
    with pytest.raises(ValueError, match="3 case names, 3 predictions and 2 ground truths"):
        score_images(["x", "y", "z"], preds, truths[:2], 2)
    with pytest.raises(ValueError, match="4 case names, 3 predictions and 3 ground truths"):
        score_images(["w", "x", "y", "z"], preds, truths, 2)
    with pytest.raises(ValueError, match="3 case names, 3 predictions and 4 ground truths"):
        score_images(["x", "y", "z"], preds, np.concatenate([truths, truths[:1]]), 2)
    one = class_table(scored[:1], ["background", "fg"])  # a split of one case
    assert [row["class"] for row in one] == ["fg", "mean"] and one[0]["dice"] == scored[0].dice[0] == one[1]["dice"]
    with pytest.raises(ValueError, match=r"cases are scored over 1 classes, class_names has 2 foreground classes \(a, b\)"):
        class_table(scored, ["background", "a", "b"])
    with pytest.raises(ValueError, match=r"cases are scored over 2 classes, class_names has 1 foreground classes \(a\)"):
        class_table([score_case("c", pred, truth, 3)], ["background", "a"])
    with pytest.raises(ValueError, match="no cases to average"):
        class_table([], ["background", "fg"])


def test_means_over_cases_count_every_case_and_misses() -> None:
    rng = np.random.default_rng(3)
    truths = [labels(rng, (30, 30), 4) for _ in range(4)]
    preds = [labels(rng, (30, 30), 4) for _ in range(3)] + [np.zeros((30, 30), dtype=np.uint8)]  # last: all missed
    cases = [score_case(f"c{i}", p, t, 4) for i, (p, t) in enumerate(zip(preds, truths))]
    names = ["background", "a", "b", "c"]
    rows = class_table(cases, names)
    reference = np.array([[transunet_reference(p == c, t == c, None) for c in (1, 2, 3)]
                          for p, t in zip(preds, truths)])
    for k, row in enumerate(rows[:3]):
        assert row["class"] == names[k + 1] and row["cases"] == 4
        assert row["dice"] == pytest.approx(reference[:, k, 0].mean()), "the missed case counts as Dice 0"
        assert row["hd95"] == pytest.approx(reference[:, k, 2].mean(), rel=1e-6)
        assert row["missed"] == int(np.any(truths[3] == k + 1))
    assert rows[3]["class"] == "mean" and rows[3]["dice"] == pytest.approx(reference[:, :, 0].mean())
    summary = summary_metrics(cases, names)
    assert summary["dice"] == rows[3]["dice"] and summary["iou_b"] == rows[1]["iou"] and summary["cases"] == 4
    assert all(np.isfinite(v) for v in summary.values())
    with pytest.raises(ValueError, match="units"):
        class_table([cases[0], score_case("mm", preds[0], truths[0], 4, (1.0, 1.0))], names)


@pytest.mark.parametrize("slice_axis", [2, 0])
def test_restacking_shuffled_slices_scores_as_the_whole_volume(slice_axis: int) -> None:
    rng = np.random.default_rng(11)
    shape = (20, 22, 7) if slice_axis == 2 else (7, 20, 22)
    spacing = (1.2, 0.9, 6.0) if slice_axis == 2 else (6.0, 1.2, 0.9)
    pred, truth = labels(rng, shape, 3), labels(rng, shape, 3)
    record = VolumeRecord("v", shape, slice_axis, tuple(range(7)), spacing, None)
    order = rng.permutation(7)
    shuffled = [np.take(pred, k, axis=slice_axis) for k in order]
    restacked = restack(record, order.tolist(), shuffled)
    assert np.array_equal(restacked, pred)
    assert score_case("v", restacked, truth, 4, spacing) == score_case("v", pred, truth, 4, spacing)


def test_resampling_restores_the_original_in_plane_size() -> None:
    rng = np.random.default_rng(5)
    # 2 x 2 blocks: halving and doubling nearest-neighbour must give the blocks back exactly.
    original = np.kron(labels(rng, (12, 16, 5), 3).transpose(2, 0, 1), np.ones((1, 2, 2), dtype=np.uint8))
    record = VolumeRecord("v", (5, 24, 32), 0, (0, 1, 2, 3, 4), None, None)
    small = [resize_label_map(s, (12, 16)) for s in original]
    order = rng.permutation(5)
    restacked = restack(record, order.tolist(), [small[k] for k in order])
    assert restacked.shape == (5, 24, 32) and np.array_equal(restacked, original)
    odd = restack(record, list(range(5)), [resize_label_map(s, (9, 9)) for s in original])
    assert odd.shape == (5, 24, 32) and set(np.unique(odd)) <= set(np.unique(original))


def test_restacking_refuses_missing_duplicate_and_unknown_slices() -> None:
    record = VolumeRecord("patient001_frame01", (8, 8, 3), 2, (0, 1, 2), None, None)
    maps = [np.zeros((4, 4), dtype=np.uint8)] * 3
    with pytest.raises(ValueError, match="patient001_frame01.*missing \\[2\\]"):
        restack(record, [0, 1, 1], maps)
    with pytest.raises(ValueError, match="unknown \\[5\\]"):
        restack(record, [0, 1, 5], maps)
    with pytest.raises(ValueError, match="no predictions for volume"):
        list(restack_split({"a": record, "b": record}, ["a"] * 3, [0, 1, 2], maps))
    with pytest.raises(ValueError, match="do not hold"):
        list(restack_split({"a": record}, ["a", "a", "x"], [0, 1, 2], maps))


def test_acdc_cache_scores_volumes_at_original_size_and_writes_nifti(tmp_path: Path) -> None:
    root = tmp_path / "acdc"
    generate_dataset(root, ExperimentConfig(data={"format": "acdc"}, synthetic=TINY))
    cfg = ExperimentConfig(model={"image_size": 24, "weights": "random"}, data={"format": "acdc"})
    preprocess(cfg, root, tmp_path / "cache", validated(cfg, root, tmp_path / "validation"))
    test_dir = tmp_path / "cache" / "test"
    records = read_volume_records(test_dir)
    assert not (tmp_path / "cache" / "train" / "volume_labels.npz").exists()
    for volume, record in records.items():
        truth_file = nibabel.load(next(root.glob(f"training/*/{volume}_gt.nii.gz")))
        assert record.shape == truth_file.shape == (32, 32, TINY.slices) and record.slice_axis == 2
        assert record.spacing == pytest.approx((1.5, 1.5, 10.0))
        assert np.array_equal(record.affine, truth_file.affine)
        assert np.array_equal(read_truth_volume(test_dir, volume), np.asarray(truth_file.dataobj))

    # The cached (24 px) ground truth as the prediction, in shuffled order.
    masks, volumes, slices = (np.load(test_dir / f) for f in ("masks.npy", "volumes.npy", "slices.npy"))
    order = np.random.default_rng(0).permutation(len(masks))
    in_order = score_split(tmp_path / "cache", "test", masks, 4, nifti_dir=tmp_path / "nifti")
    shuffled = score_volumes(test_dir, volumes[order], slices[order], masks[order], 4)
    assert shuffled == in_order and [c.case for c in in_order] == list(records)
    for case in in_order:
        written = nibabel.load(tmp_path / "nifti" / f"{case.case}.nii.gz")
        source = nibabel.load(root / "training" / case.case.split("_")[0] / f"{case.case}.nii.gz")
        assert np.array_equal(written.affine, source.affine) and written.shape == source.shape
        pred, truth = np.asarray(written.dataobj), read_truth_volume(test_dir, case.case)
        for k, cls in enumerate((1, 2, 3)):
            expected = transunet_reference(pred == cls, truth == cls, (1.5, 1.5, 10.0))
            assert case.dice[k] == pytest.approx(expected[0]) and case.hd95[k] == pytest.approx(expected[2], rel=1e-6)
        assert case.hd95_unit == "mm" and min(case.dice) > 0.6, "resampled ground truth stays close to the truth"
    assert sorted(p.name for p in (tmp_path / "nifti").iterdir()) == sorted(f"{v}.nii.gz" for v in records)


def test_synapse_cache_restacks_slice_first_volumes_in_voxels(tmp_path: Path) -> None:
    root = write_synapse(tmp_path / "synapse", [0, 1, 8])
    # 20 px: columns keep their size and rows go 16 -> 20 -> 16, which nearest-neighbour undoes exactly.
    # The written volumes show organs 1 and 8 only: the others are missing from training on purpose.
    cfg = ExperimentConfig(model={"image_size": 20, "weights": "random"}, data={"format": "synapse"},
                           validation={"class_missing_from_train": "ignore"})
    preprocess(cfg, root, tmp_path / "cache", validated(cfg, root, tmp_path / "validation"))
    test_dir = tmp_path / "cache" / "test"
    (record,) = read_volume_records(test_dir).values()
    assert (record.volume, record.shape, record.slice_axis, record.spacing) == ("case0001", (4, 16, 20), 0, None)
    valid = read_volume_records(tmp_path / "cache" / "valid")
    assert all(r.shape[1:] == (16, 20) and r.shape[0] == len(r.slices) for r in valid.values())
    masks = np.load(test_dir / "masks.npy")
    (case,) = score_split(tmp_path / "cache", "test", masks, 9, nifti_dir=tmp_path / "nifti")
    assert case.hd95_unit == "voxel" and case.dice == (1.0, 0, 0, 0, 0, 0, 0, 1.0), "absent organs: Dice 0"
    written = nibabel.load(tmp_path / "nifti" / "case0001.nii.gz")
    truth = read_truth_volume(test_dir, "case0001")
    assert written.shape == (20, 16, 4) and np.array_equal(written.affine, np.eye(4))
    assert np.array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), truth)


def test_2d_split_scores_each_image_by_name(tmp_path: Path) -> None:
    root = tmp_path / "kvasir"
    generate_dataset(root, ExperimentConfig(data={"format": "kvasir"}, synthetic=TINY))
    cfg = ExperimentConfig(model={"image_size": 32, "weights": "random"}, data={"format": "kvasir"})
    preprocess(cfg, root, tmp_path / "cache", validated(cfg, root, tmp_path / "validation"))
    masks = np.load(tmp_path / "cache" / "test" / "masks.npy")
    cases = score_split(tmp_path / "cache", "test", masks, 2)
    names = image_names(tmp_path / "cache", "test")
    assert [c.case for c in cases] == names and len(names) == len(masks)
    assert all((root / "images" / f"{name}.jpg").is_file() for name in names)
    assert all(c.dice == (1.0,) and c.hd95 == (0.0,) for c in cases), "every synthetic image shows a polyp"
    eroded = masks.copy()
    eroded[:, :, :16] = 0
    worse = score_split(tmp_path / "cache", "test", eroded, 2)
    expected = [medpy.dc(e, m) if e.any() else 0.0 for e, m in zip(eroded, masks)]
    assert [c.dice[0] for c in worse] == pytest.approx(expected)


def test_report_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    truths = [labels(rng, (24, 24), 3) for _ in range(3)]
    preds = [labels(rng, (24, 24), 3) for _ in range(3)]
    cases = [score_case(f"img{i}", p, t, 4) for i, (p, t) in enumerate(zip(preds, truths))]
    path = write_case_csv(cases, ACDC_CLASSES, tmp_path / "cases.csv")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9 and rows[4]["case"] == "img1" and rows[4]["class"] == "MYO"
    assert float(rows[4]["dice"]) == cases[1].dice[1] and float(rows[4]["hd95"]) == cases[1].hd95[1]
    table = markdown_table(class_table(cases, ACDC_CLASSES), "px")
    assert table.splitlines()[0].startswith("| class | Dice (%)") and len(table.splitlines()) == 6
    assert f"| LV | {100 * class_table(cases, ACDC_CLASSES)[2]['dice']:.2f} |" in table
    images = rng.integers(0, 256, size=(3, 24, 24, 3), dtype=np.uint8)
    plot = plot_overlay_grid(images, np.stack(truths), np.stack(preds), [c.case for c in cases],
                             [c.mean_dice for c in cases], ACDC_CLASSES, tmp_path / "overlay.png", "test overlays")
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size[1] > image.size[0] / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv", "overlay.png"], "no temporary files left"


def test_atomic_file_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "metrics.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_loss_is_half_cross_entropy_plus_half_batch_dice() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (3, 8, 8))
    target[1] = 0  # an image without foreground: the batch-summed Dice still counts it
    probs = logits.softmax(1)
    onehot = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)  # the batch and the pixels, per class (the released code's DiceLoss)
    per_class = (2 * (probs * onehot).sum(dims) + 1e-5) / ((probs**2).sum(dims) + (onehot**2).sum(dims) + 1e-5)
    expected = 0.5 * F.cross_entropy(logits, target) + 0.5 * (1 - per_class).mean()
    loss = segmentation_loss()(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    grad = torch.autograd.grad(loss, logits)[0]
    assert torch.allclose(grad, torch.autograd.grad(expected, logits)[0], atol=1e-7)
    with pytest.raises(ValueError, match="target shape"):
        segmentation_loss()(logits, target[:, :4])


def test_loss_takes_two_classes_and_refuses_fewer_or_unbatched_logits() -> None:
    """C = 2 (background and one structure) is the smallest task; one channel or a map without a
    batch axis is refused, naming the shape."""
    logits, target = torch.zeros(2, 2, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 1
    # Uniform logits: cross-entropy log 2; Dice per class from p = 1/2 everywhere (32 pixels, 1 of class 1).
    dice = [(2 * 0.5 * 31 + 1e-5) / (32 * 0.25 + 31 + 1e-5), (2 * 0.5 * 1 + 1e-5) / (32 * 0.25 + 1 + 1e-5)]
    expected = 0.5 * math.log(2) + 0.5 * (1 - sum(dice) / 2)
    assert segmentation_loss()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match=r"expected N x C x H x W logits with C >= 2 \(background included\), got \(2, 1, 4, 4\)"):
        segmentation_loss()(torch.zeros(2, 1, 4, 4), target)
    with pytest.raises(ValueError, match=r"got \(2, 4, 4\)"):
        segmentation_loss()(torch.zeros(2, 4, 4), target)
    with pytest.raises(ValueError, match=r"got \(2, 2, 1, 4, 4\)"):  # volumes are scored as slices, never whole
        segmentation_loss()(torch.zeros(2, 2, 1, 4, 4), target)
    with pytest.raises(ValueError, match=r"target shape \(2, 4, 3\) does not match logits \(2, 2, 4, 4\) "
                                         r"\(expected N x H x W class indices\)"):
        segmentation_loss()(logits, target[..., :3])
    with pytest.raises(ValueError, match=r"target shape \(2, 4, 5\) does not match logits \(2, 2, 4, 4\)"):
        segmentation_loss()(logits, torch.zeros(2, 4, 5, dtype=torch.long))
