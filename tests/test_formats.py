"""Format readers on tiny fixtures in each dataset's exact on-disk layout, the pixel policy,
the synthetic segmentation datasets, the segmentation cache and joint transforms."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from dvpt_core.config import DataConfig, ExperimentConfig, SyntheticConfig, TrainConfig
from dvpt_core.data.dataset import CachedSplit
from dvpt_core.data.formats import DatasetFormatError, detect_format, mask_policy, read_dataset, resolve_data_config
from dvpt_core.data.formats.pixels import MaskPolicy, load_resized, read_array_slices, read_mask
from dvpt_core.data.records import Sample
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.data.synthetic.acdc import LV, MYO, RV
from dvpt_core.data.synthetic.kvasir import STREAM, render_polyp
from dvpt_core.data.transforms import apply, build_transform
from dvpt_core.steps.preprocess import preprocess
from tests.helpers import validated

TINY = SyntheticConfig(train=5, valid=5, test=5, seg_images=10, volumes=10, slices=3, image_size=32)
RNG = np.random.default_rng(0)


def synthetic(root: Path, fmt: str) -> Path:
    generate_dataset(root, ExperimentConfig(data={"format": fmt}, synthetic=TINY))
    return root


def noise_image(height: int = 30, width: int = 40) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def write_isic(root: Path, train_ids: list[int], test_ids: list[int]) -> Path:
    """ISIC 2016 part 1: images as ISIC_<7 digits>.jpg, 0/255 masks as ISIC_<id>_Segmentation.png."""
    for part, ids in (("Training", train_ids), ("Test", test_ids)):
        data = root / f"ISBI2016_ISIC_Part1_{part}_Data"
        truth = root / f"ISBI2016_ISIC_Part1_{part}_GroundTruth"
        data.mkdir(parents=True)
        truth.mkdir()
        for number in ids:
            noise_image().save(data / f"ISIC_{number:07d}.jpg")
            mask = np.zeros((30, 40), dtype=np.uint8)
            mask[5:20, 10:30] = 255
            Image.fromarray(mask).save(truth / f"ISIC_{number:07d}_Segmentation.png")
    (root / "ISBI2016_ISIC_Part1_Training_Data" / "LICENSE.txt").write_text("not an image")
    return root


def synapse_label(shape: tuple[int, ...], values: list[int]) -> np.ndarray:
    """Stripes of the given label values along the last axis."""
    label = np.zeros(shape, dtype=np.float32)
    for k, value in enumerate(values):
        label[..., 2 * k: 2 * k + 2] = value
    return label


def write_synapse(root: Path, values: list[int]) -> Path:
    """TransUNet's layout: train_npz/caseXXXX_sliceNNN.npz, test_vol_h5/caseXXXX.npy.h5 (z first)."""
    (root / "train_npz").mkdir(parents=True)
    (root / "test_vol_h5").mkdir()
    for case, slices in ((5, 3), (6, 2)):
        for k in range(slices):
            np.savez(root / "train_npz" / f"case{case:04d}_slice{k:03d}.npz",
                     image=RNG.random((16, 20), dtype=np.float32), label=synapse_label((16, 20), values))
    with h5py.File(root / "test_vol_h5" / "case0001.npy.h5", "w") as handle:
        handle["image"] = np.stack([np.full((16, 20), k / 3, dtype=np.float32) for k in range(4)])
        handle["label"] = synapse_label((4, 16, 20), values)
    return root


def write_folder(root: Path) -> Path:
    for split, count in (("train", 3), ("test", 2)):
        for name in ("benign", "malignant"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise_image().save(root / split / name / f"{name}{i}.png")
    return root


def write_table(root: Path) -> Path:
    root.mkdir()
    lines = ["image,label,group,split"]
    for i in range(6):
        noise_image().convert("L").save(root / f"scan{i}.png")
        lines.append(f"scan{i}.png,{'malignant' if i % 2 else 0},p{i // 2},{'test' if i == 5 else ''}")
    (root / "dataset.csv").write_text("\n".join(lines) + "\n")
    return root


LAYOUTS = {
    "ddr": lambda root: synthetic(root, "ddr"),
    "kvasir": lambda root: synthetic(root, "kvasir"),
    "acdc": lambda root: synthetic(root, "acdc"),
    "isic2016": lambda root: write_isic(root, [1, 2, 3], [7]),
    "synapse": lambda root: write_synapse(root, [0, 1, 8]),
    "folder": write_folder,
    "csv": write_table,
}


@pytest.mark.parametrize("fmt", sorted(LAYOUTS))
def test_detect_format_recognises_each_layout(fmt: str, tmp_path: Path) -> None:
    assert detect_format(LAYOUTS[fmt](tmp_path / fmt)) == fmt


def test_auto_format_takes_the_detected_formats_defaults_unless_set(tmp_path: Path) -> None:
    root = synthetic(tmp_path / "kvasir", "kvasir")
    resolved = resolve_data_config(DataConfig(format="auto"), root)
    assert (resolved.format, resolved.task, resolved.class_names, resolved.folds) == (
        "kvasir", "segmentation", ["background", "polyp"], 5)
    assert resolve_data_config(DataConfig(format="auto", folds=1), root).folds == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetFormatError, match="no known dataset layout.*set data.format"):
        detect_format(empty)


