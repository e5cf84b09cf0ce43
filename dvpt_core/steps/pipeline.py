"""The whole pipeline in one process, in the order ``dvc.yaml`` and the KFP pipeline run it."""

from __future__ import annotations

from pathlib import Path

from dvpt_core.config import ExperimentConfig
from dvpt_core.steps.evaluate import evaluate
from dvpt_core.steps.export import export
from dvpt_core.steps.preprocess import preprocess
from dvpt_core.steps.pretrain import pretrain_if_stand_in, use_stand_in
from dvpt_core.steps.promote import promote_step
from dvpt_core.steps.register import register
from dvpt_core.steps.train import train
from dvpt_core.steps.validate import validate

# Sub-folders of the output root, the same names dvc.yaml uses for its outs.
STEP_DIRS = ("pretrain", "validation", "cache", "train", "evaluation", "export", "registry", "promotion")


def run_all(cfg: ExperimentConfig, data_root: Path, out_root: Path) -> dict:
    """The data gate first (bad data stops everything before any other output exists); then,
    with ``model.weights=stand-in``, the pretrain step (or its reused output), whose backbone the
    later steps read whatever ``model.weights_file`` said."""
    out = {name: Path(out_root) / name for name in STEP_DIRS}
    validate(cfg, data_root, out["validation"])
    pretrain_if_stand_in(cfg, out["pretrain"])
    cfg = use_stand_in(cfg, out["pretrain"])
    preprocess(cfg, data_root, out["cache"], out["validation"])
    trained = train(cfg, out["cache"], out["train"], data_root=data_root, validation_dir=out["validation"])
    metrics = evaluate(cfg, out["cache"], out["train"], out["evaluation"])
    exported = export(cfg, out["cache"], out["train"], out["export"])
    registered = register(cfg, out["train"], out["export"], out["registry"])
    promoted = promote_step(cfg, out["registry"], out["promotion"])
    return {"train": trained, "test": metrics, "export": exported, "registry": registered, "promotion": promoted,
            "random_weights": metrics["random_weights"], "stand_in_weights": metrics["stand_in_weights"]}
