"""The data layer: synthetic DDR generator, DDR reader, manifest, validate and preprocess steps, cached dataset."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dvpt_core.config import DataConfig, ExperimentConfig, SyntheticConfig
from dvpt_core.data.dataset import CachedSplit, make_loader
from dvpt_core.data.formats.ddr import DatasetFormatError, read_ddr
from dvpt_core.data.manifest import build_manifest
from dvpt_core.data.records import SPLITS
from dvpt_core.data.synthetic.ddr import generate_ddr
from dvpt_core.steps.preprocess import preprocess
from dvpt_core.steps.validate import DataValidationError, validate
from tests.helpers import validated

CLASSES = DataConfig().class_names
TINY = SyntheticConfig(train=12, valid=6, test=6, image_size=64)


def small_experiment() -> ExperimentConfig:
    return ExperimentConfig(model={"image_size": 32, "weights": "random"}, train={"batch_size": 4})


def list_lines(root: Path, split: str) -> list[list[str]]:
    return [line.split() for line in (root / f"{split}.txt").read_text().splitlines()]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "ddr"
    generate_ddr(root, TINY, CLASSES)
    return root


@pytest.fixture
def tiny_copy(tiny_root: Path, tmp_path: Path) -> Path:
    """A private copy a test may break."""
    return Path(shutil.copytree(tiny_root, tmp_path / "ddr"))


# --- synthetic generator ---------------------------------------------------------------------


def test_generator_is_deterministic_and_writes_ddr_layout(tiny_root: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_ddr(again, TINY, CLASSES)
    assert tree_bytes(again) == tree_bytes(tiny_root)

    sizes = {"train": TINY.train, "valid": TINY.valid, "test": TINY.test}
    for split in SPLITS:
        lines = list_lines(tiny_root, split)
        assert len(lines) == sizes[split]
        assert all(len(fields) == 2 for fields in lines)
        assert {int(label) for _, label in lines} == set(range(len(CLASSES))), f"a grade is missing in {split}"
        for name, _ in lines:
            with Image.open(tiny_root / split / name) as image:
                assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
    assert sorted(p.name for p in tiny_root.iterdir()) == sorted([*SPLITS, *(f"{s}.txt" for s in SPLITS)])
    assert not list(tmp_path.glob(".again.*")), "temporary directory left behind"


def test_generator_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    root = tmp_path / "ddr"
    root.mkdir()
    (root / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_ddr(root, TINY, CLASSES)
    assert (root / "keep.txt").read_text() == "user data"
    generate_ddr(root, TINY, CLASSES, overwrite=True)
    assert not (root / "keep.txt").exists() and (root / "train.txt").is_file()


def test_generator_needs_every_grade_in_every_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synthetic.valid=3"):
        generate_ddr(tmp_path / "ddr", SyntheticConfig(train=12, valid=3, test=6, image_size=64), CLASSES)
    assert not (tmp_path / "ddr").exists()


def lesion_pixels(path: Path) -> tuple[int, int]:
    """(dark-red, yellow) pixels inside the retina, away from its rim."""
    rgb = np.asarray(Image.open(path)).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    n = rgb.shape[0]
    yy, xx = np.mgrid[:n, :n]
    inner = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.9 * 0.46 * n) ** 2
    red = (r > 40) & (r < 140) & (g < 40) & inner
    yellow = (r > 170) & (g > 150) & (b < 130) & inner
    return int(red.sum()), int(yellow.sum())


def test_lesion_load_grows_with_grade(tmp_path: Path) -> None:
    root = tmp_path / "ddr"
    generate_ddr(root, SyntheticConfig(train=30, valid=5, test=5, image_size=160), CLASSES)
    per_grade: dict[int, list[tuple[int, int]]] = {}
    for sample in read_ddr(root):
        per_grade.setdefault(sample.label, []).append(lesion_pixels(sample.path))
    means = np.array([np.mean(per_grade[g], axis=0) for g in range(len(CLASSES))])
    red, yellow = means[:, 0], means[:, 1]
    assert np.all(np.diff(red) > 0), f"red lesion pixels per grade not increasing: {red}"
    assert yellow[2:].min() > yellow[:2].max(), f"exudates should appear from grade 2: {yellow}"


# --- DDR reader ------------------------------------------------------------------------------


def test_reader_excludes_ungradable(tiny_copy: Path) -> None:
    name, _ = list_lines(tiny_copy, "train")[0]
    with (tiny_copy / "train.txt").open("a") as handle:
        handle.write(f"{name} 5\n")
    samples = read_ddr(tiny_copy)
    assert len(samples) == TINY.train + TINY.valid + TINY.test
    assert all(s.label != 5 for s in samples)
    assert [s.split for s in samples] == ["train"] * TINY.train + ["valid"] * TINY.valid + ["test"] * TINY.test


@pytest.mark.parametrize(
    ("line", "error", "message"),
    [
        ("lonely.jpg", DatasetFormatError, r"train.txt:13: expected 'filename label'"),
        ("train_00000.jpg two", DatasetFormatError, r"train.txt:13: label 'two' is not an integer"),
        ("ghost.jpg 1", FileNotFoundError, r"train.txt:13: listed image .*ghost.jpg does not exist"),
    ],
)
def test_reader_names_list_file_and_line(tiny_copy: Path, line: str, error: type, message: str) -> None:
    with (tiny_copy / "train.txt").open("a") as handle:
        handle.write(line + "\n")
    with pytest.raises(error, match=message):
        read_ddr(tiny_copy)


def test_reader_needs_every_list_file(tiny_copy: Path) -> None:
    (tiny_copy / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match="valid.txt"):
        read_ddr(tiny_copy)


# --- manifest --------------------------------------------------------------------------------


def test_manifest_records_problems_instead_of_raising(tiny_copy: Path, tmp_path: Path, caplog) -> None:
    good = tiny_copy / "train" / list_lines(tiny_copy, "train")[0][0]
    (tiny_copy / "train" / "truncated.jpg").write_bytes(good.read_bytes()[:400])
    outside = tmp_path / "outside.jpg"
    shutil.copy(good, outside)
    (tiny_copy / "train" / "link.jpg").symlink_to(outside)
    with (tiny_copy / "train.txt").open("a") as handle:
        handle.write("truncated.jpg 0\nlink.jpg 0\n../../outside.jpg 0\n")

    with caplog.at_level(logging.INFO, logger="dvpt_core.data.manifest"):
        frame = build_manifest(tiny_copy, read_ddr(tiny_copy), max_pixels=64 * 64,
                               mask_threshold=DataConfig().mask_threshold).set_index("path")
    assert caplog.records[-1].getMessage().endswith(f": {len(frame)} samples from {len(frame)} files, 3 unreadable")
    assert frame.loc[good.relative_to(tiny_copy).as_posix(), "readable"]
    assert "truncated" in frame.loc["train/truncated.jpg", "error"].lower()
    assert "symlink" in frame.loc["train/link.jpg", "error"]
    assert "escapes the dataset root" in frame.loc["train/../../outside.jpg", "error"]
    assert not frame.loc[["train/truncated.jpg", "train/link.jpg", "train/../../outside.jpg"], "readable"].any()
    assert frame["sha256"].str.len().dropna().eq(64).all()

    small = build_manifest(tiny_copy, read_ddr(tiny_copy)[:1], max_pixels=100, mask_threshold=DataConfig().mask_threshold)
    assert not small.loc[0, "readable"] and "exceeds data.max_pixels=100" in small.loc[0, "error"]


# --- validate step ---------------------------------------------------------------------------


def test_validation_passes_on_clean_synthetic_data(tiny_root: Path, tmp_path: Path) -> None:
    summary = validate(small_experiment(), tiny_root, tmp_path / "report")
    assert summary["success"] and summary["offending"] == []
    result = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert result["success"] and result["counts"] == {"train": 12, "valid": 6, "test": 6}
    assert all(e["success"] for e in result["expectations"])
    assert (tmp_path / "report" / "data_docs" / "index.html").is_file()
    lines = (tmp_path / "report" / "manifest.csv").read_text().splitlines()
    assert len(lines) == 1 + 24
    header = lines[0].split(",")
    assert header.index("named_split") == header.index("split") + 1, "the split as named beside the split as planned"
    # Great Expectations' own INFO chatter is kept out of the step's log (its loggers at WARNING).
    chatty = {name: logger.level for name, logger in logging.root.manager.loggerDict.items()
              if name.startswith("great_expectations") and isinstance(logger, logging.Logger)
              and logging.NOTSET < logger.level < logging.WARNING}
    assert not chatty and logging.getLogger("great_expectations").level == logging.WARNING


def test_validation_rejects_corrupt_image_and_bad_label(tiny_copy: Path, tmp_path: Path) -> None:
    """Acceptance: both offending files are named, with the reason, and the report is still written."""
    lines = list_lines(tiny_copy, "train")
    relabelled = lines[2][0]
    lines[2][1] = "7"
    lines.append(["corrupt.jpg", "1"])
    (tiny_copy / "train.txt").write_text("".join(f"{n} {l}\n" for n, l in lines))
    (tiny_copy / "train" / "corrupt.jpg").write_bytes(b"this is not a JPEG")

    out = tmp_path / "report"
    with pytest.raises(DataValidationError) as caught:
        validate(small_experiment(), tiny_copy, out)
    message = str(caught.value)
    assert "train/corrupt.jpg: unreadable image (cannot identify image file)" in message
    assert f"train/{relabelled}: label 7 not in 0-4" in message

    result = json.loads((out / "validation.json").read_text())
    assert not result["success"]
    assert {e["file"] for e in result["offending"]} == {"train/corrupt.jpg", f"train/{relabelled}"}
    assert (out / "data_docs" / "index.html").is_file()


def test_validation_rejects_a_leak_between_splits(tiny_copy: Path, tmp_path: Path) -> None:
    name, label = list_lines(tiny_copy, "train")[0]
    shutil.copy(tiny_copy / "train" / name, tiny_copy / "test" / "copy.jpg")
    with (tiny_copy / "test.txt").open("a") as handle:
        handle.write(f"copy.jpg {label}\n")
    with pytest.raises(DataValidationError, match=r"test/copy.jpg: identical content .* more than one split"):
        validate(small_experiment(), tiny_copy, tmp_path / "report")


# --- preprocess step and the cached dataset ---------------------------------------------------


@pytest.fixture(scope="module")
def validation_dir(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return validated(small_experiment(), tiny_root, tmp_path_factory.mktemp("validated") / "validation")


@pytest.fixture(scope="module")
def cache_dir(tiny_root: Path, validation_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "cache"
    preprocess(small_experiment(), tiny_root, out, validation_dir)
    return out


def test_preprocess_writes_arrays_per_split(tiny_root: Path, cache_dir: Path) -> None:
    meta = json.loads((cache_dir / "meta.json").read_text())
    assert meta["image_size"] == 32 and meta["class_names"] == CLASSES
    samples = read_ddr(tiny_root)
    for split in SPLITS:
        images = np.load(cache_dir / split / "images.npy", mmap_mode="r")
        labels = np.load(cache_dir / split / "labels.npy")
        expected = [s.label for s in samples if s.split == split]
        assert images.shape == (len(expected), 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and labels.tolist() == expected
        assert meta["counts"][split]["total"] == len(expected)
        assert sum(meta["counts"][split]["per_class"]) == len(expected)
    assert len(meta["inputs_sha256"]) == 64


def test_preprocess_replaces_only_its_own_output(
    tiny_root: Path, validation_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    rerun = tmp_path / "cache"
    shutil.copytree(cache_dir, rerun)
    meta = preprocess(small_experiment(), tiny_root, rerun, validation_dir)
    assert meta["inputs_sha256"] == json.loads((cache_dir / "meta.json").read_text())["inputs_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "temporary directories left behind"

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a preprocessing cache"):
        preprocess(small_experiment(), tiny_root, stranger, validation_dir)
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_cached_split_returns_normalised_tensors(cache_dir: Path) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    split = CachedSplit(cache_dir / "valid", mean, std)
    image, label = split[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    raw = np.load(cache_dir / "valid" / "images.npy")[0].astype(np.float32) / 255
    expected = (raw - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert label == int(np.load(cache_dir / "valid" / "labels.npy")[0])
    assert len(pickle.dumps(split)) < 10_000, "a pickled split must not carry the image array to workers"


def test_augmentation_keeps_shape_and_loader_batches(cache_dir: Path) -> None:
    cfg = small_experiment()
    augmented = CachedSplit(cache_dir / "train", (0.5,) * 3, (0.5,) * 3, augment=cfg.train)
    torch.manual_seed(0)
    for index in range(len(augmented)):
        image, _ = augmented[index]
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all()

    loader = make_loader(cache_dir / "train", (0.5,) * 3, (0.5,) * 3, True, cfg)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    first = [batch[1].tolist() for batch in make_loader(cache_dir / "train", (0.5,) * 3, (0.5,) * 3, True, cfg)]
    second = [batch[1].tolist() for batch in make_loader(cache_dir / "train", (0.5,) * 3, (0.5,) * 3, True, cfg)]
    assert first == second, "the shuffled order must follow the seed"
