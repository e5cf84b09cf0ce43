"""Fault injection on the data side and at the command line (issue 8, items 5-9).

Every fault is made for real: bytes flipped in an adapter, NaN written with a matching checksum,
settings that contradict an adapter, a full tmpfs and a file size limit under preprocess, a
writer killed with SIGKILL, datasets the gate used to let through, list files in the wrong
encoding, credentials inside a tracking URI. Each must end in one line naming what is at fault
(``dvpt STEP: error: ...``, exit 2; a traceback only with ``--debug``), keep what it should and
leave nothing half-written. Training and tracking faults are in ``test_faults.py``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from dvpt_core.cli import main
from dvpt_core.config import ExperimentConfig
from dvpt_core.data.atomic import atomic_directory
from dvpt_core.data.formats import DatasetFormatError, read_dataset
from dvpt_core.data.formats.ddr import read_ddr
from dvpt_core.data.formats.pixels import MaskPolicy, read_mask
from dvpt_core.data.splits import file_digests, plan_splits
from dvpt_core.data.synthetic import generate_dataset
from dvpt_core.peft import build_model
from dvpt_core.peft.adapter import (
    AdapterError, config_for_adapter, load_adapter, read_adapter_config, save_adapter, verify_adapter,
)
from dvpt_core.secrets import MaskSecrets, mask_uri
from dvpt_core.steps.preprocess import NotValidatedError, inputs_hash, preprocess
from dvpt_core.steps.validate import DataValidationError, validate
from dvpt_core.storage import StorageError, open_reserved_memmap
from tests.helpers import TINY, tiny_config

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]
TINY3 = [*TINY, "data.class_names=[a, b, c]"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false",
       "OMP_NUM_THREADS": "1"}


def sets(*overrides: str) -> list[str]:
    """``--set`` flags for the tiny 3-class configuration plus ``overrides`` (later ones win)."""
    return [arg for item in (*TINY3, *overrides) for arg in ("--set", item)]


def run_cli(capsys: pytest.CaptureFixture, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, step: str, *needles: str) -> str:
    """The output ends in ``dvpt STEP: error: ...`` holding every needle, with no traceback."""
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"dvpt {step}: error: "), err
    assert all(n in last for n in needles), (needles, last)
    assert "Traceback" not in err, err
    return last


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 3-class DDR dataset, validated and preprocessed, and an adapter (random, perturbed) over it."""
    root = tmp_path_factory.mktemp("faults")
    cfg = tiny_config("data.class_names=[a, b, c]")
    generate_dataset(root / "data", cfg)
    validate(cfg, root / "data", root / "validation")
    preprocess(cfg, root / "data", root / "cache", root / "validation")
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_adapter(model, cfg, root / "train" / "adapter")
    return root


def train_copy(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared / "train", tmp_path / "train"))


def data_copy(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared / "data", tmp_path / "data"))


def relabel(root: Path, split: str, old: int | None, new: int) -> None:
    """Every line of ``split``.txt labelled ``old`` (every line for None) gets label ``new``."""
    lines = [line.rsplit(maxsplit=1) for line in (root / f"{split}.txt").read_text().splitlines()]
    (root / f"{split}.txt").write_text("".join(
        f"{name} {new if old is None or int(label) == old else label}\n" for name, label in lines))


# --- 5. verified adapters ----------------------------------------------------------------------


def test_flipped_adapter_bytes_are_refused_by_their_checksum(prepared: Path, tmp_path: Path, capsys) -> None:
    train = train_copy(prepared, tmp_path)
    weights = train / "adapter" / "adapter.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # one bit of the last tensor's values; the file still parses
    weights.write_bytes(bytes(data))
    load_file(str(weights))  # safetensors alone accepts it: only the checksum tells

    with pytest.raises(AdapterError, match=r"adapter.safetensors: SHA-256 \w+\.\.\. differs from"):
        load_adapter(train / "adapter")
    code, out, err = run_cli(capsys, "export", *sets(), "--cache", prepared / "cache", "--train", train,
                             "--out", tmp_path / "export")
    assert code == 2 and out == ""
    assert_one_line_error(err, "export", str(weights), "SHA-256", "refusing to load them")
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").glob("*.onnx"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_with_a_matching_checksum_is_refused(prepared: Path, tmp_path: Path, bad: float) -> None:
    """Written as a diverged run would write it: the checksum matches, the values do not."""
    train = train_copy(prepared, tmp_path)
    weights, config = train / "adapter" / "adapter.safetensors", train / "adapter" / "adapter.json"
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = bad
    save_file(tensors, str(weights))
    meta = json.loads(config.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(meta))

    with pytest.raises(AdapterError, match=rf"adapter.safetensors: tensor\(s\) {name} hold NaN or infinite"):
        load_adapter(train / "adapter")
    with pytest.raises(AdapterError, match="hold NaN or infinite"):
        verify_adapter(train / "adapter")  # what register checks before shipping it


