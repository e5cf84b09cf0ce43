"""Every validation rule at its boundary: the last value accepted and the first refused.

Three levels, cheapest first: the facts the manifest records for each kind of file (images,
NIfTI volumes, TransUNet ``.npz`` slices and ``.h5`` volumes), the derived verdicts the suite
judges (binary masks, class indices, shapes, leaks), and the Great Expectations suite itself run
by :func:`validate` on tiny datasets of each format that can reach a rule, with one file just
inside and one just outside each limit, so the report must blame exactly the outside ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import nibabel
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dvpt_core.config import DataConfig, ExperimentConfig, SyntheticConfig
from dvpt_core.data.manifest import (
    AMBIGUITY,
    MAX_LISTED_VALUES,
    MAX_SLICES_AT_LIMIT,
    build_manifest,
    escapes_root,
    file_kind,
    mask_values,
    read_manifest,
    relative_path,
)
from dvpt_core.data.records import Sample
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.steps import validate as validate_step
from dvpt_core.steps.validate import (
    MAX_AMBIGUOUS_SHARE,
    DataValidationError,
    classes_missing,
    shown_classes,
    validate,
    with_derived_columns,
)
from tests.test_formats import write_synapse

RNG = np.random.default_rng(0)


def manifest_row(root: Path, sample: Sample, max_pixels: int, threshold: int = 128) -> dict:
    (row,) = build_manifest(root, [sample], max_pixels, mask_threshold=threshold).to_dict("records")
    return row


def rgb(width: int, height: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def save_nifti(path: Path, values: np.ndarray) -> Path:
    nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), path)
    return path


# --- facts the manifest records ---------------------------------------------------------------


def test_constants_of_the_rules() -> None:
    assert (AMBIGUITY, MAX_SLICES_AT_LIMIT, MAX_LISTED_VALUES, MAX_AMBIGUOUS_SHARE) == (64, 64, 16, 0.05)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_pixel_limit_is_inclusive(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"a{suffix}"
    rgb(30, 20).save(path)
    at_limit = manifest_row(tmp_path, Sample(path, 0, "train"), max_pixels=600)
    assert (at_limit["width"], at_limit["height"], at_limit["pixels"], at_limit["shape"]) == (30, 20, 600, "30x20")
    assert at_limit["readable"] and at_limit["decoded"] and at_limit["error"] == "" and at_limit["mode"] == "RGB"
    over = manifest_row(tmp_path, Sample(path, 0, "train"), max_pixels=599)
    assert not over["readable"] and pd.isna(over["decoded"])
    assert over["error"] == "30x20 = 600 pixels exceeds data.max_pixels=599 (not decoded)"


@pytest.mark.parametrize(("kind", "shape", "width", "height"), [
    ("nifti", (30, 20, 4), 30, 20),  # NIfTI: (x, y, z), a slice is x by y
    ("npz", (20, 30), 30, 20),  # TransUNet slice: (y, x)
    ("h5", (4, 20, 30), 30, 20),  # TransUNet volume: (z, y, x)
])
def test_array_slice_pixel_limit_is_inclusive(tmp_path: Path, kind: str, shape: tuple[int, ...], width: int, height: int) -> None:
    values = RNG.random(shape).astype(np.float32)
    if kind == "nifti":
        path = save_nifti(tmp_path / "v.nii.gz", values)
    elif kind == "npz":
        path = tmp_path / "case0001_slice000.npz"
        np.savez(path, image=values, label=np.zeros(shape, dtype=np.float32))
    else:
        path = tmp_path / "case0001.npy.h5"
        with h5py.File(path, "w") as handle:
            handle["image"] = values
    sample = Sample(path, None, "train", slice_index=0)
    at_limit = manifest_row(tmp_path, sample, max_pixels=600)
    assert (at_limit["width"], at_limit["height"], at_limit["pixels"]) == (width, height, 600)
    assert at_limit["voxels"] == int(np.prod(shape)) and at_limit["ndim"] == len(shape) and at_limit["dtype"] == "float32"
    assert at_limit["shape"] == "x".join(map(str, shape)) and at_limit["readable"] and at_limit["decoded"]
    over = manifest_row(tmp_path, sample, max_pixels=599)
    assert not over["readable"]
    assert over["error"] == f"{at_limit['shape']}: a {width}x{height} slice = 600 pixels exceeds data.max_pixels=599 (not decoded)"


def test_volume_voxel_limit_is_inclusive(tmp_path: Path) -> None:
    """At most MAX_SLICES_AT_LIMIT slices of max_pixels each: 64 slices of 6 x 5 pass, 65 do not."""
    at_limit = save_nifti(tmp_path / "at.nii.gz", np.zeros((6, 5, 64), dtype=np.uint8))
    over = save_nifti(tmp_path / "over.nii.gz", np.zeros((6, 5, 65), dtype=np.uint8))
    assert manifest_row(tmp_path, Sample(at_limit, None, "train", slice_index=0), max_pixels=30)["readable"]
    row = manifest_row(tmp_path, Sample(over, None, "train", slice_index=0), max_pixels=30)
    assert row["error"] == "6x5x65 = 1950 voxels exceeds data.max_pixels x 64 = 1920 (not decoded)"
    one_dimensional = tmp_path / "line.npz"
    np.savez(one_dimensional, image=np.zeros(31, dtype=np.float32))
    line = manifest_row(tmp_path, Sample(one_dimensional, None, "train"), max_pixels=30)
    # A 1-D array has no slice plane: its length is held to the pixel limit. (Its error message
    # currently reads "unreadable slice ('width')": over_limit expects a width; refused all the same.)
    assert line["pixels"] == 31 and line["ndim"] == 1 and not line["readable"]
    np.savez(one_dimensional, image=np.zeros(30, dtype=np.float32))
    assert manifest_row(tmp_path, Sample(one_dimensional, None, "train"), max_pixels=30)["readable"]


def test_mask_facts_of_a_png_mask(tmp_path: Path) -> None:
    image, mask = tmp_path / "i.png", tmp_path / "m.png"
    rgb(4, 3).save(image)
    values = np.array([[0, 64, 65, 128], [191, 192, 255, 0], [0, 0, 0, 0]], dtype=np.uint8)
    Image.fromarray(values).save(mask)
    row = manifest_row(tmp_path, Sample(image, None, "train", mask=mask), max_pixels=12)
    assert row["mask_values"] == "0,64,65,128,191,192,255" and row["mask_distinct"] == 7
    assert (row["mask_min"], row["mask_max"], row["mask_lossy"], row["mask_integral"]) == (0, 255, False, True)
    # |v - 128| < 64: 65, 128 and 191 are ambiguous, 64 and 192 are not
    assert row["mask_ambiguous"] == pytest.approx(3 / 12)
    assert row["mask_shape"] == "4x3" and row["mask_readable"] and row["mask_mode"] == "L"
    over = manifest_row(tmp_path, Sample(image, None, "train", mask=mask), max_pixels=11)
    assert not over["mask_readable"] and "12 pixels exceeds data.max_pixels=11" in over["mask_error"]


def test_mask_values_lists_at_most_sixteen_and_measures_ambiguity_around_the_threshold() -> None:
    facts = mask_values(np.arange(17), threshold=8)
    assert facts["values"] == ",".join(map(str, range(16))) + ",..." and facts["distinct"] == 17
    assert (facts["min"], facts["max"]) == (0, 16)
    assert mask_values(np.arange(16), threshold=8)["values"] == ",".join(map(str, range(16)))
    near = mask_values(np.array([100 - 64, 100 - 63, 100 + 63, 100 + 64]), threshold=100)
    assert near["ambiguous"] == 0.5
    empty = mask_values(np.array([], dtype=np.int64), threshold=1)
    assert (empty["min"], empty["max"], empty["ambiguous"], empty["distinct"]) == (None, None, 0.0, 0)


def test_jpeg_masks_are_lossy_whatever_the_case_of_the_suffix(tmp_path: Path) -> None:
    image = tmp_path / "i.png"
    rgb(8, 8).save(image)
    for name in ("m.jpg", "m.JPEG"):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / name, format="JPEG")
        assert manifest_row(tmp_path, Sample(image, None, None, mask=tmp_path / name), max_pixels=64)["mask_lossy"]
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "m.png")
    assert not manifest_row(tmp_path, Sample(image, None, None, mask=tmp_path / "m.png"), max_pixels=64)["mask_lossy"]


def test_array_masks_record_integral_values(tmp_path: Path) -> None:
    image = save_nifti(tmp_path / "v.nii.gz", np.zeros((4, 3, 2), dtype=np.float32))
    whole = save_nifti(tmp_path / "w_gt.nii.gz", np.full((4, 3, 2), 3.0, dtype=np.float32))
    half = save_nifti(tmp_path / "h_gt.nii.gz", np.full((4, 3, 2), 1.5, dtype=np.float32))
    row = manifest_row(tmp_path, Sample(image, None, "train", mask=whole, slice_index=0), max_pixels=12)
    assert row["mask_integral"] and not row["mask_lossy"] and (row["mask_min"], row["mask_max"]) == (3, 3)
    assert not manifest_row(tmp_path, Sample(image, None, "train", mask=half, slice_index=0), max_pixels=12)["mask_integral"]


def test_transunet_files_hold_their_own_label_array(tmp_path: Path) -> None:
    path = tmp_path / "case0001_slice000.npz"
    np.savez(path, image=np.zeros((3, 4), dtype=np.float32), label=np.array([[0, 8, 9, 0]] * 3, dtype=np.float32))
    row = manifest_row(tmp_path, Sample(path, None, "train", mask=path), max_pixels=12)
    assert (row["mask_min"], row["mask_max"], row["mask_shape"], row["mask_readable"]) == (0, 9, "3x4", True)
    empty = tmp_path / "case0002_slice000.npz"
    empty.write_bytes(b"")
    row = manifest_row(tmp_path, Sample(empty, None, "train", mask=empty), max_pixels=12)
    assert row["error"] == row["mask_error"] == "empty file (0 bytes)" and not row["mask_readable"]


def test_unreadable_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    row = manifest_row(tmp_path, Sample(tmp_path / "empty.png", 0, "train"), max_pixels=10)
    assert (row["bytes"], row["error"], row["inside_root"]) == (0, "empty file (0 bytes)", True)
    (tmp_path / "one.png").write_bytes(b"x")
    row = manifest_row(tmp_path, Sample(tmp_path / "one.png", 0, "train"), max_pixels=10)
    assert row["bytes"] == 1 and row["error"] == "unreadable image (cannot identify image file)" and row["decoded"] is False
    row = manifest_row(tmp_path, Sample(tmp_path / "missing.png", 0, "train"), max_pixels=10)
    assert row["error"].startswith("cannot read file (") and not row["readable"]
    npz = tmp_path / "no_image.npz"
    np.savez(npz, label=np.zeros((2, 2)))
    row = manifest_row(tmp_path, Sample(npz, None, "train"), max_pixels=10)
    assert row["error"].startswith("unreadable slice (") and "no 'image' array (has label)" in row["error"]


def test_paths_escaping_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    inside, outside = root / "sub" / "a.png", tmp_path / "b.png"
    rgb(2, 2).save(inside)
    rgb(2, 2).save(outside)
    allowed = (root.resolve(),)
    assert escapes_root(allowed, inside) == ""
    assert escapes_root(allowed, root / "sub" / ".." / ".." / "b.png") == f"path escapes the dataset root (resolves to {outside.resolve()})"
    (root / "link.png").symlink_to(outside)
    assert escapes_root(allowed, root / "link.png") == f"path escapes the dataset root (a symlink to {outside.resolve()})"
    assert escapes_root((*allowed, tmp_path.resolve()), root / "link.png") == ""
    row = manifest_row(root, Sample(root / "link.png", 0, "train"), max_pixels=10)
    assert row["inside_root"] is False and pd.isna(row["bytes"]) and pd.isna(row["sha256"])
    assert relative_path(root, root / "sub" / "a.png") == "sub/a.png"
    assert relative_path(root, root / ".." / "b.png") == "../b.png"
    assert relative_path(root, outside) == "../b.png", "a path not spelled from the root"


def test_an_npz_holding_python_objects_is_refused_not_unpickled(tmp_path: Path) -> None:
    """Loading an object array runs pickle, which can run code: an .npz is data only."""
    np.savez(tmp_path / "evil.npz", image=np.array([{"payload": 1}], dtype=object))
    row = manifest_row(tmp_path, Sample(tmp_path / "evil.npz", None, "train"), max_pixels=100)
    assert not row["readable"] and "allow_pickle=False" in row["error"]


def test_file_kinds() -> None:
    assert [file_kind(Path(p)) for p in ("a.NII.GZ", "a.nii", "a.npy.h5", "a.npz", "a.jpg", "a.gz")] == \
        ["volume", "volume", "volume", "slice", "image", "image"]


# --- derived verdicts -------------------------------------------------------------------------


def frame(rows: list[dict], num_classes: int = 2, **data: object) -> pd.DataFrame:
    base = {"path": "a.png", "slice_index": pd.NA, "sha256": "h", "split": "train", "group": None, "shape": "4x4",
            "mask_shape": "4x4", "mask_decoded": True, "mask_lossy": False, "mask_ambiguous": 0.0,
            "mask_values": "0,1", "mask_distinct": 2, "mask_min": 0, "mask_max": 1}
    manifest = pd.DataFrame([{**base, **row} for row in rows])
    classes = ["c"] * num_classes
    return with_derived_columns(manifest, DataConfig(format=data.pop("format", "csv"), task="segmentation",
                                                     class_names=classes, **data))


def test_binary_masks_are_zero_one_or_zero_255_only() -> None:
    cases = [("0,1", 2, True), ("0,255", 2, True), ("0", 1, True), ("255", 1, True), ("1", 1, True),
             ("0,1,255", 3, False), ("1,255", 2, False), ("0,128", 2, False), ("0,2", 2, False)]
    derived = frame([{"mask_values": v, "mask_distinct": n} for v, n, _ in cases])
    assert derived["mask_binary"].tolist() == [ok for _, _, ok in cases]


def test_lossy_binary_masks_pass_up_to_five_percent_ambiguous_pixels() -> None:
    derived = frame([{"mask_lossy": True, "mask_ambiguous": share, "mask_values": "0,3,128,250", "mask_distinct": 4}
                     for share in (0.0, 0.05, 0.0500001, 0.5)])
    assert derived["mask_binary"].tolist() == [True, True, False, False]


def test_multi_class_masks_must_hold_class_indices() -> None:
    derived = frame([{"mask_min": lo, "mask_max": hi} for lo, hi in ((0, 3), (1, 3), (0, 4), (-1, 2))], num_classes=4)
    assert derived["mask_in_classes"].tolist() == [True, True, False, False]
    assert "mask_binary" not in derived


def test_btcv_masks_are_judged_against_the_raw_13_organ_labels() -> None:
    rows = [{"mask_min": 0, "mask_max": 13}, {"mask_min": 0, "mask_max": 14}]
    assert frame(rows, num_classes=9, format="synapse", synapse_labels="btcv13")["mask_in_classes"].tolist() == [True, False]
    assert frame(rows[:1], num_classes=9, format="synapse")["mask_in_classes"].tolist() == [False]
    assert frame([{"mask_max": 8}], num_classes=9, format="synapse")["mask_in_classes"].tolist() == [True]


def test_btcv_masks_show_the_organs_their_raw_labels_map_to() -> None:
    """Raw BTCV labels show TransUNet's classes (8 aorta -> 1, 1 spleen -> 7, 13 left adrenal ->
    background); a raw value one past the 14-entry table shows nothing (mask_in_classes refuses it)."""
    data = DataConfig(format="synapse", task="segmentation", synapse_labels="btcv13", class_names=[f"c{i}" for i in range(9)])
    masks = pd.DataFrame({"mask_decoded": [True] * 3, "mask_max": [13, 14, 14],
                          "mask_values": ["0,1,8,13", "0,14", "0,7,14"]})
    assert shown_classes(masks, data).tolist() == [frozenset({1, 7}), frozenset(), frozenset({8})]


def test_mask_values_beyond_the_classes_show_no_structure() -> None:
    """ACDC's classes are 0-3: a raw 4 or 5 is refused by mask_in_classes and shows nothing."""
    masks = pd.DataFrame({"mask_decoded": [True], "mask_max": [5], "mask_values": ["0,2,4,5"]})
    assert shown_classes(masks, DataConfig(format="acdc")).tolist() == [frozenset({2})]


