"""The validation gate: every class of bad input is refused before anything downstream runs.

Each case breaks one thing in a tiny synthetic dataset (DDR for classification, Kvasir-SEG for 2D
segmentation, ACDC for NIfTI volumes) and runs the whole pipeline (``run_all``). The pipeline must
stop in the validate step with a :class:`DataValidationError` whose message names the offending
file and the reason, the validate step's report must be complete (``validation.json`` saying
which file failed and why), and nothing else may be written: no preprocessing cache, no model, no
temporary directories.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dvpt_core.config import ExperimentConfig, SyntheticConfig
from dvpt_core.data.manifest import build_manifest
from dvpt_core.data.records import Sample
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.steps.pipeline import run_all
from dvpt_core.steps.validate import DataValidationError, validate

TINY = SyntheticConfig(train=10, valid=5, test=5, seg_images=10, volumes=3, slices=2, image_size=40)
FORMATS = ("ddr", "kvasir", "acdc")

# A break gets the private copy of a dataset and returns (file the error must name, reason it must give).
Break = Callable[[Path], tuple[str, str]]


def config(fmt: str) -> ExperimentConfig:
    return ExperimentConfig(data={"format": fmt}, synthetic=TINY)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One clean tiny dataset per format, generated once; tests break private copies."""
    base = tmp_path_factory.mktemp("pristine")
    roots = {}
    for fmt in FORMATS:
        generate_dataset(base / fmt, config(fmt))
        roots[fmt] = base / fmt
    return roots


# --- helpers that write bad files ------------------------------------------------------------


def listed(root: Path, split: str = "train") -> list[tuple[str, str]]:
    return [tuple(line.rsplit(maxsplit=1)) for line in (root / f"{split}.txt").read_text().splitlines()]


def add_listed(root: Path, name: str, data: bytes | None, label: str = "1", split: str = "train") -> str:
    """Writes ``split/name`` (unless ``data`` is None) and lists it; returns its path in the manifest."""
    if data is not None:
        (root / split / name).write_bytes(data)
    with (root / f"{split}.txt").open("a") as handle:
        handle.write(f"{name} {label}\n")
    return f"{split}/{name}"