def test_unreadable_weights_with_a_matching_checksum_name_the_file(prepared: Path, tmp_path: Path) -> None:
    """safetensors' own SafetensorError becomes an AdapterError naming the file."""
    train = train_copy(prepared, tmp_path)
    weights, config = train / "adapter" / "adapter.safetensors", train / "adapter" / "adapter.json"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    meta = json.loads(config.read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=rf"{weights} is not a readable safetensors file"):
        load_adapter(train / "adapter")


@pytest.mark.parametrize(("override", "needle"), [
    ("model.method=lora", "model.method='lora' (the adapter has 'dvpt')"),
    ("model.backbone=vit_small_patch16_224", "model.backbone='vit_small_patch16_224' (the adapter has "
                                             "'vit_tiny_patch16_224')"),
    ("model.image_size=64", "model.image_size=64 (the adapter has 32)"),
    ("data.class_names=[a, b, c, d, e, f, g]", "data.class_names=['a', 'b', 'c', 'd', 'e', 'f', 'g'] "
                                               "(the adapter has ['a', 'b', 'c'])"),
])
def test_a_setting_that_contradicts_the_adapter_is_refused(
    prepared: Path, tmp_path: Path, capsys, override: str, needle: str
) -> None:
    out_dir = tmp_path / "evaluation"
    code, out, err = run_cli(capsys, "evaluate", *sets(override), "--cache", prepared / "cache",
                             "--train", prepared / "train", "--out", out_dir)
    assert code == 2
    assert_one_line_error(err, "evaluate", f"adapter {prepared / 'train' / 'adapter'} was trained with other "
                                           "settings than given", needle)
    assert not (out_dir / "metrics.json").exists()


def test_settings_not_given_come_from_the_adapter(prepared: Path, tmp_path: Path, capsys) -> None:
    """With nothing but a tracking store given, evaluate scores the adapter as it was trained (its
    tiny ViT at 32 px, 3 classes), not the schema's defaults (CLIP ViT-B/16, 5 DDR grades). A run
    that does not exist in the store is an MlflowException: one line too."""
    adapter = prepared / "train" / "adapter"
    meta = read_adapter_config(adapter)
    adapted = config_for_adapter(ExperimentConfig(), adapter)
    assert adapted.model.model_dump(mode="json") == meta["model"] and adapted.data.class_names == CLASSES

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A new store's Default experiment: an experiment another test made active in this process
    # belongs to another store.
    run = mlflow.MlflowClient(uri).create_run("0")
    train = train_copy(prepared, tmp_path)
    (train / "run.json").write_text(json.dumps({"run_id": run.info.run_id}))
    code, out, err = run_cli(capsys, "evaluate", "--set", f"tracking.tracking_uri={uri}", "--cache", prepared / "cache",
                             "--train", train, "--out", tmp_path / "evaluation")
    assert code == 0, err
    report = json.loads(out)
    labels = np.load(prepared / "cache" / "test" / "labels.npy")
    assert np.asarray(report["confusion_matrix"]).shape == (3, 3) and report["samples"] == len(labels)

    (train / "run.json").write_text(json.dumps({"run_id": uuid.uuid4().hex}))
    code, _, err = run_cli(capsys, "evaluate", "--set", f"tracking.tracking_uri={uri}", "--cache", prepared / "cache",
                           "--train", train, "--out", tmp_path / "evaluation2")
    assert code == 2
    assert_one_line_error(err, "evaluate", "not found")


# --- 6. storage faults -------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs: a disk that is really full, where mounting is allowed (root here)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): needs root "
                    "with CAP_SYS_ADMIN")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_stops_preprocess_in_one_line_naming_the_space(prepared: Path, tmpfs: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "preprocess", *sets("model.image_size=128"), "--data", prepared / "data",
                           "--validation", prepared / "validation", "--out", tmpfs / "cache")
    assert code == 2
    images = 32 * 128 * 128 * 3
    last = assert_one_line_error(err, "preprocess", f"not enough space for the 128x128 preprocessing cache in {tmpfs}",
                                 "free")
    needed = float(last.split("it needs ")[1].split(" MB")[0])
    assert images / 1e6 < needed < images / 1e6 + 20
    assert list(tmpfs.iterdir()) == [], "a half-written cache or temporary folder was left"