def test_a_class_is_missing_from_a_split_where_no_sample_shows_it() -> None:
    """Classification: every class, 0 included; segmentation: the structures, never the background."""
    splits = pd.DataFrame({"split": ["train", "train", "test", None]})
    shown = pd.Series([frozenset({1}), frozenset({2}), frozenset({0, 1, 2}), frozenset({0})])
    graded = DataConfig(format="csv", class_names=["a", "b", "c"])
    assert classes_missing(splits, shown, graded) == {"train": ["0 (a)"], "test": []}
    organs = DataConfig(format="csv", task="segmentation", class_names=["bg", "b", "c"])
    assert classes_missing(splits, pd.Series([frozenset({1})] * 4), organs) == {"train": ["2 (c)"], "test": ["2 (c)"]}


def test_undecoded_masks_are_not_judged_and_shapes_must_match() -> None:
    derived = frame([{"mask_decoded": False, "mask_values": "0,7", "mask_distinct": 2},
                     {"mask_shape": "4x5"}, {"mask_shape": None}, {"shape": None}])
    assert derived["mask_binary"].isna().tolist() == [True, False, False, False]
    matches = derived["mask_matches_image"]
    assert matches.isna().tolist() == [False, False, True, True]
    assert [bool(matches[0]), bool(matches[1])] == [True, False]