def test_kvasir_reader_thresholds_jpeg_masks(tmp_path: Path) -> None:
    root = synthetic(tmp_path / "kvasir", "kvasir")
    data = DataConfig(format="kvasir")
    samples = read_dataset(data, root)
    assert len(samples) == TINY.seg_images
    assert all(s.split is None and s.label is None and s.mask.parent.name == "masks" for s in samples)
    assert [s.path.name for s in samples] == [s.mask.name for s in samples]
    for index, sample in enumerate(samples[:4]):
        mask = read_mask(sample.mask, mask_policy(data))
        _, drawn = render_polyp(32, 40, np.random.default_rng([TINY.seed, STREAM, index]))
        assert set(np.unique(mask)) <= {0, 1} and drawn.any()
        assert (mask == drawn).mean() > 0.97, "thresholded JPEG mask matches the drawn polyp"


def test_kvasir_reader_names_an_image_without_mask(tmp_path: Path) -> None:
    root = synthetic(tmp_path / "kvasir", "kvasir")
    (root / "masks" / "synthetic00003.jpg").unlink()
    with pytest.raises(DatasetFormatError, match=r"no mask for image\(s\) synthetic00003.jpg"):
        read_dataset(DataConfig(format="kvasir"), root)


def test_isic_reader_keeps_the_official_test_split(tmp_path: Path) -> None:
    root = write_isic(tmp_path / "isic", [1, 2, 3, 4], [9000, 9001])
    data = DataConfig(format="isic2016")
    samples = read_dataset(data, root)
    assert [(s.path.name, s.split) for s in samples] == [
        ("ISIC_0000001.jpg", "train"), ("ISIC_0000002.jpg", "train"), ("ISIC_0000003.jpg", "train"),
        ("ISIC_0000004.jpg", "train"), ("ISIC_0009000.jpg", "test"), ("ISIC_0009001.jpg", "test")]
    assert samples[4].mask == root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / "ISIC_0009000_Segmentation.png"
    mask = read_mask(samples[0].mask, mask_policy(data))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1} and mask.sum() == 15 * 20

    (root / "ISBI2016_ISIC_Part1_Training_GroundTruth" / "ISIC_0000002_Segmentation.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"ISIC_0000002_Segmentation.png does not exist \(the ground truth of"):
        read_dataset(data, root)


def test_acdc_reader_reads_the_labelled_frames_slice_by_slice(tmp_path: Path) -> None:
    root = synthetic(tmp_path / "acdc", "acdc")
    data = DataConfig(format="acdc")
    samples = read_dataset(data, root)
    assert len(samples) == TINY.volumes * 2 * TINY.slices
    assert not any("_4d" in s.path.name for s in samples), "the unannotated cine is skipped"
    first = [s for s in samples if s.group == "patient001"]
    es = (root / "training" / "patient001" / "Info.cfg").read_text().split("ES: ")[1].split()[0]
    assert sorted({s.volume for s in first}) == ["patient001_frame01", f"patient001_frame{int(es):02d}"]
    assert all(s.mask.name == s.path.name.replace(".nii.gz", "_gt.nii.gz") for s in samples)

    ed = [s for s in first if s.volume == "patient001_frame01"]
    pairs = read_array_slices(ed, mask_policy(data))
    assert [p[0].shape for p in pairs] == [(32, 32)] * TINY.slices and pairs[0][0].dtype == np.uint8
    assert set(np.unique(pairs[0][1])) == {0, RV, MYO, LV}
    blood = pairs[0][0][pairs[0][1] == LV].mean()
    assert blood > pairs[0][0][pairs[0][1] == MYO].mean() + 50, "bright blood pool, dark myocardium"

    info = root / "training" / "patient002" / "Info.cfg"
    info.write_text(info.read_text().replace("ES:", "Systole:"))
    with pytest.raises(DatasetFormatError, match=r"patient002/Info.cfg: no ES field"):
        read_dataset(data, root)


def test_synapse_reader_and_transunet_label_conventions(tmp_path: Path) -> None:
    root = write_synapse(tmp_path / "synapse", [0, 1, 5, 8])
    data = DataConfig(format="synapse")
    samples = read_dataset(data, root)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert [(s.group, s.slice_index) for s in train] == [("case0005", 0), ("case0005", 1), ("case0005", 2),
                                                         ("case0006", 0), ("case0006", 1)]
    assert [s.slice_index for s in test] == [0, 1, 2, 3] and {s.volume for s in test} == {"case0001"}
    pairs = read_array_slices(test, mask_policy(data))
    assert [int(image[0, 0]) for image, _ in pairs] == [0, 85, 170, 255], "h5 slices lie on the first axis"
    assert set(np.unique(pairs[0][1])) == {0, 1, 5, 8}

    btcv = mask_policy(DataConfig(format="synapse", synapse_labels="btcv13"))
    (_, label), = read_array_slices(train[:1], btcv)
    assert label[0, 2] == 7 and label[0, 4] == 0 and label[0, 6] == 1, "spleen->7, oesophagus->bg, aorta->1"

    raw = write_synapse(tmp_path / "raw", [0, 11])
    with pytest.raises(DatasetFormatError, match=r"mask values \[0, 11\] are not class indices 0-8"):
        read_array_slices(read_dataset(data, raw)[:1], mask_policy(data))


def test_folder_and_csv_readers(tmp_path: Path) -> None:
    data = DataConfig(format="folder", class_names=["benign", "malignant"])
    samples = read_dataset(data, write_folder(tmp_path / "folder"))
    assert Counter((s.split, s.label) for s in samples) == {("train", 0): 3, ("train", 1): 3,
                                                           ("test", 0): 2, ("test", 1): 2}
    (tmp_path / "folder" / "train" / "unknown").mkdir()
    with pytest.raises(DatasetFormatError, match=r"folder\(s\) \['unknown'\] are not in data.class_names"):
        read_dataset(data, tmp_path / "folder")

    table = read_dataset(DataConfig(format="csv", class_names=["benign", "malignant"]), write_table(tmp_path / "csv"))
    assert [(s.label, s.group, s.split) for s in table] == [
        (0, "p0", None), (1, "p0", None), (0, "p1", None), (1, "p1", None), (0, "p2", None), (1, "p2", "test")]
    with pytest.raises(DatasetFormatError, match="no mask column for data.task=segmentation"):
        read_dataset(DataConfig(format="csv", task="segmentation"), tmp_path / "csv")


def test_segmentation_folder_with_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "seg"
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        noise_image().save(root / split / "images" / "a.png")
        Image.fromarray(np.full((30, 40), 2, dtype=np.uint8)).save(root / split / "masks" / "a.png")
    data = DataConfig(format="folder", task="segmentation", class_names=["background", "liver", "tumour"])
    samples = read_dataset(data, root)
    assert [s.split for s in samples] == ["train", "valid"]
    assert np.all(read_mask(samples[0].mask, mask_policy(data)) == 2)


# --- the pixel policy ------------------------------------------------------------------------


def test_images_become_rgb_by_the_stated_policy(tmp_path: Path) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray((grey.astype(np.uint16) * 100)).save(tmp_path / "deep.png")
    rgba = np.dstack([np.full((8, 8, 3), 90, np.uint8), np.zeros((8, 8), np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    policy = MaskPolicy(num_classes=2, threshold=128)

    def load(name: str) -> np.ndarray:
        (image, mask), = load_resized([Sample(tmp_path / name, 0, None)], 8, policy, 10_000)
        assert mask is None and image.shape == (8, 8, 3) and image.dtype == np.uint8
        return image

    replicated = load("grey.png")
    assert np.array_equal(replicated[..., 0], grey) and np.array_equal(replicated[..., 0], replicated[..., 2])
    deep = load("deep.png")
    assert deep.min() == 0 and deep.max() == 255, "16-bit greyscale is scaled from its own range"
    assert np.all(load("alpha.png") == 90), "alpha is dropped, not blended"


def test_masks_follow_the_stated_policy(tmp_path: Path) -> None:
    binary = np.zeros((8, 8), np.uint8)
    binary[2:5, 2:5] = 1
    Image.fromarray(binary).save(tmp_path / "zero_one.png")
    Image.fromarray(binary * 200).save(tmp_path / "jpeg_mask.jpg", quality=75)
    Image.fromarray(binary * 7).save(tmp_path / "seven.png")
    two, four = MaskPolicy(num_classes=2, threshold=128), MaskPolicy(num_classes=4, threshold=128)
    assert np.array_equal(read_mask(tmp_path / "zero_one.png", two), binary), "0/1 masks are taken as they are"
    assert np.array_equal(read_mask(tmp_path / "jpeg_mask.jpg", two), binary), "lossy masks are thresholded"
    assert np.array_equal(read_mask(tmp_path / "zero_one.png", four), binary)
    with pytest.raises(DatasetFormatError, match="a JPEG mask is lossy"):
        read_mask(tmp_path / "jpeg_mask.jpg", four)
    with pytest.raises(DatasetFormatError, match=r"seven.png: mask values \[0, 7\] are not class indices 0-3"):
        read_mask(tmp_path / "seven.png", four)


# --- segmentation cache, restacking and joint transforms ---------------------------------------


def test_preprocess_writes_a_restackable_segmentation_cache(tmp_path: Path) -> None:
    root = synthetic(tmp_path / "acdc", "acdc")
    cfg = ExperimentConfig(model={"image_size": 24, "weights": "random"}, data={"format": "acdc"})
    meta = preprocess(cfg, root, tmp_path / "cache", validated(cfg, root, tmp_path / "validation"))
    assert meta["task"] == "segmentation" and meta["class_names"] == ["background", "RV", "MYO", "LV"]
    assert meta["splits"]["units"] == {"train": 7, "valid": 1, "test": 2}
    test_dir = tmp_path / "cache" / "test"
    masks, volumes = np.load(test_dir / "masks.npy"), np.load(test_dir / "volumes.npy")
    slices = np.load(test_dir / "slices.npy")
    assert masks.shape == (2 * 2 * TINY.slices, 24, 24) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1, 2, 3} and not (tmp_path / "cache" / "test" / "labels.npy").exists()
    for volume in set(volumes.tolist()):
        assert sorted(slices[volumes == volume].tolist()) == list(range(TINY.slices)), "every volume restacks"
    assert meta["counts"]["test"]["volumes"] == 4

    split = CachedSplit(test_dir, (0.5,) * 3, (0.25,) * 3, augment=TrainConfig(crop_scale=(0.5, 0.9)))
    torch.manual_seed(0)
    image, mask = split[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert mask.shape == (24, 24) and mask.dtype == torch.int64 and set(mask.unique().tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("crop_scale", [(1.0, 1.0), (0.3, 0.6)])
def test_joint_transforms_move_the_mask_with_the_image(crop_scale: tuple[float, float]) -> None:
    """The image's red channel encodes the mask: after flips and crops the two must still overlap
    (only the boundary may differ: bilinear image, nearest-neighbour mask)."""
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[8:40, 12:28] = 1
    image = torch.stack([mask * 255, torch.zeros_like(mask), torch.zeros_like(mask)])
    transform = build_transform(64, (0.0,) * 3, (1.0,) * 3, TrainConfig(crop_scale=crop_scale))
    for seed in range(8):
        torch.manual_seed(seed)
        out_image, out_mask = apply(transform, image, mask)
        assert set(out_mask.unique().tolist()) <= {0, 1}
        red = out_image[0] > 0.5
        union = (red | out_mask.bool()).sum()
        iou = (red & out_mask.bool()).sum() / union if union else torch.tensor(1.0)
        assert iou > 0.85, f"seed {seed}: mask and image overlap with IoU {iou:.2f}"


def test_synthetic_segmentation_data_is_deterministic(tmp_path: Path) -> None:
    for fmt in ("kvasir", "acdc"):
        first, second = synthetic(tmp_path / f"{fmt}1", fmt), synthetic(tmp_path / f"{fmt}2", fmt)
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
        assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
        shutil.rmtree(second)