def test_a_mapped_write_on_a_full_disk_is_sigbus_unless_reserved(tmpfs: Path) -> None:
    """What preprocess did before: writing pages of a sparse memory map on a full disk kills the
    process with SIGBUS and no message. Reserving the blocks first makes it an exception."""
    crash = subprocess.run([sys.executable, "-c", (
        "import numpy as np, sys\n"
        "a = np.lib.format.open_memmap(sys.argv[1], mode='w+', dtype=np.uint8, shape=(2_000_000,))\n"
        "a[:] = 1\n"
        "a.flush()\n"
    ), str(tmpfs / "sparse.npy")], env=ENV, capture_output=True, timeout=120)
    assert crash.returncode == -signal.SIGBUS, crash
    (tmpfs / "sparse.npy").unlink()

    with pytest.raises(StorageError, match=rf"not enough space for {tmpfs / 'reserved.npy'}: it needs 2.0 MB") as caught:
        open_reserved_memmap(tmpfs / "reserved.npy", np.uint8, (2_000_000,))
    assert caught.value.errno == errno.ENOSPC
    assert not (tmpfs / "reserved.npy").exists()


def test_a_file_size_limit_hit_mid_write_is_one_line_and_leaves_nothing(prepared: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE fails the write after the free-space check passed (the disk here is large):
    the error of a disk filling during the write. SIGXFSZ is ignored, as a shell's ulimit -f does not."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "dvpt_core.cli", "preprocess", *sets("model.image_size=128"), "--data",
         str(prepared / "data"), "--validation", str(prepared / "validation"), "--out", str(out)],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit,
    )
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, "preprocess", f"cannot write the preprocessing cache in {out}: a file would "
                          "exceed the process's file size limit (ulimit -f); it needs")
    assert list(tmp_path.iterdir()) == [], "a half-written cache or temporary folder was left"


def _writer(target: Path) -> tuple[subprocess.Popen, Path]:
    """A process inside ``atomic_directory(target)``, stopped there with half its output written."""
    process = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from dvpt_core.data.atomic import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1]), replace=True) as tmp:\n"
        "    (tmp / 'images.npy').write_bytes(bytes(100_000))\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(600)\n"
    ), str(target)], env=ENV, stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_killed_writers_temporary_folder_is_removed_at_the_next_start(prepared: Path, tmp_path: Path) -> None:
    target = tmp_path / "cache"
    killed, killed_tmp = _writer(target)
    live, live_tmp = _writer(target)
    try:
        killed.kill()
        killed.wait()
        # Another machine's writer cannot be checked from here; an earlier version's records no owner.
        foreign = tmp_path / f".cache.tmp-0123abcd-{killed.pid}@not-{socket.gethostname()}"
        legacy = tmp_path / ".cache.tmp-0123456789ab"
        foreign.mkdir()
        legacy.mkdir()
        assert killed_tmp.is_dir() and live_tmp.is_dir()

        preprocess(tiny_config("data.class_names=[a, b, c]"), prepared / "data", target, prepared / "validation")

        assert not killed_tmp.exists(), "the dead writer's temporary folder was kept"
        assert live_tmp.is_dir() and (live_tmp / "images.npy").stat().st_size == 100_000, "a live writer's was removed"
        assert foreign.is_dir() and legacy.is_dir()
        assert (target / "meta.json").is_file()
    finally:
        live.kill()
        live.wait()


def test_a_writer_killed_between_its_two_renames_gets_its_old_version_back(tmp_path: Path) -> None:
    target = tmp_path / "report"
    target.mkdir()
    (target / "validation.json").write_text("old")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    moved = tmp_path / f".report.old-0123abcd-{gone.pid}@{socket.gethostname()}"
    target.rename(moved)
    with atomic_directory(target, replace=True) as tmp:
        assert (target / "validation.json").read_text() == "old", "the version moved aside was not restored"
        (tmp / "validation.json").write_text("new")
    assert (target / "validation.json").read_text() == "new" and not moved.exists()


# --- 7. the gate -------------------------------------------------------------------------------


def validation_report(out: Path) -> dict:
    return json.loads((out / "validation.json").read_text())