def test_leak_columns_count_splits_per_content_and_per_patient() -> None:
    derived = frame([
        {"path": "a", "sha256": "x", "split": "train", "group": "p1"},
        {"path": "b", "sha256": "x", "split": "train", "group": "p1"},
        {"path": "c", "sha256": "y", "split": "train", "group": "p2"},
        {"path": "d", "sha256": "y", "split": "test", "group": "p2"},
        {"path": "e", "sha256": "z", "split": "valid", "group": None, "slice_index": 3},
    ])
    assert derived["splits_with_same_content"].tolist() == [1, 1, 2, 2, 1]
    assert derived["splits_with_same_group"].tolist()[:4] == [1, 1, 2, 2]
    assert derived["sample_id"].tolist() == ["a", "b", "c", "d", "e#slice3"]
    assert derived["row"].tolist() == [0, 1, 2, 3, 4]


# --- the suite, per format --------------------------------------------------------------------

TINY = SyntheticConfig(train=5, valid=5, test=5, seg_images=10, volumes=3, slices=2, image_size=40)


def offending(cfg: ExperimentConfig, root: Path, out: Path) -> set[tuple[str, str]]:
    """(file, reason) of every rejection; empty when the data pass."""
    try:
        validate(cfg, root, out)
    except DataValidationError:
        return {(e["file"], e["reason"]) for e in json.loads((out / "validation.json").read_text())["offending"]}
    return set()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def csv_table(root: Path, label: Callable[[int], int], group: bool = False) -> list[str]:
    """Nine clean 20x10 images over the three named splits; returns the table's lines so far."""
    root.mkdir()
    lines = ["image,label,split" + (",group" if group else "")]
    for i in range(9):
        rgb(20, 10).save(root / f"ok{i}.png")
        lines.append(f"ok{i}.png,{label(i)},{('train', 'valid', 'test')[i % 3]}" + (f",p{i}" if group else ""))
    return lines