def good_jpeg(root: Path) -> bytes:
    return (root / "train" / listed(root)[0][0]).read_bytes()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` RGB with almost no data: a decompression bomb
    that is only refused in time if its size is checked before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def first_kvasir_pair(root: Path) -> tuple[Path, Path]:
    image = sorted((root / "images").iterdir())[3]
    return image, root / "masks" / image.name


def acdc_volume(root: Path, patient: int = 2, gt: bool = True) -> Path:
    suffix = "_gt" if gt else ""
    return root / "training" / f"patient{patient:03d}" / f"patient{patient:03d}_frame01{suffix}.nii.gz"


def save_nifti(path: Path, values: np.ndarray) -> None:
    nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), path)


# --- the bad inputs --------------------------------------------------------------------------


def corrupt_image(root: Path) -> tuple[str, str]:
    return add_listed(root, "corrupt.jpg", b"this is not a JPEG at all"), "unreadable image (cannot identify image file)"


def truncated_image(root: Path) -> tuple[str, str]:
    data = good_jpeg(root)
    return add_listed(root, "truncated.jpg", data[: len(data) // 2]), "unreadable image (image file is truncated"


def empty_file(root: Path) -> tuple[str, str]:
    return add_listed(root, "empty.jpg", b""), "empty file (0 bytes)"


def sixteen_bit_image(root: Path) -> tuple[str, str]:
    image = Image.fromarray(np.full((40, 40), 40_000, dtype=np.uint16))
    assert image.mode == "I;16"
    return add_listed(root, "deep.png", png(image)), "image mode I;16 not allowed (allowed: RGB, L)"


def palette_image(root: Path) -> tuple[str, str]:
    image = Image.open(root / "train" / listed(root)[0][0]).convert("P")
    return add_listed(root, "palette.png", png(image)), "image mode P not allowed (allowed: RGB, L)"


def label_outside_classes(root: Path) -> tuple[str, str]:
    lines = listed(root)
    name = lines[2][0]
    lines[2] = (name, "7")
    (root / "train.txt").write_text("".join(f"{n} {label}\n" for n, label in lines))
    return f"train/{name}", "label 7 not in 0-4 (data.class_names has 5 classes)"


def label_missing(root: Path) -> tuple[str, str]:
    """DDR's reader refuses the line before any expectation runs; the report still blames it."""
    lines = listed(root)
    name = lines[1][0]
    with (root / "train.txt").open("a") as handle:
        handle.write(f"{name}\n")
    return f"train.txt:{len(lines) + 1}", f"expected 'filename label', got '{name}'"


def same_image_in_two_splits(root: Path) -> tuple[str, str]:
    name, label = listed(root)[0]
    shutil.copy(root / "train" / name, root / "test" / "copy.jpg")
    return add_listed(root, "copy.jpg", None, label, split="test"), \
        f"is in more than one split: test and train/{name} (train)"


def path_with_dotdot(root: Path) -> tuple[str, str]:
    (root.parent / "outside.jpg").write_bytes(good_jpeg(root))
    return add_listed(root, "../../outside.jpg", None), "path escapes the dataset root (resolves to"


def symlink_out_of_root(root: Path) -> tuple[str, str]:
    outside = root.parent / "elsewhere.jpg"
    outside.write_bytes(good_jpeg(root))
    (root / "train" / "link.jpg").symlink_to(outside)
    return add_listed(root, "link.jpg", None), f"path escapes the dataset root (a symlink to {outside.resolve()})"


def over_pixel_limit(root: Path) -> tuple[str, str]:
    return add_listed(root, "bomb.png", png_header_only(8000, 8000)), \
        "8000x8000 = 64000000 pixels not in 1-40000000 (data.max_pixels; not decoded)"


def over_pillow_bomb_limit(root: Path) -> tuple[str, str]:
    """So large that Pillow itself refuses to open it: still a rejection naming the file."""
    return add_listed(root, "huge.png", png_header_only(30_000, 30_000)), "could be decompression bomb"


def empty_split(root: Path) -> tuple[str, str]:
    (root / "valid.txt").write_text("")
    return "valid.txt", "split valid lists no usable samples"


def mask_size_mismatch(root: Path) -> tuple[str, str]:
    image, mask = first_kvasir_pair(root)
    Image.open(mask).resize((20, 16)).save(mask, format="JPEG")
    return f"masks/{mask.name}", f"mask is 20x16 but its image images/{image.name} is 50x40"


def grey_jpeg_mask(root: Path) -> tuple[str, str]:
    _, mask = first_kvasir_pair(root)
    ramp = np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))
    Image.fromarray(ramp).save(mask, format="JPEG")
    return f"masks/{mask.name}", "% of its pixels lie within 64 of data.mask_threshold=128"


def three_level_png_mask(root: Path) -> tuple[str, str]:
    _, mask = first_kvasir_pair(root)
    levels = np.zeros((40, 50), dtype=np.uint8)
    levels[:, 20:35], levels[:, 35:] = 128, 255
    mask.unlink()
    Image.fromarray(levels).save(mask.with_suffix(".png"))
    return f"masks/{mask.with_suffix('.png').name}", "mask is not binary: values 0,128,255 (expected 0/1 or 0/255)"


def nifti_label_shape_differs(root: Path) -> tuple[str, str]:
    truth = acdc_volume(root)
    values = np.asanyarray(nibabel.load(truth).dataobj)
    save_nifti(truth, values[:, :-4, :].copy())
    return "training/patient002/patient002_frame01_gt.nii.gz", "expected a 3-D volume shaped like"


def nifti_four_dimensional(root: Path) -> tuple[str, str]:
    for gt in (False, True):
        path = acdc_volume(root, gt=gt)
        save_nifti(path, np.asanyarray(nibabel.load(path).dataobj)[..., None].repeat(2, axis=3))
    return "training/patient002/patient002_frame01.nii.gz", "expected a 3-D volume (x, y, slices), got shape ("


def label_value_outside_classes(root: Path) -> tuple[str, str]:
    truth = acdc_volume(root)
    values = np.asanyarray(nibabel.load(truth).dataobj).copy()
    values[0, 0, 0] = 7
    save_nifti(truth, values)
    return "training/patient002/patient002_frame01_gt.nii.gz", \
        "mask values 0,1,2,3,7 are not class indices 0-3 (data.class_names has 4 classes)"


def nifti_truncated(root: Path) -> tuple[str, str]:
    path = acdc_volume(root, gt=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return "training/patient002/patient002_frame01.nii.gz", "unreadable volume ("


BAD_INPUTS: dict[str, tuple[str, Break]] = {
    "corrupt image": ("ddr", corrupt_image),
    "truncated image": ("ddr", truncated_image),
    "0-byte file": ("ddr", empty_file),
    "16-bit image": ("ddr", sixteen_bit_image),
    "palette image": ("ddr", palette_image),
    "label outside the class set": ("ddr", label_outside_classes),
    "missing label": ("ddr", label_missing),
    "same image in two splits": ("ddr", same_image_in_two_splits),
    "path escaping the root with ..": ("ddr", path_with_dotdot),
    "symlink out of the root": ("ddr", symlink_out_of_root),
    "image over data.max_pixels": ("ddr", over_pixel_limit),
    "image over Pillow's bomb limit": ("ddr", over_pillow_bomb_limit),
    "empty split": ("ddr", empty_split),
    "mask/image size mismatch": ("kvasir", mask_size_mismatch),
    "non-binary (grey) JPEG mask": ("kvasir", grey_jpeg_mask),
    "non-binary (3-level) PNG mask": ("kvasir", three_level_png_mask),
    "NIfTI label volume of another shape": ("acdc", nifti_label_shape_differs),
    "4-D NIfTI volume": ("acdc", nifti_four_dimensional),
    "truncated NIfTI volume": ("acdc", nifti_truncated),
    "label value outside the classes": ("acdc", label_value_outside_classes),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_the_pipeline_naming_file_and_reason(
    case: str, pristine: dict[str, Path], tmp_path: Path
) -> None:
    fmt, break_it = BAD_INPUTS[case]
    root = Path(shutil.copytree(pristine[fmt], tmp_path / "data" / fmt, symlinks=True))
    file, reason = break_it(root)
    outputs = tmp_path / "outputs"

    with pytest.raises(DataValidationError) as caught:
        run_all(config(fmt), root, outputs)

    message = str(caught.value)
    assert any(line.startswith(f"{file}: ") and reason in line for line in message.splitlines()), message
    # Nothing downstream: only the validate step's own report, complete and renamed into place.
    assert [p.name for p in outputs.iterdir()] == ["validation"], "a later step or a temporary directory was written"
    report = json.loads((outputs / "validation" / "validation.json").read_text())
    assert report["success"] is False
    assert any(e["file"] == file and reason in e["reason"] for e in report["offending"]), report["offending"]
    # Only the broken file is blamed (a leak blames both copies).
    assert len(report["offending"]) == (2 if case == "same image in two splits" else 1), report["offending"]
    if report["stage"] == "suite":
        assert (outputs / "validation" / "manifest.csv").is_file()
        assert (outputs / "validation" / "data_docs" / "index.html").is_file()
    else:  # the reader could not list the dataset: no image was looked at
        assert (report["stage"], report["images"], report["counts"], report["manifest"]) == ("read", 0, {}, None)


@pytest.mark.parametrize(("fmt", "suite"), [
    ("ddr", "dataset_manifest_classification"),
    ("kvasir", "dataset_manifest_segmentation"),
    ("acdc", "dataset_manifest_segmentation"),
])
def test_clean_data_passes_the_suite_of_its_task(fmt: str, suite: str, pristine: dict[str, Path], tmp_path: Path) -> None:
    summary = validate(config(fmt), pristine[fmt], tmp_path / "validation")
    assert summary["success"] and summary["offending"] == [] and summary["suite"] == suite
    assert all(summary["counts"][split] > 0 for split in ("train", "valid", "test"))
    assert json.loads((tmp_path / "validation" / "validation.json").read_text())["success"]


def test_a_failed_report_replaces_a_passing_one_and_foreign_folders_are_kept(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    root = Path(shutil.copytree(pristine["ddr"], tmp_path / "ddr"))
    out = tmp_path / "validation"
    assert validate(config("ddr"), root, out)["success"]
    corrupt_image(root)
    with pytest.raises(DataValidationError):
        validate(config("ddr"), root, out)
    assert json.loads((out / "validation.json").read_text())["success"] is False, "a stale pass was left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddr", "validation"]

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a validation report"):
        validate(config("ddr"), root, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_link_roots_trust_a_symlinked_dvc_cache(pristine: dict[str, Path], tmp_path: Path) -> None:
    """DVC with ``cache.type: symlink`` checks files out as links into its cache: trusted when named."""
    root = Path(shutil.copytree(pristine["ddr"], tmp_path / "ddr"))
    cache = tmp_path / "dvc-cache"
    cache.mkdir()
    name = listed(root)[0][0]
    (root / "train" / name).rename(cache / name)
    (root / "train" / name).symlink_to(cache / name)
    with pytest.raises(DataValidationError, match=f"train/{name}: path escapes the dataset root"):
        validate(config("ddr"), root, tmp_path / "refused")
    trusting = ExperimentConfig(data={"format": "ddr", "link_roots": [str(cache)]}, synthetic=TINY)
    assert validate(trusting, root, tmp_path / "trusted")["success"]


def test_a_volume_header_claiming_absurd_depth_is_refused_before_reading_data(tmp_path: Path) -> None:
    """A NIfTI bomb: a 352-byte header promising 4096^3 voxels. Its slices are within the pixel limit;
    the volume is not, and nothing is decompressed or allocated to find that out."""
    header = nibabel.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.float32)
    bomb = tmp_path / "bomb.nii"
    bomb.write_bytes(header.binaryblock + b"\0" * 4)
    sample = Sample(path=bomb, label=None, split="train", mask=bomb, volume="bomb", slice_index=0)
    (row,) = build_manifest(tmp_path, [sample], max_pixels=40_000_000, mask_threshold=128).to_dict("records")
    assert row["kind"] == "volume" and row["pixels"] == 4096 * 4096 and pd.isna(row["decoded"])
    assert row["error"] == ("4096x4096x4096 = 68719476736 voxels exceeds data.max_pixels x 64 = 2560000000 "
                            "(not decoded)")
    assert not row["readable"] and not row["mask_readable"]


def test_splits_the_settings_cannot_carve_fail_validation(pristine: dict[str, Path], tmp_path: Path) -> None:
    """DDR names all three splits, so ``data.folds`` has nothing to hold out: refused here, not in preprocess."""
    cfg = ExperimentConfig(data={"format": "ddr", "folds": 5}, synthetic=TINY)
    with pytest.raises(DataValidationError, match=r"\(splits\): data.folds=5, but the dataset names all of"):
        validate(cfg, pristine["ddr"], tmp_path / "validation")
    report = json.loads((tmp_path / "validation" / "validation.json").read_text())
    assert all(e["success"] for e in report["expectations"]) and report["success"] is False


def test_a_split_the_fractions_leave_empty_names_the_split_planner(pristine: dict[str, Path], tmp_path: Path) -> None:
    """Ten Kvasir images, one fold of five held out for test and 95% of the rest for validation,
    leave none to train on: the planner's objection is named among the failed checks and blamed on
    each empty split, and the unsplit images are not called leaks."""
    cfg = ExperimentConfig(data={"format": "kvasir", "val_fraction": 0.95, "test_fraction": 0.01}, synthetic=TINY)
    with pytest.raises(DataValidationError, match=r"failed expectations: [^)]*\(split\), split planner\)"):
        validate(cfg, pristine["kvasir"], tmp_path / "validation")
    report = json.loads((tmp_path / "validation" / "validation.json").read_text())
    objection = ("split(s) train would be empty: 10 unit(s) to split with data.folds=5, data.val_fraction=0.95, "
                 "data.test_fraction=0.01")
    assert report["split_planner"] == objection
    assert [(e["file"], e["reason"]) for e in report["offending"]] == [
        ("(splits)", f"split {split} is empty: {objection}") for split in ("test", "train", "valid")]