def test_a_class_missing_from_train_fails_and_from_test_warns(prepared: Path, tmp_path: Path) -> None:
    cfg = tiny_config("data.class_names=[a, b, c]")
    root = data_copy(prepared, tmp_path)
    relabel(root, "train", 2, 1)
    with pytest.raises(DataValidationError, match=r"\(splits\): no train sample is of class 2 \(c\) "
                                                  r"\(validation.class_missing_from_train\)"):
        validate(cfg, root, tmp_path / "refused")
    failed = validation_report(tmp_path / "refused")
    assert not failed["success"] and [e["file"] for e in failed["offending"]] == ["(splits)"]

    # The rule is a setting: as a warning the same data pass, and the finding is still reported.
    relaxed = tiny_config("data.class_names=[a, b, c]", "validation.class_missing_from_train=warning")
    summary = validate(relaxed, root, tmp_path / "relaxed")
    assert summary["success"] and summary["offending"] == []
    assert [w["reason"] for w in summary["warnings"]] == [
        "no train sample is of class 2 (c) (validation.class_missing_from_train)"]
    ignored = validate(tiny_config("data.class_names=[a, b, c]", "validation.class_missing_from_train=ignore"), root,
                       tmp_path / "ignored")
    assert ignored["success"] and ignored["warnings"] == []

    test_only = data_copy(prepared, tmp_path / "second")
    relabel(test_only, "test", 2, 0)
    summary = validate(cfg, test_only, tmp_path / "warned")
    assert summary["success"]
    assert [w["reason"] for w in summary["warnings"]] == [
        "no test sample is of class 2 (c) (validation.class_missing_from_eval)"]
    warned = [e for e in summary["expectations"] if e["severity"] == "warning" and not e["success"]]
    assert len(warned) == 1 and warned[0]["kwargs"]["column"] == "classes_missing_from_split"


def test_a_single_class_dataset_is_refused(prepared: Path, tmp_path: Path) -> None:
    root = data_copy(prepared, tmp_path)
    for split in ("train", "valid", "test"):
        relabel(root, split, None, 0)
    with pytest.raises(DataValidationError) as caught:
        validate(tiny_config("data.class_names=[a, b, c]"), root, tmp_path / "validation")
    assert "(dataset): every sample is of class 0 (a): nothing to tell apart (validation.single_class)" in \
        str(caught.value).splitlines()


def test_masks_that_are_all_background_are_a_single_class_dataset(tmp_path: Path) -> None:
    cfg = ExperimentConfig(data={"format": "kvasir"}, synthetic={"seg_images": 10, "image_size": 40})
    generate_dataset(tmp_path / "kvasir", cfg)
    for mask in (tmp_path / "kvasir" / "masks").iterdir():
        Image.new("L", Image.open(mask).size).convert("RGB").save(mask, format="JPEG")
    with pytest.raises(DataValidationError) as caught:
        validate(cfg, tmp_path / "kvasir", tmp_path / "validation")
    lines = str(caught.value).splitlines()
    assert "(dataset): every mask is background only: nothing to segment (validation.single_class)" in lines
    assert "(splits): no train mask shows class 1 (polyp) (validation.class_missing_from_train)" in lines


def test_unlisted_files_in_a_split_folder_are_reported(prepared: Path, tmp_path: Path) -> None:
    root = data_copy(prepared, tmp_path)
    listed = (root / "train.txt").read_text().split()[0]
    shutil.copy(root / "train" / listed, root / "train" / "extra.jpg")
    summary = validate(tiny_config("data.class_names=[a, b, c]"), root, tmp_path / "warned")
    assert summary["success"] and summary["warnings"] == [{
        "file": "train/extra.jpg", "column": "unlisted_files",
        "reason": "in a split folder but not listed in train.txt, so never read (validation.unlisted_files)"}]
    docs = (tmp_path / "warned" / "data_docs" / "expectations" / "dataset_manifest_classification.html").read_text()
    assert "validation.unlisted_files = warning" in docs
    with pytest.raises(DataValidationError, match="train/extra.jpg: in a split folder but not listed in train.txt"):
        validate(tiny_config("data.class_names=[a, b, c]", "validation.unlisted_files=error"), root,
                 tmp_path / "refused")

    # What preprocess reads is the validated manifest: the unlisted file is in no split.
    meta = preprocess(tiny_config("data.class_names=[a, b, c]"), root, tmp_path / "cache", tmp_path / "warned")
    assert sum(c["total"] for c in meta["counts"].values()) == len(read_ddr(root))