def test_classification_labels_and_pixel_limit_in_a_csv_table(tmp_path: Path) -> None:
    """Labels 0 and K-1 pass, K is refused; an image of exactly data.max_pixels passes, one more pixel is refused."""
    root = tmp_path / "csv"
    lines = csv_table(root, lambda i: i % 3)
    rgb(20, 10).save(root / "last_class.png")
    rgb(20, 10).save(root / "beyond.png")
    rgb(201, 1).save(root / "wide.png")
    Image.fromarray(RNG.integers(0, 256, size=(10, 20), dtype=np.uint8)).save(root / "grey.png")
    rgb(20, 10).convert("RGBA").save(root / "alpha.png")
    lines += ["last_class.png,2,train", "beyond.png,3,train", "wide.png,0,train", "grey.png,1,train", "alpha.png,0,train"]
    (root / "dataset.csv").write_text("\n".join(lines) + "\n")
    cfg = ExperimentConfig(data={"format": "csv", "class_names": ["a", "b", "c"], "max_pixels": 200})
    assert offending(cfg, root, tmp_path / "out") == {
        ("beyond.png", "label 3 not in 0-2 (data.class_names has 3 classes)"),
        ("wide.png", "201x1 = 201 pixels not in 1-200 (data.max_pixels; not decoded)"),
        ("alpha.png", "image mode RGBA not allowed (allowed: RGB, L)"),
    }


