"""Registered versions of known quality, built through the real train, evaluate, export and
register steps on a tiny task any adapter can learn (dark vs bright images), over a tiny stand-in
backbone (the pretrain step's own output, so versions are promotable: RANDOM WEIGHTS never are).

A "good" version trains a few epochs and separates the classes; a "bad" one takes one step at a
learning rate too small to move the classifier from its random start.

Exporting to ONNX takes most of a run's time here (about 15 s), and the register step logs that
graph beside the version; the promotion, model-card and serving tests read only the pyfunc and
the per-sample records, so every run is registered with one exported graph (``export_dir``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dvpt_core.config import ExperimentConfig
from dvpt_core.steps.evaluate import evaluate
from dvpt_core.steps.export import export
from dvpt_core.steps.preprocess import preprocess
from dvpt_core.steps.validate import validate
from dvpt_core.steps.pretrain import pretrain, use_stand_in
from dvpt_core.steps.register import register
from dvpt_core.steps.train import train
from tests.helpers import tiny_config

CLASSES = ["dark", "bright"]
STAND_IN = ["model.weights=stand-in", "model.weights_file=unused.safetensors", "pretrain.train=16",
            "pretrain.valid=8", "pretrain.test=8", "pretrain.epochs=1", "pretrain.batch_size=8"]
TASK = ["data.format=folder", f"data.class_names={CLASSES}", "data.val_fraction=0.2", "data.test_fraction=0.4",
        "train.hflip=false", "train.vflip=false", "train.crop_scale=[1.0, 1.0]"]
DVC_MD5 = "d41d8cd98f00b204e9800998ecf8427e.dir"
QUALITY = {"good": ["train.epochs=4", "train.lr=0.05", "model.method=linear"],
           "bad": ["train.epochs=1", "train.lr=1e-9", "train.max_steps_per_epoch=1", "model.method=linear"]}


def brightness_dataset(root: Path, per_class: int = 50, seed: int = 0, dvc_md5: str = DVC_MD5) -> Path:
    """``root/data/<class>/<i>.png``: noise textures, dark (mean ~60) or bright (mean ~190), with a
    ``data.dvc`` pointer beside the folder carrying ``dvc_md5`` (the lineage hash)."""
    rng = np.random.default_rng(seed)
    data = root / "data"
    for label, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 60 + 130 * label
            pixels = np.clip(rng.normal(base, 25, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{name}_{seed}_{i:03d}.png")
    dvc_pointer(data, dvc_md5)
    return data


def dvc_pointer(data: Path, md5: str) -> Path:
    """The ``<data>.dvc`` file ``dvc add`` would write, carrying ``md5``."""
    pointer = data.parent / f"{data.name}.dvc"
    pointer.write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": data.name}]}))
    return pointer


def stand_in_config(work: Path, tracking_uri: str, registered_model: str, *overrides: str) -> ExperimentConfig:
    """The tiny task's configuration over a stand-in backbone pre-trained (in seconds) in ``work``."""
    cfg = tiny_config(*STAND_IN, *TASK, f"tracking.tracking_uri={tracking_uri}",
                      f"tracking.registered_model={registered_model}", "tracking.experiment=registry-tests",
                      *overrides)
    pretrain(cfg, work / "pretrain")
    return use_stand_in(cfg, work / "pretrain")


def with_overrides(cfg: ExperimentConfig, *overrides: str) -> ExperimentConfig:
    """``cfg`` with dotted ``KEY=VALUE`` overrides applied (values read as YAML)."""
    raw = cfg.model_dump(mode="json")
    for item in overrides:
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[leaf] = yaml.safe_load(value)
    return ExperimentConfig.model_validate(raw)


def prepare(cfg: ExperimentConfig, data: Path, cache: Path) -> Path:
    validation = cache.parent / f"{cache.name}-validation"
    validate(cfg, data, validation)
    preprocess(cfg, data, cache, validation)
    return cache


def trained_run(cfg: ExperimentConfig, quality: str, data: Path, cache: Path, work: Path) -> Path:
    """A train step folder (run, logged model, adapter), evaluated; register it with
    :func:`register_run` as often as needed."""
    cfg = with_overrides(cfg, *QUALITY[quality])
    train(cfg, cache, work / "train", data_root=data)
    evaluate(cfg, cache, work / "train", work / "evaluation")
    return work


def export_run(cfg: ExperimentConfig, cache: Path, work: Path) -> Path:
    export(cfg, cache, work / "train", work / "export")
    return work / "export"


def register_run(cfg: ExperimentConfig, work: Path, registered_model: str, export_dir: Path) -> str:
    """A new version of ``registered_model`` from the run in ``work``; returns its number."""
    cfg = with_overrides(cfg, f"tracking.registered_model={registered_model}")
    return register(cfg, work / "train", export_dir, work / f"registry-{registered_model}")["version"]


@pytest.fixture(scope="session")
def registry_runs(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Trained and evaluated runs: good and bad on one dataset; bad on the same images under
    another DVC hash; good on another split of the same data."""
    root = tmp_path_factory.mktemp("registry_runs")
    # Every run is a linear probe (see QUALITY): the steps after training refuse settings that
    # contradict the adapter, so the shared configuration says so too.
    cfg = with_overrides(stand_in_config(root, mlflow_server, "unused"), "model.method=linear")
    data = brightness_dataset(root / "a")
    cache = prepare(cfg, data, root / "cache")
    other_data = Path(shutil.copytree(data, root / "b" / "data"))
    dvc_pointer(other_data, "ffffffffffffffffffffffffffffffff.dir")
    resplit = with_overrides(cfg, "data.split_seed=7")
    runs = {
        "cfg": cfg,
        "good": trained_run(cfg, "good", data, cache, root / "good"),
        # A second good run (another seed): registration is per run, so racing needs two.
        "good_again": trained_run(with_overrides(cfg, "train.seed=1"), "good", data, cache, root / "good_again"),
        "bad": trained_run(cfg, "bad", data, cache, root / "bad"),
        "other_data": trained_run(cfg, "bad", other_data, cache, root / "other_data"),
        "other_split": trained_run(resplit, "good", data, prepare(resplit, data, root / "cache7"),
                                   root / "other_split"),
    }
    runs["export"] = export_run(cfg, cache, runs["good"])
    return runs