def test_preprocess_caches_exactly_what_the_reader_and_planner_give(prepared: Path) -> None:
    """Reading the manifest instead of the dataset changes nothing: the same samples, splits and
    content, by an independent route (the format reader, hashing and the planner afresh)."""
    cfg = tiny_config("data.class_names=[a, b, c]")
    samples = read_dataset(cfg.data, prepared / "data")
    plan = plan_splits(samples, file_digests([s.path for s in samples]), cfg.data)
    meta = json.loads((prepared / "cache" / "meta.json").read_text())
    assert meta["inputs_sha256"] == inputs_hash(prepared / "data", plan)


@pytest.mark.parametrize("fault", ["no report", "failed report", "file changed", "other class names"])
def test_preprocess_refuses_data_the_gate_did_not_pass(prepared: Path, tmp_path: Path, fault: str) -> None:
    cfg = tiny_config("data.class_names=[a, b, c]")
    root, validation = data_copy(prepared, tmp_path), Path(shutil.copytree(prepared / "validation",
                                                                           tmp_path / "validation"))
    first = (root / "train.txt").read_text().split()[0]
    if fault == "no report":
        shutil.rmtree(validation)
        expected = rf"{validation / 'validation.json'} does not exist: preprocess reads only data the validate step passed"
    elif fault == "failed report":
        report = validation_report(validation)
        (validation / "validation.json").write_text(json.dumps({**report, "success": False}))
        expected = "the data validation of .* failed; fix what it names"
    elif fault == "file changed":
        image = Image.open(root / "train" / first)
        image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "train" / first, format="JPEG")
        expected = rf"train/{first} changed since it was validated \(sha256 \w+, validated \w+\)"
    else:
        cfg = tiny_config("data.class_names=[x, y, z]")
        expected = r"holds for other data settings: data.class_names=\['x', 'y', 'z'\] \(validated with \['a', 'b', 'c'\]\)"
    with pytest.raises(NotValidatedError, match=expected) as caught:
        preprocess(cfg, root, tmp_path / "cache", validation)
    assert f"run `dvpt validate --data {root} --out {validation}`" in str(caught.value)
    assert not (tmp_path / "cache").exists()


# --- 9. files a reader knows: list files, masks --------------------------------------------------


def relative(samples: list, root: Path) -> list[tuple]:
    return [(s.path.relative_to(root), s.label, s.split) for s in samples]


def test_list_files_in_other_encodings_name_file_and_line(prepared: Path, tmp_path: Path, capsys) -> None:
    root = data_copy(prepared, tmp_path)
    text = (root / "train.txt").read_text()
    (root / "train.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())  # a leading BOM (Notepad) is fine
    assert relative(read_ddr(root), root) == relative(read_ddr(prepared / "data"), prepared / "data")

    lines = text.splitlines(keepends=True)
    (root / "train.txt").write_text("".join(lines[:2]) + "\ufeff" + "".join(lines[2:]))
    with pytest.raises(DatasetFormatError, match=r"train.txt:3: a byte-order mark \(U\+FEFF\) inside the text"):
        read_ddr(root)

    (root / "train.txt").write_bytes((lines[0] + "caf\xe9.jpg 1\n").encode("latin-1"))
    code, _, err = run_cli(capsys, "validate", *sets(), "--data", root, "--out", tmp_path / "validation")
    assert code == 2
    assert_one_line_error(err, "validate", f"{root / 'train.txt'}:2: not UTF-8 text (byte 0xe9 at column 4)")
    assert validation_report(tmp_path / "validation")["offending"][0]["file"] == "train.txt:2"


def test_a_csv_table_with_a_byte_order_mark_is_read(prepared: Path, tmp_path: Path) -> None:
    root = data_copy(prepared, tmp_path)
    names = [line.split()[0] for line in (root / "train.txt").read_text().splitlines()[:2]]
    (root / "dataset.csv").write_text("\ufeffimage,label\n" + "".join(f"train/{n},{i}\n" for i, n in enumerate(names)))
    cfg = ExperimentConfig(data={"format": "csv", "class_names": CLASSES})
    samples = read_dataset(cfg.data, root)
    assert [(s.path.name, s.label) for s in samples] == [(names[0], 0), (names[1], 1)]


def test_an_unreadable_mask_is_named_by_its_reader(tmp_path: Path) -> None:
    """Pillow's UnidentifiedImageError and truncated-file OSError name no file by themselves."""
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    buffer = io.BytesIO()
    Image.new("L", (64, 64), 255).save(buffer, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[:60])
    policy = MaskPolicy(num_classes=2, threshold=128)
    with pytest.raises(DatasetFormatError, match=r"garbage.png: unreadable mask \(cannot identify image file\)"):
        read_mask(tmp_path / "garbage.png", policy)
    with pytest.raises(DatasetFormatError, match=r"truncated.png: unreadable mask \("):
        read_mask(tmp_path / "truncated.png", policy)


# --- 8. secrets --------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "masked"), [
    ("http://alice:s3cret@mlflow:5000", "http://alice:***@mlflow:5000"),
    ("https://mlflow.example.com/?token=abc&x=1", "https://mlflow.example.com/?token=***&x=1"),
    ("postgresql://mlflow:p%40ss@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("https://s3/b/k?X-Amz-Credential=AK&X-Amz-Signature=f00", "https://s3/b/k?X-Amz-Credential=***&X-Amz-Signature=***"),
    ("https://h/?token&api_key=", "https://h/?token&api_key=***"),
    ("sqlite:///mlruns.db", "sqlite:///mlruns.db"),
    ("http://bob@127.0.0.1:5000", "http://bob@127.0.0.1:5000"),
])
def test_credentials_in_uris_are_masked(uri: str, masked: str) -> None:
    assert mask_uri(uri) == masked