def test_the_same_image_in_two_named_splits_is_refused_naming_its_twin(tmp_path: Path) -> None:
    root = tmp_path / "csv"
    lines = csv_table(root, lambda i: i // 3)
    rgb(20, 10).save(root / "a.png")
    (root / "b.png").write_bytes((root / "a.png").read_bytes())
    lines += ["a.png,1,train", "b.png,1,test"]
    (root / "dataset.csv").write_text("\n".join(lines) + "\n")
    digest = hashlib.sha256((root / "a.png").read_bytes()).hexdigest()[:12]
    cfg = ExperimentConfig(data={"format": "csv", "class_names": ["a", "b", "c"]})
    assert offending(cfg, root, tmp_path / "out") == {
        ("a.png", f"identical content (sha256 {digest}) is in more than one split: train and b.png (test)"),
        ("b.png", f"identical content (sha256 {digest}) is in more than one split: test and a.png (train)"),
    }


@pytest.mark.parametrize(("top", "shows"), [(0, False), (1, True), (2, False), (127, False), (128, True), (255, True)])
def test_a_binary_mask_shows_the_structure_when_it_holds_one_or_reaches_the_threshold(top: int, shows: bool) -> None:
    """0/1 masks and 0/255 masks both show the structure; a mask whose largest value is 2..127 is
    background to preprocessing's threshold (128), so it shows nothing."""
    frame = pd.DataFrame({"mask_decoded": [True], "mask_max": [top], "mask_values": [f"0,{top}"]})
    assert shown_classes(frame, DataConfig(format="kvasir")).tolist() == [frozenset({1}) if shows else frozenset()]


def test_a_patient_in_two_named_splits_is_refused_naming_both_splits(tmp_path: Path) -> None:
    """Each of the patient's images is named with the splits the patient is in; the other
    patients' images pass."""
    root = tmp_path / "csv"
    lines = csv_table(root, lambda i: i // 3, group=True)
    for name, split in (("p1_a.png", "train"), ("p1_b.png", "test")):
        rgb(20, 10).save(root / name)
        lines.append(f"{name},1,{split},twice")
    (root / "dataset.csv").write_text("\n".join(lines) + "\n")
    cfg = ExperimentConfig(data={"format": "csv", "class_names": ["a", "b", "c"]})
    assert offending(cfg, root, tmp_path / "out") == {
        ("p1_a.png", "patient/case twice is in more than one split (test, train)"),
        ("p1_b.png", "patient/case twice is in more than one split (test, train)"),
    }


def test_ddr_labels_four_pass_five_is_ungradable_six_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ddr"
    generate_dataset(root, ExperimentConfig(synthetic=TINY))
    name = (root / "train.txt").read_text().split()[0]
    for label, copy in ((4, "four.jpg"), (5, "five.jpg"), (6, "six.jpg")):
        shutil.copy(root / "train" / name, root / "train" / copy)
        with (root / "train.txt").open("a") as handle:
            handle.write(f"{copy} {label}\n")
    found = offending(ExperimentConfig(synthetic=TINY), root, tmp_path / "out")
    files = {file for file, _ in found}
    assert "train/six.jpg" in files and "train/four.jpg" not in files and "train/five.jpg" not in files
    assert ("train/six.jpg", "label 6 not in 0-4 (data.class_names has 5 classes)") in found


def test_binary_masks_and_mask_pixel_limit_in_kvasir(tmp_path: Path) -> None:
    root = tmp_path / "kvasir"
    generate_dataset(root, ExperimentConfig(data={"format": "kvasir"}, synthetic=TINY))
    images = sorted((root / "images").iterdir())
    width, height = Image.open(images[0]).size
    zero_one = np.zeros((height, width), dtype=np.uint8)
    zero_one[: height // 2] = 1
    three = zero_one * 255
    three[0, 0] = 128
    for image, values in ((images[0], zero_one), (images[1], three)):
        (root / "masks" / image.name).unlink()
        Image.fromarray(values).save((root / "masks" / image.name).with_suffix(".png"))
    cfg = ExperimentConfig(data={"format": "kvasir", "max_pixels": width * height}, synthetic=TINY)
    assert offending(cfg, root, tmp_path / "out") == {
        (f"masks/{images[1].stem}.png", "mask is not binary: values 0,128,255 (expected 0/1 or 0/255)"),
    }
    tight = ExperimentConfig(data={"format": "kvasir", "max_pixels": width * height - 1}, synthetic=TINY)
    found = offending(tight, root, tmp_path / "out2")
    assert {file for file, _ in found} >= {f"images/{images[2].name}", f"masks/{images[2].name}"}


def test_acdc_label_values_and_integrality(tmp_path: Path) -> None:
    """ACDC's 4 classes: 3 passes, 4 is refused; a fractional label is refused."""
    root = tmp_path / "acdc"
    generate_dataset(root, ExperimentConfig(data={"format": "acdc"}, synthetic=TINY))
    patients = sorted((root / "training").iterdir())
    truths = [sorted(p.glob("*_gt.nii.gz"))[0] for p in patients]
    for truth, value in zip(truths, (3.0, 4.0, 1.5)):
        values = np.asanyarray(nibabel.load(truth).dataobj).astype(np.float32)
        values[0, 0, 0] = value
        save_nifti(truth, values)
    found = offending(ExperimentConfig(data={"format": "acdc"}, synthetic=TINY), root, tmp_path / "out")
    relative = [str(t.relative_to(root)) for t in truths]
    assert {file for file, _ in found} == set(relative[1:])
    assert any(f == relative[1] and "mask values 0,1,2,3,4 are not class indices 0-3" in r for f, r in found)
    assert any(f == relative[2] and r == "label values are not whole numbers" for f, r in found)


def test_a_one_voxel_acdc_frame_passes_and_an_empty_one_is_refused(tmp_path: Path) -> None:
    """The volume size rules start at one voxel: a 1x1x1 frame is data, a 0x4x2 frame is refused."""
    root = tmp_path / "acdc"
    cfg = ExperimentConfig(data={"format": "acdc"}, synthetic=TINY)
    generate_dataset(root, cfg)
    one, empty = [sorted(p.glob("*_frame??.nii.gz"))[0] for p in sorted((root / "training").iterdir())[:2]]
    for image, shape in ((one, (1, 1, 1)), (empty, (0, 4, 2))):
        save_nifti(image, np.full(shape, 7, dtype=np.int16))
        save_nifti(image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz")), np.zeros(shape, dtype=np.uint8))
        if image == one:
            assert offending(cfg, root, tmp_path / "out") == set()
    truth = empty.with_name(empty.name.replace(".nii.gz", "_gt.nii.gz"))
    reasons = ("0x4x2: an empty array (0 voxels; not decoded)",
               f"0x4x2: a 0x4 slice = 0 pixels not in 1-{cfg.data.max_pixels} (data.max_pixels; not decoded)")
    assert offending(cfg, root, tmp_path / "out2") == {
        (str(file.relative_to(root)), reason) for file in (empty, truth) for reason in reasons}


def test_transunet_slices_must_be_2d(tmp_path: Path) -> None:
    """A train_npz slice holding a stack of two slices is refused, image and label alike."""
    root = write_synapse(tmp_path / "synapse", [0, 1, 5, 8])
    stacked = sorted((root / "train_npz").glob("*.npz"))[0]
    np.savez(stacked, image=RNG.random((2, 16, 20), dtype=np.float32), label=np.zeros((2, 16, 20), dtype=np.float32))
    cfg = ExperimentConfig(data={"format": "synapse"}, validation={"class_missing_from_train": "ignore"})
    assert offending(cfg, root, tmp_path / "out") == {
        (f"train_npz/{stacked.name}", "3-D array of shape 2x16x20, expected 2-D")}


def test_the_written_manifest_reads_back_as_the_samples_the_reader_listed(tmp_path: Path) -> None:
    """What preprocess reads instead of listing the dataset again: every sample with its mask,
    named split and hashes, in the manifest's order."""
    cfg = ExperimentConfig(data={"format": "kvasir"}, synthetic=SyntheticConfig(seg_images=10, image_size=32))
    generate_dataset(tmp_path / "data", cfg)
    validate(cfg, tmp_path / "data", tmp_path / "out")
    samples, digests, mask_digests = read_manifest(tmp_path / "out" / "manifest.csv", tmp_path / "data")
    frame = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str, keep_default_na=False)
    assert [s.path for s in samples] == [tmp_path / "data" / p for p in frame["path"]]
    assert [s.mask for s in samples] == [tmp_path / "data" / m for m in frame["mask"]]
    assert all(s.mask.is_file() for s in samples) and len(samples) == 10
    assert digests == list(frame["sha256"]) and mask_digests == list(frame["mask_sha256"])


def test_a_great_expectations_log_level_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only GX's unset level is raised to WARNING: a user debugging GX keeps the DEBUG they chose."""
    gx_logger = logging.getLogger("great_expectations")
    before = gx_logger.level
    monkeypatch.setattr(validate_step, "_GX_QUIET", None)  # as before GX's first import in a process
    gx_logger.setLevel(logging.DEBUG)
    try:
        validate_step._import_gx()
        assert gx_logger.level == logging.DEBUG and validate_step._GX_QUIET is False
    finally:
        gx_logger.setLevel(before)