def test_logs_and_cli_errors_mask_credentials(capsys) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskSecrets())
    logger = logging.getLogger("tests.faults.secrets")
    logger.addHandler(handler)
    try:
        logger.warning("cannot reach %s", "http://alice:s3cret@mlflow:5000/api?token=abc")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "cannot reach http://alice:***@mlflow:5000/api?token=***\n"

    code, out, err = run_cli(capsys, "train", *sets("tracking.tracking_uri=http://alice:s3cret@mlflow:5000/?token=abc",
                                                    "model.prompts=-1"), "--cache", "nowhere", "--out", "nowhere")
    assert code == 2 and "s3cret" not in err + out and "abc" not in err + out
    assert_one_line_error(err, "train", "model.prompts", "tracking.tracking_uri=http://alice:***@mlflow:5000/?token=***")


@pytest.mark.slow
def test_the_compiled_pipeline_holds_no_credentials(tmp_path: Path) -> None:
    """A tracking URI with credentials given at compile time is dropped from the package (the pods
    read the URI from a ConfigMap and the credentials from a Secret); the log names it masked."""
    package = tmp_path / "pipeline.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "dvpt_core.cli", "kfp", "compile", "--set",
         "tracking.tracking_uri=http://alice:s3cret@mlflow.mlflow.svc:5000/?token=abc", "--out", str(package)],
        env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    compiled = package.read_text()
    for secret in ("s3cret", "token=abc", "alice"):
        assert secret not in compiled and secret not in result.stdout + result.stderr.replace("alice:***", "")
    assert "mlflow.mlflow.svc" not in compiled
    assert "http://alice:***@mlflow.mlflow.svc:5000/?token=***" in result.stderr  # the log says what was dropped
    spec, platform = yaml.safe_load_all(compiled)
    config = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert config["tracking"]["tracking_uri"] is None
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    with_secret = {name: {e["envVar"] for s in spec["secretAsEnv"] if s["secretName"] == "dvpt-mlflow-credentials"
                          for e in s["keyToEnv"]} for name, spec in executors.items() if "secretAsEnv" in spec}
    with_secret = {name: keys for name, keys in with_secret.items() if keys}
    assert {"exec-train", "exec-evaluate", "exec-register", "exec-promote"} <= set(with_secret)
    assert all(keys == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} for keys in with_secret.values())


# --- 9. one line, exit 2, traceback with --debug ---------------------------------------------------


@pytest.mark.parametrize("debug", [None, "before the step", "after the step"])
def test_a_user_error_is_one_line_and_a_traceback_only_with_debug(prepared: Path, tmp_path: Path, capsys,
                                                                 debug: str | None) -> None:
    missing = tmp_path / "validation"
    code, out, err = run_cli(capsys, *(["--debug"] if debug == "before the step" else []), "preprocess", *sets(),
                             "--data", prepared / "data", "--validation", missing, "--out", tmp_path / "cache",
                             *(["--debug"] if debug == "after the step" else []))
    assert code == 2 and out == ""
    last = err.rstrip("\n").splitlines()[-1]
    assert last == (f"dvpt preprocess: error: {missing / 'validation.json'} does not exist: preprocess reads only "
                    f"data the validate step passed; run `dvpt validate --data {prepared / 'data'} --out {missing}` "
                    "with this configuration first")
    assert ("Traceback (most recent call last)" in err) == bool(debug)
